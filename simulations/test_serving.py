"""Targeted scenarios for the serving features, in the simulated world.

Where ``test_controller.py`` lets hypothesis choose the steps, these play one
story each (changing load, a rolling update whose new replicas crash, scale
to zero and back) over several seeds, checking the safety invariants after
every step and what the story is about at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.world import World, sim_config
from trioserve.core import events as ev
from trioserve.core.state import ReplicaState

SEEDS = [1, 7, 42]
STEP_S = 0.5


@pytest.fixture(params=SEEDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(int(request.param), tmp_path / "events.db")
    try:
        yield w
    finally:
        w.close()


def run_for(world: World, seconds: float) -> None:
    """Advance in small steps, checking the invariants after each."""
    for _ in range(int(seconds / STEP_S)):
        world.advance(STEP_S)
        world.check_safety()


def decisions(world: World) -> list[ev.AutoscaleDecision]:
    return [s.event for s in world.log.read() if isinstance(s.event, ev.AutoscaleDecision)]


def running(world: World, app: str, deployment: str) -> list[str]:
    dep = world.state.apps[app].deployments[deployment]
    return [r.id for r in dep.replicas.values() if r.state is ReplicaState.RUNNING]


def test_autoscaling_follows_changing_load_within_bounds_without_oscillating(
    world: World,
) -> None:
    config = sim_config(autoscaling=True, min_replicas=1, max_replicas=6)
    auto = config.autoscaling_config
    assert auto is not None
    world.deploy("shop", [("Ingress", "v1", config)])
    run_for(world, 10)
    for load, seconds in [(30, 40), (4, 60), (12, 40), (0, 60)]:
        world.set_load("shop", "Ingress", load)
        run_for(world, seconds)  # check_safety holds min <= target <= max each step

    made = decisions(world)
    assert any(d.to_replicas == auto.max_replicas for d in made)  # load 30 reached max
    assert made[-1].to_replicas == auto.min_replicas  # and back down when it stopped
    # No oscillation: a change of direction only after the delay of the new direction.
    for before, after in itertools.pairwise(made):
        up_before = before.to_replicas > before.from_replicas
        up_after = after.to_replicas > after.from_replicas
        if up_before != up_after:
            delay = auto.upscale_delay_s if up_after else auto.downscale_delay_s
            assert after.at - before.at >= delay, (before, after)


def test_rolling_update_whose_new_replicas_crash_still_converges(world: World) -> None:
    world.deploy("shop", [("Ingress", "v1", sim_config(4))])
    world.settle()
    world.faults = True
    world.set_load("shop", "Ingress", 8)
    world.deploy("shop", [("Ingress", "v2", sim_config(4))])
    crashed = 0
    for _ in range(120):
        world.advance(STEP_S)
        dep = world.state.apps["shop"].deployments["Ingress"]
        new_running = [
            r
            for r in dep.replicas.values()
            if r.state is ReplicaState.RUNNING and r.code_version == "v2"
        ]
        if new_running and crashed < 3:
            index = sorted(world.procs).index(new_running[0].id)
            world.crash(index)
            crashed += 1
        world.check_safety()
        # Never without a serving replica during the update.
        assert running(world, "shop", "Ingress"), f"no running replica at {world.now}"
    assert crashed == 3
    world.settle()
    dep = world.state.apps["shop"].deployments["Ingress"]
    assert {r.code_version for r in dep.replicas.values()} == {"v2"}
    assert len(running(world, "shop", "Ingress")) == 4


def test_scale_to_zero_and_back_when_requests_arrive(world: World) -> None:
    config = sim_config(autoscaling=True, min_replicas=0, max_replicas=4)
    auto = config.autoscaling_config
    assert auto is not None and auto.downscale_to_zero_delay_s is not None
    world.deploy("shop", [("Ingress", "v1", config)])
    world.set_load("shop", "Ingress", 3)
    run_for(world, 20)
    assert running(world, "shop", "Ingress")

    world.set_load("shop", "Ingress", 0)
    run_for(world, auto.downscale_delay_s + auto.downscale_to_zero_delay_s + 20)
    assert world.state.apps["shop"].deployments["Ingress"].target_replicas == 0
    assert running(world, "shop", "Ingress") == []

    world.set_load("shop", "Ingress", 3)  # requests wait at callers: queued load
    run_for(world, 10)
    assert running(world, "shop", "Ingress")
    from_zero = [d for d in decisions(world) if d.from_replicas == 0]
    assert from_zero and "scale from zero" in from_zero[-1].reason
