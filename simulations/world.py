"""A simulated world for the controller: virtual time, fake processes, real decisions.

The controller's own code runs here unchanged - the :class:`~trioserve.core.journal.Journal`
over a real SQLite event log, :func:`~trioserve.core.reconcile.decide`, the
autoscaling policy - while the world around it is simulated: replicas take
time to start, some constructors fail or hang, running replicas crash, hang
their health checks, drain slowly or refuse to stop; clients keep requests in
flight; the controller itself restarts from its log. Every random choice comes
from one seed, so a run is reproduced exactly by its seed and its steps.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Iterable
from pathlib import Path

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.journal import Journal
from trioserve.core.reconcile import ROLLING_BATCH_FRACTION, decide
from trioserve.core.state import (
    ClusterState,
    IllegalTransition,
    ReplicaState,
    apply,
    replay,
)
from trioserve.store import EventLog

TICK_S = 0.5
SAMPLE_EVERY_S = 1.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

BAD_VERSION = "bad"
"""Code version whose constructor always raises."""
HANGING_VERSION = "hangs"
"""Code version whose constructor never returns."""


class SafetyViolation(AssertionError):
    """An invariant that must hold after every step did not."""


@dataclasses.dataclass
class Proc:
    """A simulated replica process."""

    id: str
    app: str
    deployment: str
    code_version: str
    pid: int
    ready_at: float | None
    """When the constructor returns (None: never)."""
    fails: bool = False
    alive: bool = True
    draining_until: float | None = None
    exits_at: float | None = None
    inflight: int = 0
    hung: bool = False
    """Health checks time out, drains never finish, SIGTERM is ignored."""
    slow_drain: bool = False
    faulty: bool = False
    health_failures: int = 0
    next_health_at: float = 0.0
    exit_code: int = 0


def sim_config(
    num_replicas: int | None = 2,
    *,
    autoscaling: bool = False,
    min_replicas: int = 1,
    max_replicas: int = 6,
    user_config: object = None,
) -> DeploymentConfig:
    """A deployment config with timings scaled for simulation."""
    auto = None
    if autoscaling:
        auto = AutoscalingConfig(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_ongoing_requests=2,
            look_back_period_s=3,
            upscale_delay_s=2,
            downscale_delay_s=10,
            downscale_to_zero_delay_s=20,
        )
        num_replicas = None
    return DeploymentConfig(
        num_replicas=num_replicas,
        autoscaling_config=auto,
        max_ongoing_requests=5,
        user_config=user_config,
        health_check_period_s=2.0,
        health_check_timeout_s=1.0,
        graceful_shutdown_timeout_s=5.0,
        graceful_shutdown_wait_loop_s=0.5,
    )


class World:
    """The simulated world around one controller, from one seed."""

    def __init__(
        self,
        seed: int,
        log_path: Path,
        *,
        snapshot_every: int = 50,
        check_prefix_closure: bool = True,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.log_path = log_path
        self.snapshot_every = snapshot_every
        self.check_prefix_closure = check_prefix_closure
        self.log = EventLog.open(log_path)
        self.journal = Journal.open(self.log, snapshot_every=snapshot_every)
        self.procs: dict[str, Proc] = {}
        self.offered: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.samples: dict[tuple[str, str], collections.deque[LoadSample]] = {}
        self.next_sample_at = 0.0
        self.next_pid = 1000
        self.faults = True
        self.dropped_healthy = 0
        """Requests lost on replicas that were stopped while busy but not faulty."""
        self.decisions = 0
        self._controller_started()

    # ------------------------------------------------------------------ controller

    @property
    def state(self) -> ClusterState:
        return self.journal.state

    def _controller_started(self) -> None:
        self.journal.record(
            [
                ev.ControllerStarted(
                    at=self.now,
                    instance_id=self.log.instance_id,
                    pid=1,
                    start_timeout_s=START_TIMEOUT_S,
                    stop_timeout_s=STOP_TIMEOUT_S,
                )
            ]
        )

    def restart_controller(self) -> None:
        """Drop the controller's memory and start a new one from the log."""
        before = self.journal.state.copy()
        self.log.close()
        self.log = EventLog.open(self.log_path)
        self.journal = Journal.open(self.log, snapshot_every=self.snapshot_every)
        if self.journal.state != before:
            raise SafetyViolation("state loaded from snapshot + tail differs from live state")
        self._controller_started()
        self.control()

    def observe(self, event: Event) -> bool:
        """Report an observation as the controller shell would; stale ones are dropped."""
        try:
            self.journal.record([event], durable=False)
        except IllegalTransition:
            return False
        if isinstance(event, (ev.ReplicaDrained, ev.ReplicaStartFailed, ev.ReplicaDied)):
            # The replica entered STOPPING through an observation: the shell
            # stops its process just as it does after a ReplicaStopping decision.
            self._stop(event.replica)
        return True

    def control(self) -> None:
        """One controller pass: decide, record, carry out."""
        load = self._load_for_autoscaling()
        state = self.journal.state
        if self.check_prefix_closure:
            before = state.copy()
        decisions = self.journal.step(self.now, load)
        if not decisions:
            return
        self.decisions += len(decisions)
        if self.check_prefix_closure:
            self._check_prefix_closed(before, decisions, load)
        again = decide(self.journal.state, self.now, load)
        if again:
            raise SafetyViolation(f"decide is not idempotent: after its decisions, {again}")
        for decision in decisions:
            self._carry_out(decision)

    def _check_prefix_closed(
        self, before: ClusterState, decisions: list[Event], load: object
    ) -> None:
        state = before
        for i, decision in enumerate(decisions):
            rest = decide(state, self.now, load)  # type: ignore[arg-type]
            if rest != decisions[i:]:
                raise SafetyViolation(
                    f"decide is not prefix-closed at {decision!r}: expected "
                    f"{decisions[i:]!r}, got {rest!r}"
                )
            apply(state, decision)

    # -------------------------------------------------------------------- effectors

    def _carry_out(self, decision: Event) -> None:
        if isinstance(decision, ev.ReplicaStarting):
            self.next_pid += 1
            version = decision.code_version
            latency = self.rng.uniform(0.5, 3.0)
            proc = Proc(
                id=decision.replica,
                app=decision.app,
                deployment=decision.deployment,
                code_version=version,
                pid=self.next_pid,
                ready_at=None if version.startswith(HANGING_VERSION) else self.now + latency,
                fails=version.startswith(BAD_VERSION),
            )
            self.procs[proc.id] = proc
        elif isinstance(decision, ev.ReplicaDraining):
            proc = self.procs[decision.replica]
            if proc.hung:
                proc.draining_until = None
            elif proc.slow_drain:
                proc.draining_until = self.now + 1000.0
            else:
                proc.draining_until = self.now + self.rng.uniform(0.1, 2.0)
        elif isinstance(decision, ev.ReplicaStopping):
            self._stop(decision.replica)
        elif isinstance(decision, ev.ReplicaKilled):
            proc = self.procs[decision.replica]
            proc.alive = False
            proc.exit_code = -9
            proc.exits_at = self.now

    def _stop(self, replica: str) -> None:
        """SIGTERM: the process exits shortly, unless it hangs."""
        proc = self.procs[replica]
        if proc.inflight and not proc.faulty:
            self.dropped_healthy += proc.inflight
        proc.inflight = 0
        if not proc.alive:
            proc.exits_at = self.now
        elif proc.hung:
            proc.exits_at = None  # ignores SIGTERM: must be killed
        else:
            proc.exits_at = self.now + self.rng.uniform(0.1, 1.0)

    # ------------------------------------------------------------------------ world

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, tick by tick."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + TICK_S, 6)
            self._tick()

    def _tick(self) -> None:
        for proc in list(self.procs.values()):
            replica = self.state.replicas.get(proc.id)
            if replica is None:
                continue
            rs = replica.state
            if rs is ReplicaState.STARTING and proc.alive:
                if proc.ready_at is not None and proc.ready_at <= self.now:
                    if proc.fails:
                        proc.alive = False
                        self.observe(
                            ev.ReplicaStartFailed(
                                at=self.now,
                                replica=proc.id,
                                error=(
                                    "Traceback (most recent call last):\n"
                                    '  File "app.py", line 7, in __init__\n'
                                    "RuntimeError: model weights not found"
                                ),
                            )
                        )
                    else:
                        proc.next_health_at = self.now
                        self.observe(
                            ev.ReplicaRunning(
                                at=self.now,
                                replica=proc.id,
                                address=f"sim://{proc.id}",
                                pid=proc.pid,
                            )
                        )
            elif rs is ReplicaState.RUNNING:
                if not proc.alive:
                    self.observe(
                        ev.ReplicaDied(
                            at=self.now, replica=proc.id, exit_code=-9, reason="killed by signal 9"
                        )
                    )
                elif proc.next_health_at <= self.now:
                    period = self.state.deployment_of(replica).spec.config.health_check_period_s
                    proc.next_health_at = self.now + period
                    if proc.hung:
                        proc.health_failures += 1
                        self.observe(
                            ev.HealthCheckFailed(
                                at=self.now,
                                replica=proc.id,
                                consecutive=proc.health_failures,
                                error="health check timed out",
                            )
                        )
                    elif proc.health_failures:
                        proc.health_failures = 0
                        self.observe(ev.HealthCheckPassed(at=self.now, replica=proc.id))
            elif rs is ReplicaState.DRAINING:
                if not proc.alive:
                    self.observe(
                        ev.ReplicaDied(
                            at=self.now, replica=proc.id, exit_code=-9, reason="killed by signal 9"
                        )
                    )
                elif proc.draining_until is not None and proc.draining_until <= self.now:
                    proc.inflight = 0
                    self.observe(ev.ReplicaDrained(at=self.now, replica=proc.id))
            elif rs is ReplicaState.STOPPING:
                if proc.exits_at is not None and proc.exits_at <= self.now:
                    proc.alive = False
                    if self.observe(
                        ev.ReplicaExited(
                            at=self.now,
                            replica=proc.id,
                            exit_code=proc.exit_code,
                        )
                    ):
                        del self.procs[proc.id]
            elif rs is ReplicaState.STARTING and not proc.alive:
                self.observe(
                    ev.ReplicaDied(
                        at=self.now, replica=proc.id, exit_code=-9, reason="killed by signal 9"
                    )
                )
        self._route_load()
        self.control()

    def _route_load(self) -> None:
        """Spread each deployment's in-flight requests over its running replicas."""
        take_sample = self.now >= self.next_sample_at
        if take_sample:
            self.next_sample_at = self.now + SAMPLE_EVERY_S
        for app in self.state.apps.values():
            for dep in app.deployments.values():
                key = (app.name, dep.name)
                running = [
                    self.procs[r.id]
                    for r in dep.replicas.values()
                    if r.state is ReplicaState.RUNNING and r.id in self.procs
                ]
                offered = self.offered.get(key, 0) if dep.wanted else 0
                capacity = dep.spec.config.max_ongoing_requests
                ongoing = min(offered, capacity * len(running))
                for i, proc in enumerate(running):
                    proc.inflight = ongoing // len(running) + (i < ongoing % len(running))
                if take_sample and dep.spec.config.autoscaling_config is not None:
                    series = self.samples.setdefault(key, collections.deque(maxlen=64))
                    series.append(LoadSample(self.now, float(ongoing), float(offered - ongoing)))

    def _load_for_autoscaling(self) -> dict[tuple[str, str], list[LoadSample]]:
        return {key: list(series) for key, series in self.samples.items() if series}

    # ------------------------------------------------------------------- scenario API

    def deploy(
        self,
        app: str,
        deployments: Iterable[tuple[str, str, DeploymentConfig]],
        route_prefix: str | None = None,
    ) -> None:
        """Deploy (or update) ``app``: deployments as ``(name, code_version, config)``."""
        specs = tuple(
            DeploymentSpec(name=name, code_version=version, config=config, source=f"sim:{name}")
            for name, version, config in deployments
        )
        self.journal.record(
            [
                ev.AppDeployed(
                    at=self.now,
                    app=app,
                    route_prefix=route_prefix if route_prefix is not None else f"/{app}",
                    ingress=specs[0].name,
                    deployments=specs,
                )
            ]
        )
        self.control()

    def delete(self, app: str) -> None:
        if app in self.state.apps and not self.state.apps[app].deleting:
            self.journal.record([ev.AppDeleted(at=self.now, app=app)])
            self.control()

    def set_load(self, app: str, deployment: str, in_flight: int) -> None:
        self.offered[(app, deployment)] = in_flight

    def _pick(self, index: int, predicate: object) -> Proc | None:
        candidates = [
            p
            for rid, p in sorted(self.procs.items())
            if p.alive
            and rid in self.state.replicas
            and self.state.replicas[rid].state is ReplicaState.RUNNING
        ]
        if not candidates:
            return None
        return candidates[index % len(candidates)]

    def crash(self, index: int) -> str | None:
        """Kill a running replica's process (SIGKILL from outside)."""
        if not self.faults:
            return None
        proc = self._pick(index, None)
        if proc is None:
            return None
        proc.alive = False
        proc.faulty = True
        proc.exit_code = -9
        proc.inflight = 0
        return proc.id

    def hang(self, index: int) -> str | None:
        """Make a running replica hang: failed health checks, no drain, no exit."""
        if not self.faults:
            return None
        proc = self._pick(index, None)
        if proc is None:
            return None
        proc.hung = True
        proc.faulty = True
        return proc.id

    def slow_drain(self, index: int) -> str | None:
        """Make a running replica take longer to drain than its graceful timeout."""
        if not self.faults:
            return None
        proc = self._pick(index, None)
        if proc is None:
            return None
        proc.slow_drain = True
        proc.faulty = True
        return proc.id

    # -------------------------------------------------------------------- invariants

    def check_safety(self) -> None:
        """The invariants that must hold after every step."""
        chain = self.log.verify_chain()
        if not chain.ok:
            raise SafetyViolation(f"log chain broken at seq {chain.first_bad_seq}: {chain.problem}")
        seqs = [s.seq for s in self.log.read()]
        if seqs != list(range(1, len(seqs) + 1)):
            raise SafetyViolation("log sequence numbers are not gapless")
        replayed = replay(s.event for s in self.log.read())
        if replayed != self.state:
            raise SafetyViolation("replay(log) differs from the live state")
        for app in self.state.apps.values():
            for dep in app.deployments.values():
                auto = dep.spec.config.autoscaling_config
                if auto is not None and dep.wanted:
                    low = auto.min_replicas
                    if not low <= dep.target_replicas <= auto.max_replicas:
                        raise SafetyViolation(
                            f"{app.name}/{dep.name}: target {dep.target_replicas} outside "
                            f"[{low}, {auto.max_replicas}]"
                        )
                active = [
                    r
                    for r in dep.replicas.values()
                    if r.state in (ReplicaState.STARTING, ReplicaState.RUNNING)
                ]
                outdated = any(not dep.is_current(r) for r in active)
                goal = dep.goal
                surge = max(1, math.ceil(ROLLING_BATCH_FRACTION * goal)) if outdated else 0
                if len(active) > goal + surge:
                    raise SafetyViolation(
                        f"{app.name}/{dep.name}: {len(active)} active replicas, goal {goal} "
                        f"+ surge {surge}"
                    )
        if self.dropped_healthy:
            raise SafetyViolation(
                f"{self.dropped_healthy} in-flight request(s) lost on healthy replicas"
            )

    def converged(self) -> str | None:
        """``None`` when the actual state is what is desired, else what is still off."""
        for app in self.state.apps.values():
            if app.deleting:
                return f"application {app.name} is still being deleted"
            for dep in app.deployments.values():
                name = f"{app.name}/{dep.name}"
                if not dep.wanted:
                    return f"{name} is still being removed"
                others = [
                    r
                    for r in dep.replicas.values()
                    if not (r.state is ReplicaState.RUNNING and dep.is_current(r))
                ]
                if dep.failed:
                    if any(r.state is not ReplicaState.RUNNING for r in dep.replicas.values()):
                        return f"{name} failed but has replicas in transition"
                    continue
                running = len(dep.replicas) - len(others)
                if others or running != dep.goal:
                    return (
                        f"{name}: {running} running current of goal {dep.goal}, {len(others)} other"
                    )
                stale = [
                    r.id for r in dep.replicas.values() if r.config_version != dep.config_version
                ]
                if stale:
                    return f"{name}: replicas {stale} not reconfigured"
        return None

    def settle(self, max_seconds: float = 900.0) -> None:
        """Stop injecting faults and run until converged, or fail after ``max_seconds``."""
        self.faults = False
        waited = 0.0
        while (problem := self.converged()) is not None:
            if waited >= max_seconds:
                raise AssertionError(
                    f"not converged after {max_seconds:g}s of virtual time: {problem}"
                )
            self.advance(5.0)
            waited += 5.0
            self.check_safety()

    def close(self) -> None:
        self.log.close()
