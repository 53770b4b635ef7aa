"""The controller at scale: 1,000 deployments of 10 replicas each in the simulated world.

:func:`run_scale` deploys ``num_deployments`` deployments (10 per application)
of ``replicas_each`` replicas through a :class:`~simulations.world.World`, lets
virtual time pass until the world has converged, and measures:

* the wall time to converge (deploy, start every replica, observe it running);
* the wall time of one ``decide(state, now)`` pass over the converged state
  (the median of several passes), beside the time merely to iterate over every
  replica of the state in a Python loop (the floor for any pass);
* the same at a tenth of the size (100 deployments, 1,000 replicas), for
  comparison;
* the number of events in the log.

Run it with ``python -m simulations.scale`` (``--help`` for the sizes).

The world is driven in two ways that differ from the fault-injecting
scenarios, to keep the run short without testing anything less: the
prefix-closure check is off (it re-runs ``decide`` once per decision, which is
quadratic: 10,000 passes over a growing state), and the applications are
recorded first and decided on once (:meth:`ScaleWorld.deploy_all`) instead of
one controller pass, and its idempotency check, per application. Snapshots are
off while converging. :meth:`World.check_safety` replays the whole log, so it
runs once, at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from simulations.world import World, sim_config
from trioserve.core.reconcile import decide
from trioserve.core.state import ClusterState, ReplicaState

__all__ = [
    "DEPLOYMENTS_PER_APP",
    "DecideTiming",
    "ScaleReport",
    "ScaleWorld",
    "converge",
    "iterate_replicas",
    "main",
    "median_time",
    "run_scale",
    "time_decide",
]

T = TypeVar("T")

DEPLOYMENTS_PER_APP = 10
SNAPSHOT_EVERY = 10**9
"""Never snapshot while converging: a snapshot of 10,000 replicas is not what is measured."""
MAX_VIRTUAL_S = 300.0
"""Virtual time allowed to converge (replicas take 0.5-3 s to start)."""
DECIDE_PASSES = 7


class ScaleWorld(World):
    """A :class:`World` that can deploy many applications with one controller pass."""

    _holding = False

    def control(self) -> None:
        if not self._holding:
            super().control()

    def deploy_all(self, num_deployments: int, replicas_each: int) -> None:
        """Deploy ``num_deployments`` deployments, 10 per application, then decide once."""
        config = sim_config(replicas_each)
        apps = math.ceil(num_deployments / DEPLOYMENTS_PER_APP)
        self._holding = True
        try:
            for a in range(apps):
                first = a * DEPLOYMENTS_PER_APP
                count = min(DEPLOYMENTS_PER_APP, num_deployments - first)
                self.deploy(f"app{a:03d}", [(f"d{d}", "v1", config) for d in range(count)])
        finally:
            self._holding = False
        self.control()


@contextlib.contextmanager
def _log_path(log_path: Path | None) -> Iterator[Path]:
    if log_path is not None:
        yield Path(log_path)
        return
    with tempfile.TemporaryDirectory(prefix="trioserve-scale-") as tmp:
        yield Path(tmp) / "events.db"


def converge(
    world: ScaleWorld, num_deployments: int, replicas_each: int, max_virtual_s: float
) -> None:
    """Deploy and advance virtual time until converged; raise with the reason if not."""
    world.deploy_all(num_deployments, replicas_each)
    while (problem := world.converged()) is not None:
        if world.now >= max_virtual_s:
            raise AssertionError(
                f"not converged after {max_virtual_s:g}s of virtual time "
                f"({num_deployments} deployments x {replicas_each} replicas): {problem}"
            )
        world.advance(1.0)


def iterate_replicas(state: ClusterState) -> int:
    """Visit every replica of every deployment, as any pass over the state must."""
    n = 0
    for app in state.apps.values():
        for dep in app.deployments.values():
            for r in dep.replicas.values():
                if r.state is not None:
                    n += 1
    return n


def median_time(fn: Callable[[], T], runs: int = 1) -> tuple[float, float, T]:
    """Call ``fn`` ``runs`` times: the median and the least wall time, and the last result."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), result


@dataclasses.dataclass(frozen=True)
class DecideTiming:
    """One ``decide`` pass over a converged state, and the iteration floor."""

    deployments: int
    replicas: int
    decide_s: float
    """Median over ``passes`` passes."""
    decide_min_s: float
    iterate_s: float
    """Median time to iterate over every replica (the floor)."""
    passes: int
    decisions: int
    """Decisions the pass returned: 0 on a converged state."""

    @property
    def overhead(self) -> float:
        return self.decide_s / self.iterate_s if self.iterate_s else math.inf


def time_decide(state: ClusterState, now: float, passes: int = DECIDE_PASSES) -> DecideTiming:
    """Time ``decide(state, now)`` and the bare iteration over ``state``'s replicas."""
    decisions = decide(state, now)  # warm-up, and the answer
    decide_s, decide_min_s, _ = median_time(lambda: decide(state, now), passes)
    iterate_s, _, _ = median_time(lambda: iterate_replicas(state), passes)
    return DecideTiming(
        deployments=sum(len(a.deployments) for a in state.apps.values()),
        replicas=len(state.replicas),
        decide_s=decide_s,
        decide_min_s=decide_min_s,
        iterate_s=iterate_s,
        passes=passes,
        decisions=len(decisions),
    )


@dataclasses.dataclass(frozen=True)
class ScaleReport:
    """What :func:`run_scale` measured."""

    num_deployments: int
    replicas_each: int
    running: int
    """RUNNING replicas in the converged state."""
    events: int
    """Events in the log when converged."""
    virtual_s: float
    """Virtual time the world took to converge."""
    converge_s: float
    """Wall time to deploy and converge."""
    safety_s: float
    """Wall time of the one :meth:`World.check_safety` at the end (replays the log)."""
    decide: DecideTiming
    decide_small: DecideTiming | None
    """The same pass over a world a tenth the size (``None`` if not measured)."""

    def lines(self) -> list[str]:
        d, s = self.decide, self.decide_small
        out = [
            f"scale: {self.num_deployments} deployments x {self.replicas_each} replicas "
            f"= {self.running} running replicas",
            f"  converged in {self.converge_s:.1f} s wall ({self.virtual_s:g} s virtual), "
            f"{self.events} events in the log; check_safety {self.safety_s:.1f} s",
        ]
        for t in (s, d):
            if t is None:
                continue
            out.append(
                f"  decide over {t.replicas:>6} replicas: {t.decide_s * 1e3:7.2f} ms median "
                f"(min {t.decide_min_s * 1e3:.2f}, {t.passes} passes, {t.decisions} decisions); "
                f"iterating them: {t.iterate_s * 1e6:.0f} us ({t.overhead:.0f}x)"
            )
        return out


def run_scale(
    num_deployments: int = 1000,
    replicas_each: int = 10,
    seed: int = 0,
    log_path: Path | None = None,
    *,
    compare_small: bool = True,
    max_virtual_s: float = MAX_VIRTUAL_S,
    passes: int = DECIDE_PASSES,
) -> ScaleReport:
    """Converge ``num_deployments`` x ``replicas_each`` replicas and time ``decide``.

    ``log_path`` is the event log to write (a temporary one by default; it
    must not exist yet). With ``compare_small``, a second world of a tenth of
    the deployments (in a temporary folder) gives the comparison figure.
    Raises :class:`AssertionError` naming what is off if the world does not
    converge within ``max_virtual_s``, and
    :class:`~simulations.world.SafetyViolation` if an invariant breaks.
    """
    small = None
    if compare_small:
        small_n = max(1, num_deployments // 10)
        with _log_path(None) as path:
            world = ScaleWorld(
                seed, path, snapshot_every=SNAPSHOT_EVERY, check_prefix_closure=False
            )
            try:
                converge(world, small_n, replicas_each, max_virtual_s)
                small = time_decide(world.state, world.now, passes)
            finally:
                world.close()

    with _log_path(log_path) as path:
        t0 = time.perf_counter()
        world = ScaleWorld(seed, path, snapshot_every=SNAPSHOT_EVERY, check_prefix_closure=False)
        try:
            converge(world, num_deployments, replicas_each, max_virtual_s)
            converge_s = time.perf_counter() - t0
            timing = time_decide(world.state, world.now, passes)
            t1 = time.perf_counter()
            world.check_safety()
            safety_s = time.perf_counter() - t1
            return ScaleReport(
                num_deployments=num_deployments,
                replicas_each=replicas_each,
                running=sum(
                    1 for r in world.state.replicas.values() if r.state is ReplicaState.RUNNING
                ),
                events=world.log.last_seq(),
                virtual_s=world.now,
                converge_s=converge_s,
                safety_s=safety_s,
                decide=timing,
                decide_small=small,
            )
        finally:
            world.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.scale", description=__doc__)
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--replicas-each", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run_scale(args.deployments, args.replicas_each, args.seed)
    print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
