"""One test per rule of ``decide`` (see the module docstring of core/reconcile.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.journal import Journal, verify
from trioserve.core.placement import gpu_use, in_use
from trioserve.core.reconcile import decide, failure_limit
from trioserve.core.state import (
    REASON_START_TIMEOUT,
    ClusterState,
    DeploymentStatus,
    ReplicaState,
    apply,
    deployment_status,
    state_from_bytes,
    state_to_bytes,
)
from trioserve.store import EventLog

S = ReplicaState


def config(**overrides: object) -> DeploymentConfig:
    base: dict[str, object] = {
        "num_replicas": 3,
        "graceful_shutdown_timeout_s": 5.0,
        "health_check_period_s": 1.0,
    }
    base.update(overrides)
    return DeploymentConfig(**base)  # type: ignore[arg-type]


def deployed(
    state: ClusterState, at: float, version: str = "v1", cfg: DeploymentConfig | None = None
) -> None:
    spec = DeploymentSpec(name="D", code_version=version, config=cfg or config())
    apply(
        state,
        ev.AppDeployed(at=at, app="app", route_prefix="/", ingress="D", deployments=(spec,)),
    )


def step(state: ClusterState, now: float, load: object = None) -> list[Event]:
    """Decide and apply, as the controller does; return the decisions."""
    decisions = decide(state, now, load)  # type: ignore[arg-type]
    for d in decisions:
        apply(state, d)
    assert decide(state, now, load) == []  # type: ignore[arg-type]
    return decisions


def run_all(state: ClusterState, at: float) -> None:
    for r in list(state.replicas.values()):
        if r.state is S.STARTING:
            apply(state, ev.ReplicaRunning(at=at, replica=r.id, address=f"a{r.id}", pid=1))


def running_app(n: int = 3, version: str = "v1", **cfg: object) -> ClusterState:
    state = ClusterState()
    deployed(state, 0.0, version, config(num_replicas=n, **cfg))
    step(state, 0.0)
    run_all(state, 1.0)
    step(state, 1.0)
    return state


def kinds(decisions: list[Event]) -> list[str]:
    return [d.KIND for d in decisions]


def dep_of(state: ClusterState):  # type: ignore[no-untyped-def]
    return state.apps["app"].deployments["D"]


def test_start_replicas_up_to_target_with_ids_from_a_counter() -> None:
    state = ClusterState()
    deployed(state, 0.0)
    decisions = step(state, 0.0)
    assert [d.replica for d in decisions] == ["app#D#1", "app#D#2", "app#D#3"]  # type: ignore[attr-defined]
    assert all(d.reason == "scale up" for d in decisions)  # type: ignore[attr-defined]
    assert state.next_replica == 4


def test_decide_is_deterministic_and_does_not_modify_state() -> None:
    state = ClusterState()
    deployed(state, 0.0)
    before = state.copy()
    assert decide(state, 0.0) == decide(state, 0.0)
    assert state == before


def test_replace_replica_that_died() -> None:
    state = running_app()
    apply(state, ev.ReplicaDied(at=2.0, replica="app#D#2", exit_code=-9, reason="killed"))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaStarting"]
    assert state.replicas["app#D#2"].state is S.STOPPING


def test_kill_after_stop_timeout_once() -> None:
    state = running_app()
    apply(state, ev.ReplicaDied(at=2.0, replica="app#D#1", exit_code=None, reason="x"))
    step(state, 2.0)
    assert step(state, 2.0 + state.stop_timeout_s) == []  # not yet: strictly after
    decisions = step(state, 2.0 + state.stop_timeout_s + 0.5)
    assert kinds(decisions) == ["ReplicaKilled"]
    assert step(state, 100.0) == []  # killed once


def test_replace_unhealthy_after_three_consecutive_failed_health_checks() -> None:
    state = running_app()
    for n in (1, 2):
        apply(state, ev.HealthCheckFailed(at=2.0 + n, replica="app#D#1", consecutive=n, error="t"))
        assert step(state, 2.0 + n) == []
    apply(state, ev.HealthCheckFailed(at=5.0, replica="app#D#1", consecutive=3, error="t"))
    decisions = step(state, 5.0)
    assert kinds(decisions) == ["ReplicaDraining", "ReplicaStarting"]
    assert decisions[0].reason.startswith("unhealthy")  # type: ignore[attr-defined]


def test_health_check_passed_resets_the_count() -> None:
    state = running_app()
    apply(state, ev.HealthCheckFailed(at=2.0, replica="app#D#1", consecutive=2, error="t"))
    apply(state, ev.HealthCheckPassed(at=3.0, replica="app#D#1"))
    assert state.replicas["app#D#1"].health_failures == 0
    assert step(state, 3.0) == []


def test_stop_after_graceful_timeout_while_draining() -> None:
    state = running_app(3)
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="D", num_replicas=2))
    assert kinds(step(state, 2.0)) == ["ReplicaDraining"]
    assert step(state, 6.0) == []
    decisions = step(state, 7.5)
    assert kinds(decisions) == ["ReplicaStopping"]
    assert "graceful_shutdown_timeout_s" in decisions[0].reason  # type: ignore[attr-defined]


def test_stop_after_start_timeout_counts_as_failed_start() -> None:
    state = ClusterState()
    deployed(state, 0.0, cfg=config(num_replicas=1))
    step(state, 0.0)
    decisions = step(state, state.start_timeout_s + 1)
    assert kinds(decisions) == ["ReplicaStopping", "ReplicaStarting"]
    assert decisions[0].reason == REASON_START_TIMEOUT  # type: ignore[attr-defined]
    assert dep_of(state).failures == 1


def test_scale_down_prefers_replicas_still_starting_newest_first() -> None:
    state = running_app(2)
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="D", num_replicas=4))
    step(state, 2.0)  # starts #3 and #4
    apply(state, ev.DeploymentScaled(at=3.0, app="app", deployment="D", num_replicas=1))
    decisions = step(state, 3.0)
    assert [(d.KIND, d.replica) for d in decisions] == [  # type: ignore[attr-defined]
        ("ReplicaStopping", "app#D#4"),
        ("ReplicaStopping", "app#D#3"),
        ("ReplicaDraining", "app#D#2"),
    ]


def test_rolling_update_starts_new_before_draining_old_in_batches_of_20_percent() -> None:
    state = running_app(10, "v1")
    deployed(state, 2.0, "v2", config(num_replicas=10))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaStarting", "ReplicaStarting"]  # 20 % of 10
    assert all(d.code_version == "v2" for d in decisions)  # type: ignore[attr-defined]
    assert sum(r.state is S.RUNNING for r in state.replicas.values()) == 10
    run_all(state, 3.0)
    decisions = step(state, 3.0)
    assert kinds(decisions) == ["ReplicaDraining"] * 2 + ["ReplicaStarting"] * 2
    drained = {d.replica for d in decisions if d.KIND == "ReplicaDraining"}  # type: ignore[attr-defined]
    assert drained == {"app#D#1", "app#D#2"}  # the oldest first
    # never fewer than 10 running, never more than 12 active, until done
    t = 4.0
    while True:
        active = [r for r in state.replicas.values() if r.state in (S.STARTING, S.RUNNING)]
        running = [r for r in state.replicas.values() if r.state is S.RUNNING]
        assert len(active) <= 12 and len(running) >= 10
        if all(r.code_version == "v2" for r in active) and len(running) == 10:
            break
        run_all(state, t)
        step(state, t)
        t += 1
        assert t < 50
    assert deployment_status(dep_of(state))[0] is DeploymentStatus.HEALTHY


def test_stop_outdated_starting_replicas() -> None:
    state = ClusterState()
    deployed(state, 0.0, "v1", config(num_replicas=2))
    step(state, 0.0)
    deployed(state, 1.0, "v2", config(num_replicas=2))
    decisions = step(state, 1.0)
    assert kinds(decisions) == ["ReplicaStopping", "ReplicaStopping"] + ["ReplicaStarting"] * 2
    assert decisions[0].reason == "outdated version"  # type: ignore[attr-defined]


def test_reconfigure_in_place_for_config_only_change() -> None:
    state = running_app(2)
    pids_before = {r.id for r in state.replicas.values()}
    deployed(state, 2.0, "v1", config(num_replicas=2, user_config={"threshold": 5}))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaReconfigured", "ReplicaReconfigured"]
    assert {r.id for r in state.replicas.values()} == pids_before


def test_num_replicas_change_only_scales_no_reconfigure() -> None:
    state = running_app(2)
    deployed(state, 2.0, "v1", config(num_replicas=3))
    assert kinds(step(state, 2.0)) == ["ReplicaStarting"]
    # A new num_replicas is a config update, as in Ray Serve: UPDATING until reached.
    assert deployment_status(dep_of(state))[0] is DeploymentStatus.UPDATING


def test_give_up_after_failure_limit_with_deploy_failed_and_traceback() -> None:
    state = ClusterState()
    deployed(state, 0.0, "v1", config(num_replicas=2))
    t = 0.0
    for _ in range(failure_limit(2)):
        step(state, t)
        starting = next(r for r in state.replicas.values() if r.state is S.STARTING)
        apply(
            state,
            ev.ReplicaStartFailed(at=t, replica=starting.id, error="Traceback\nValueError: bad"),
        )
        t += 1
    decisions = decide(state, t)
    assert "DeploymentFailed" in kinds(decisions)
    step(state, t)
    status, message = deployment_status(dep_of(state))
    assert status is DeploymentStatus.DEPLOY_FAILED
    assert "ValueError: bad" in message
    assert not any(d.KIND == "ReplicaStarting" for d in decide(state, t + 100))


def test_failed_new_version_leaves_old_version_serving() -> None:
    state = running_app(2, "v1")
    deployed(state, 2.0, "v2", config(num_replicas=2))
    t = 2.0
    while not dep_of(state).failed:
        step(state, t)
        for r in list(state.replicas.values()):
            if r.state is S.STARTING:
                apply(state, ev.ReplicaStartFailed(at=t, replica=r.id, error="boom"))
        t += 1
        assert t < 100
    old = [r for r in state.replicas.values() if r.code_version == "v1"]
    assert len(old) == 2 and all(r.state is S.RUNNING for r in old)


def test_forget_deleted_app_after_its_replicas_exit() -> None:
    state = running_app(2)
    apply(state, ev.AppDeleted(at=2.0, app="app"))
    assert kinds(step(state, 2.0)) == ["ReplicaDraining", "ReplicaDraining"]
    for r in list(state.replicas.values()):
        apply(state, ev.ReplicaDrained(at=3.0, replica=r.id))
        apply(state, ev.ReplicaExited(at=3.0, replica=r.id, exit_code=0))
    assert kinds(step(state, 3.0)) == ["DeploymentRemoved", "AppRemoved"]
    assert state.apps == {} and state.replicas == {}


def test_autoscale_scales_up_after_delay_and_records_evidence() -> None:
    auto = AutoscalingConfig(
        min_replicas=1, max_replicas=5, upscale_delay_s=2, look_back_period_s=2
    )
    state = ClusterState()
    deployed(state, 0.0, cfg=config(num_replicas=None, autoscaling_config=auto))
    step(state, 0.0)
    run_all(state, 0.5)
    samples = [LoadSample(t / 2, ongoing=5.0, queued=3.0) for t in range(0, 13)]
    load = {("app", "D"): samples}
    assert step(state, 1.0, {("app", "D"): samples[:3]}) == []  # not observed for 2 s yet
    decisions = step(state, 6.0, load)
    assert kinds(decisions) == ["AutoscaleDecision"] + ["ReplicaStarting"] * 3
    decision = decisions[0]
    assert (decision.from_replicas, decision.to_replicas) == (1, 4)  # type: ignore[attr-defined]
    assert decision.evidence["samples"]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- placement

NEVER = "lower ray_actor_options or start the instance with more resources."


def on_instance(resources: dict[str, float] | None) -> ClusterState:
    state = ClusterState()
    apply(state, ev.ControllerStarted(at=0.0, instance_id="i", pid=1, resources=resources))
    return state


def deploy_many(state: ClusterState, at: float, **deps: tuple[str, int, dict[str, Any]]) -> None:
    """Deploy ``app`` with deployments ``name=(code_version, num_replicas, ray_actor_options)``."""
    specs = tuple(
        DeploymentSpec(
            name=name,
            code_version=version,
            config=config(num_replicas=n, ray_actor_options=actor),
        )
        for name, (version, n, actor) in deps.items()
    )
    apply(
        state,
        ev.AppDeployed(
            at=at, app="app", route_prefix="/", ingress=specs[0].name, deployments=specs
        ),
    )


def check_prefix_closed(state: ClusterState, now: float) -> list[Event]:
    """Decide; check that applying each decision leaves exactly the rest; apply all."""
    decisions = decide(state, now)
    for i, decision in enumerate(decisions):
        assert decide(state, now) == decisions[i:]
        apply(state, decision)
    assert decide(state, now) == []
    return decisions


def starts(decisions: list[Event]) -> list[tuple[str, tuple[int, ...]]]:
    return [(d.replica, d.gpu_ids) for d in decisions if isinstance(d, ev.ReplicaStarting)]


def pending(decisions: list[Event]) -> list[str]:
    return [d.message for d in decisions if isinstance(d, ev.DeploymentPending)]


def gone(state: ClusterState, replica: str, at: float) -> None:
    """The replica's process died and was reaped."""
    apply(state, ev.ReplicaDied(at=at, replica=replica, exit_code=-9, reason="killed"))
    apply(state, ev.ReplicaExited(at=at, replica=replica, exit_code=-9))


def test_a_gpu_deployment_on_an_instance_without_gpus_stays_pending() -> None:
    state = on_instance({"CPU": 8.0, "GPU": 0.0, "memory": 2.0**34})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}))

    decisions = check_prefix_closed(state, 0.0)

    assert starts(decisions) == []
    message = (
        "1 replica of 'Model' cannot be placed: it needs {'GPU': 1.0}, more than the instance "
        "has ({'GPU': 0.0}); " + NEVER
    )
    assert decisions == [
        ev.DeploymentPending(at=0.0, app="app", deployment="Model", message=message)
    ]
    dep = state.deployment("app", "Model")
    assert dep.pending == message and state.replicas == {}
    status, text = deployment_status(dep)
    assert status is DeploymentStatus.UPDATING
    assert text == f"Deploying: 0 of 1 replicas running the new version. {message}"
    assert check_prefix_closed(state, 100.0) == []  # once per change of message


def test_two_whole_gpu_replicas_on_one_gpu_one_waits_until_the_first_is_gone() -> None:
    state = on_instance({"CPU": 8.0, "GPU": 1.0})
    deploy_many(state, 0.0, Model=("v1", 2, {"num_gpus": 1, "num_cpus": 1}))

    decisions = check_prefix_closed(state, 0.0)

    assert kinds(decisions) == ["ReplicaStarting", "DeploymentPending"]
    assert starts(decisions) == [("app#Model#1", (0,))]
    waiting = (
        "1 replica of 'Model' cannot be placed: it needs {'CPU': 1.0, 'GPU': 1.0} and the "
        "instance has {'GPU': 0.0} free of {'GPU': 1.0}."
    )
    assert pending(decisions) == [waiting]
    assert state.replicas["app#Model#1"].gpu_ids == (0,)
    assert in_use(state) == {"CPU": 1.0, "GPU": 1.0}

    # Stopping is not gone: the GPU is still held, now both replicas wait.
    run_all(state, 1.0)
    apply(state, ev.ReplicaDied(at=2.0, replica="app#Model#1", exit_code=-9, reason="killed"))
    decisions = check_prefix_closed(state, 2.0)
    assert kinds(decisions) == ["DeploymentPending"]
    assert pending(decisions)[0].startswith("2 replicas of 'Model' cannot be placed")
    apply(state, ev.ReplicaExited(at=3.0, replica="app#Model#1", exit_code=-9))

    decisions = check_prefix_closed(state, 3.0)
    assert starts(decisions) == [("app#Model#2", (0,))]
    assert pending(decisions) == [waiting]  # the other one still waits


def test_pending_is_cleared_after_a_scale_down() -> None:
    state = on_instance({"GPU": 1.0})
    deploy_many(state, 0.0, Model=("v1", 3, {"num_gpus": 1}))
    decisions = check_prefix_closed(state, 0.0)
    assert pending(decisions) == [
        "2 replicas of 'Model' cannot be placed: each needs {'GPU': 1.0} and the instance "
        "has {'GPU': 0.0} free of {'GPU': 1.0}."
    ]
    run_all(state, 1.0)
    assert check_prefix_closed(state, 1.0) == []
    status, text = deployment_status(state.deployment("app", "Model"))
    assert status is DeploymentStatus.UPDATING and "2 replicas of 'Model'" in text

    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="Model", num_replicas=1))
    decisions = check_prefix_closed(state, 2.0)

    assert decisions == [ev.DeploymentPending(at=2.0, app="app", deployment="Model", message="")]
    dep = state.deployment("app", "Model")
    assert dep.pending == ""
    assert deployment_status(dep) == (DeploymentStatus.HEALTHY, "")


def test_a_start_clears_the_pending_message_when_everything_is_placed() -> None:
    state = on_instance({"GPU": 1.0})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}), Other=("v1", 1, {"num_gpus": 1}))
    check_prefix_closed(state, 0.0)
    assert state.deployment("app", "Other").pending
    gone(state, "app#Model#1", 1.0)
    apply(state, ev.DeploymentScaled(at=1.0, app="app", deployment="Model", num_replicas=0))

    decisions = check_prefix_closed(state, 1.0)

    assert kinds(decisions) == ["ReplicaStarting"]  # no DeploymentPending("") needed
    assert starts(decisions) == [("app#Other#2", (0,))]
    assert state.deployment("app", "Other").pending == ""


def test_pending_is_dropped_with_its_deployment() -> None:
    state = on_instance({"GPU": 0.0})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}))
    check_prefix_closed(state, 0.0)
    apply(state, ev.AppDeleted(at=1.0, app="app"))

    assert kinds(check_prefix_closed(state, 1.0)) == ["DeploymentRemoved", "AppRemoved"]


def test_half_gpus_share_gpu_zero() -> None:
    state = on_instance({"GPU": 2.0})
    deploy_many(state, 0.0, Model=("v1", 2, {"num_gpus": 0.5}))

    decisions = check_prefix_closed(state, 0.0)

    assert starts(decisions) == [("app#Model#1", (0,)), ("app#Model#2", (0,))]
    assert pending(decisions) == []
    assert gpu_use(state) == {0: 1.0}


def test_whole_and_fractional_gpus_never_share_a_gpu() -> None:
    state = on_instance({"GPU": 2.0})
    deploy_many(state, 0.0, Small=("v1", 1, {"num_gpus": 0.25}), Big=("v1", 2, {"num_gpus": 1}))

    decisions = check_prefix_closed(state, 0.0)

    assert starts(decisions) == [("app#Small#1", (0,)), ("app#Big#2", (1,))]
    assert pending(decisions) == [
        "1 replica of 'Big' cannot be placed: it needs {'GPU': 1.0} and the instance has "
        "{'GPU': 0.75} free of {'GPU': 2.0}."
    ]


def test_cpu_memory_and_custom_resources_limit_how_many_replicas_start() -> None:
    state = on_instance({"CPU": 2.0, "memory": 3.0 * 2**30, "accelerator": 1.0})
    deploy_many(
        state,
        0.0,
        Web=("v1", 3, {"num_cpus": 1, "memory": 2**30}),
        Acc=("v1", 2, {"resources": {"accelerator": 1}}),
        Free=("v1", 2, None),
    )

    decisions = check_prefix_closed(state, 0.0)

    assert [r for r, _ in starts(decisions)] == [
        "app#Web#1",
        "app#Web#2",
        "app#Acc#3",
        "app#Free#4",
        "app#Free#5",
    ]
    assert pending(decisions) == [
        "1 replica of 'Web' cannot be placed: it needs {'CPU': 1.0, 'memory': 1073741824.0} "
        "and the instance has {'CPU': 0.0} free of {'CPU': 2.0}.",
        "1 replica of 'Acc' cannot be placed: it needs {'accelerator': 1.0} and the instance "
        "has {'accelerator': 0.0} free of {'accelerator': 1.0}.",
    ]
    assert in_use(state) == {"CPU": 2.0, "memory": 2.0 * 2**30, "accelerator": 1.0}


def test_an_undeclared_custom_resource_can_never_fit() -> None:
    state = on_instance({"CPU": 2.0})
    deploy_many(state, 0.0, Acc=("v1", 1, {"resources": {"accelerator": 1}}))

    assert pending(check_prefix_closed(state, 0.0)) == [
        "1 replica of 'Acc' cannot be placed: it needs {'accelerator': 1.0}, more than the "
        "instance has ({'accelerator': 0.0}); " + NEVER
    ]


def test_without_resources_everything_is_placed_and_no_gpu_is_assigned() -> None:
    state = on_instance(None)
    deploy_many(state, 0.0, Model=("v1", 3, {"num_gpus": 1, "num_cpus": 64}))

    decisions = check_prefix_closed(state, 0.0)

    assert starts(decisions) == [(f"app#Model#{n}", ()) for n in (1, 2, 3)]
    assert pending(decisions) == []


def test_an_earlier_deployment_uses_what_it_can_first_and_decide_stays_prefix_closed() -> None:
    state = on_instance({"CPU": 4.0})
    deploy_many(state, 0.0, Big=("v1", 2, {"num_cpus": 3}), Small=("v1", 1, {"num_cpus": 1}))

    decisions = check_prefix_closed(state, 0.0)

    # The message is computed after every start: Small's replica is counted in it.
    assert kinds(decisions) == ["ReplicaStarting", "ReplicaStarting", "DeploymentPending"]
    assert pending(decisions) == [
        "1 replica of 'Big' cannot be placed: it needs {'CPU': 3.0} and the instance has "
        "{'CPU': 0.0} free of {'CPU': 4.0}."
    ]


def test_scale_up_on_a_full_instance_is_upscaling_with_the_reason() -> None:
    state = on_instance({"GPU": 1.0})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}))
    check_prefix_closed(state, 0.0)
    run_all(state, 1.0)
    check_prefix_closed(state, 1.0)
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="Model", num_replicas=2))

    decisions = check_prefix_closed(state, 2.0)

    assert kinds(decisions) == ["DeploymentPending"]
    status, text = deployment_status(state.deployment("app", "Model"))
    assert status is DeploymentStatus.UPSCALING
    assert text == f"Upscaling from 1 to 2 replicas (scaled by hand to 2). {pending(decisions)[0]}"


def test_a_rolling_update_on_a_full_gpu_instance_waits_for_room() -> None:
    state = on_instance({"GPU": 1.0})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}))
    check_prefix_closed(state, 0.0)
    run_all(state, 1.0)
    check_prefix_closed(state, 1.0)
    deploy_many(state, 2.0, Model=("v2", 1, {"num_gpus": 1}))

    decisions = check_prefix_closed(state, 2.0)

    assert kinds(decisions) == ["DeploymentPending"]  # the old replica keeps serving
    (message,) = pending(decisions)
    assert message == (
        "1 replica of 'Model' cannot be placed: it needs {'GPU': 1.0} and the instance has "
        "{'GPU': 0.0} free of {'GPU': 1.0}. A rolling update starts new replicas before it "
        "stops old ones, so it waits until there is room for them."
    )
    assert deployment_status(state.deployment("app", "Model"))[0] is DeploymentStatus.UPDATING
    assert state.replicas["app#Model#1"].state is S.RUNNING

    # Room is made (here: the old replica is gone): the new version starts on GPU 0.
    gone(state, "app#Model#1", 3.0)
    decisions = check_prefix_closed(state, 3.0)
    assert starts(decisions) == [("app#Model#2", (0,))]
    assert kinds(decisions) == ["ReplicaStarting"]
    assert state.deployment("app", "Model").pending == ""


def test_a_new_controller_with_no_accounting_clears_pending() -> None:
    state = on_instance({"GPU": 0.0})
    deploy_many(state, 0.0, Model=("v1", 1, {"num_gpus": 1}))
    check_prefix_closed(state, 0.0)
    apply(state, ev.ControllerStarted(at=1.0, instance_id="i", pid=2, resources=None))

    decisions = check_prefix_closed(state, 1.0)

    assert starts(decisions) == [("app#Model#1", ())]
    assert kinds(decisions) == ["ReplicaStarting"]  # the start cleared the message
    assert state.deployment("app", "Model").pending == ""


@pytest.mark.parametrize("seed", range(40))
def test_random_life_never_overbooks_and_decide_stays_prefix_closed(seed: int) -> None:
    rng = random.Random(seed)
    total = {"CPU": 4.0, "GPU": 3.0, "accelerator": 2.0}
    state = on_instance(total)
    options = [
        None,
        {"num_cpus": 1},
        {"num_gpus": 1},
        {"num_gpus": 0.5},
        {"num_gpus": 0.25, "num_cpus": 0.5},
        {"num_gpus": 2},
        {"num_gpus": 4},
        {"resources": {"accelerator": 1}},
    ]
    now = 0.0
    for _ in range(60):
        now += 1.0
        op = rng.randrange(6)
        if op == 0:
            deps = {
                name: (rng.choice(["v1", "v2"]), rng.randint(1, 4), rng.choice(options))
                for name in rng.sample(["A", "B", "C"], rng.randint(1, 3))
            }
            deploy_many(state, now, **deps)
        elif op == 1 and state.apps:
            name = rng.choice(sorted(state.apps["app"].deployments))
            if state.apps["app"].deployments[name].wanted:
                apply(
                    state,
                    ev.DeploymentScaled(
                        at=now, app="app", deployment=name, num_replicas=rng.randint(0, 4)
                    ),
                )
        elif op == 2:
            run_all(state, now)
        elif op == 3 and state.replicas:
            replica = state.replicas[rng.choice(sorted(state.replicas))]
            if replica.state is S.STOPPING:
                apply(state, ev.ReplicaExited(at=now, replica=replica.id, exit_code=0))
            elif replica.state is S.DRAINING:
                apply(state, ev.ReplicaDrained(at=now, replica=replica.id))
            else:
                gone(state, replica.id, now)
        elif op == 4 and state.apps and not state.apps["app"].deleting:
            apply(state, ev.AppDeleted(at=now, app="app"))
        check_prefix_closed(state, now)
        used = in_use(state)
        assert all(used[name] <= total.get(name, 0.0) + 1e-9 for name in used), used
        assert all(f <= 1.0 + 1e-9 for f in gpu_use(state).values())
        whole = [r.gpu_ids for r in state.replicas.values() if r.demand.get("GPU", 0) >= 1]
        owned = [gpu for ids in whole for gpu in ids]
        assert len(owned) == len(set(owned))  # a whole GPU is nobody else's
        for r in state.replicas.values():
            if r.demand.get("GPU", 0) >= 1:
                assert all(gpu_use(state)[g] == 1.0 for g in r.gpu_ids)
        assert state_from_bytes(state_to_bytes(state)) == state


def test_placement_decisions_verify_from_the_log_and_survive_a_reopen(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    journal = Journal.open(log, snapshot_every=4)
    journal.record(
        [ev.ControllerStarted(at=0.0, instance_id=log.instance_id, pid=1, resources={"GPU": 2})]
    )
    specs = (
        DeploymentSpec(
            name="Half",
            code_version="v1",
            config=config(num_replicas=3, ray_actor_options={"num_gpus": 0.5}),
        ),
        DeploymentSpec(
            name="Whole",
            code_version="v1",
            config=config(num_replicas=2, ray_actor_options={"num_gpus": 1}),
        ),
    )
    journal.record(
        [ev.AppDeployed(at=0.0, app="app", route_prefix="/", ingress="Half", deployments=specs)]
    )
    first = journal.step(1.0)
    assert starts(first) == [("app#Half#1", (0,)), ("app#Half#2", (0,)), ("app#Half#3", (1,))]
    assert pending(first) == [
        "2 replicas of 'Whole' cannot be placed: each needs {'GPU': 1.0} and the instance "
        "has {'GPU': 0.5} free of {'GPU': 2.0}."
    ]
    journal.record([ev.DeploymentScaled(at=2.0, app="app", deployment="Half", num_replicas=2)])
    journal.step(2.0)  # stops Half#3, which still holds GPU 1
    journal.record([ev.ReplicaExited(at=3.0, replica="app#Half#3", exit_code=0)])
    later = journal.step(3.0)
    assert starts(later) == [("app#Whole#4", (1,))]
    assert pending(later)[0].startswith("1 replica of 'Whole' cannot be placed")
    live = journal.state.copy()
    log.close()

    log = EventLog.open(tmp_path / "events.db")
    try:
        report = verify(log)
        assert report.ok, report.problem
        assert report.decisions >= 6 and report.snapshots >= 1
        assert Journal.open(log).state == live
    finally:
        log.close()
