"""What the controller should do next: ``decide(state, now) -> decision events``.

:func:`decide` compares what the state wants with what it has and returns the
decision events that move the world towards it. It is pure and deterministic
(no I/O, no clock, no randomness: replica ids come from a counter in the
state), and its answers are *prefix-closed*: applying the first decision it
returned and deciding again returns exactly the rest. So deciding again with
no new input returns nothing, and any logged decision can be checked by
re-running ``decide`` on the state just before it.

The rules, per deployment, in the order they are applied:

1. **autoscale** - with load samples, move the target as
   :func:`trioserve.core.autoscaling.autoscale` says;
2. **kill after stop timeout** - a STOPPING replica that has not exited after
   ``stop_timeout_s`` is killed (once);
3. **stop after graceful timeout** - a DRAINING replica is stopped after
   ``graceful_shutdown_timeout_s`` even if requests remain;
4. **stop after start timeout** - a STARTING replica not ready after
   ``start_timeout_s`` is stopped; it counts as a failed start;
5. **replace unhealthy** - a RUNNING replica with 3 consecutive failed health
   checks is drained (and replaced by rule 10);
6. **give up** - after min(3 x target, 20) failed starts of the current code
   version with none of its replicas ever running, the deployment is
   ``DEPLOY_FAILED``: no more starts; older replicas keep serving;
7. **stop outdated starting** - a STARTING replica of an older code version;
8. **scale down** - more current replicas than the target: stop those still
   starting first (newest first), then drain running ones (newest first);
9. **reconfigure in place** - a RUNNING current replica whose config differs
   only in-place fields gets the new config;
10. **drain outdated** - while more replicas run than the target, drain the
    oldest running replicas of an older code version;
11. **start** - start current replicas up to the target; during a rolling
    update up to 20 % (at least one) more than the target may be active, so
    new replicas start before old ones drain. A replica starts only when what
    it needs (:func:`trioserve.core.placement.demand`) fits in what is free,
    counting the replicas started earlier in the same call, and it is given
    its GPU ids then;
12. **forget** - a deployment no longer wanted with no replica left is
    removed, and an application being deleted with no deployment left.

After every deployment's rules, **pending**: a deployment with replicas it
wants but cannot place gets a ``DeploymentPending`` saying why, once per
change of that message; one whose state still holds a message when nothing
is pending any more gets ``DeploymentPending(message="")`` (applying a
``ReplicaStarting`` clears the message too). These come last, and their
messages are computed from what is free after every start of the call, so
that ``decide`` stays prefix-closed across deployments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample, autoscale
from trioserve.core.events import Event
from trioserve.core.placement import Ledger, demand
from trioserve.core.state import (
    HEALTH_CHECK_FAILURE_THRESHOLD,
    REASON_START_TIMEOUT,
    ClusterState,
    Deployment,
    Replica,
    ReplicaState,
)

__all__ = [
    "MAX_START_FAILURES",
    "ROLLING_BATCH_FRACTION",
    "Load",
    "decide",
    "failure_limit",
    "replica_id",
]

ROLLING_BATCH_FRACTION = 0.2
MAX_START_FAILURES = 20

Load = Mapping[tuple[str, str], Sequence[LoadSample]]
"""Load samples per ``(app, deployment)``: input to autoscaling."""

S = ReplicaState


def replica_id(app: str, deployment: str, number: int) -> str:
    """The id of the ``number``-th replica started by this instance."""
    return f"{app}#{deployment}#{number}"


def failure_limit(target: int) -> int:
    """Failed starts after which a deployment's version is given up."""
    return min(3 * max(target, 1), MAX_START_FAILURES)


def decide(state: ClusterState, now: float, load: Load | None = None) -> list[Event]:
    """The decisions that move ``state`` towards what it wants, at time ``now``.

    ``load`` holds recent load samples for autoscaling deployments; without it
    no autoscaling decision is made. ``state`` is not modified.
    """
    out: list[Event] = []
    numbers = _Counter(state.next_replica)
    ledger = Ledger.of(state)
    outcomes: list[tuple[Deployment, _Outcome]] = []
    for app in state.apps.values():
        remaining = len(app.deployments)
        for dep in app.deployments.values():
            samples = None if load is None else load.get((app.name, dep.name))
            outcome = _decide_deployment(state, dep, now, samples, numbers, ledger, out)
            outcomes.append((dep, outcome))
            remaining -= outcome.removed
        if app.deleting and remaining == 0:
            out.append(ev.AppRemoved(at=now, app=app.name))
    # pending: after every start, so each message sees what is finally free
    for dep, outcome in outcomes:
        if outcome.removed:
            continue
        message = ""
        if outcome.unplaced and ledger is not None:
            message = ledger.why_not(dep.name, outcome.unplaced, outcome.need)
            if outcome.rolling and not ledger.never_fits(outcome.need):
                message += (
                    " A rolling update starts new replicas before it stops old ones, "
                    "so it waits until there is room for them."
                )
        held = "" if outcome.started else dep.pending
        if message != held:
            out.append(
                ev.DeploymentPending(at=now, app=dep.app, deployment=dep.name, message=message)
            )
    return out


@dataclasses.dataclass
class _Outcome:
    """What :func:`_decide_deployment` did that ``decide`` needs afterwards."""

    removed: int = 0
    """1 if the deployment is removed."""
    started: bool = False
    """A replica was started (applying it clears the pending message)."""
    unplaced: int = 0
    """Replicas it wanted to start but could not place."""
    need: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """What one of its replicas needs."""
    rolling: bool = False
    """The unplaced replicas are part of a rolling update."""


class _Counter:
    def __init__(self, start: int) -> None:
        self.next = start

    def take(self) -> int:
        n = self.next
        self.next += 1
        return n


def _decide_deployment(
    state: ClusterState,
    dep: Deployment,
    now: float,
    samples: Sequence[LoadSample] | None,
    numbers: _Counter,
    ledger: Ledger | None,
    out: list[Event],
) -> _Outcome:
    """Append the deployment's decisions to ``out``; say whether it is removed and
    what could not be placed."""
    outcome = _Outcome()
    app, name = dep.app, dep.name
    config = dep.spec.config
    target = dep.goal

    # 1. autoscale
    auto = config.autoscaling_config
    if auto is not None and dep.wanted and samples:
        running_now = sum(
            1 for r in dep.replicas.values() if r.state is S.RUNNING and dep.is_current(r)
        )
        choice = autoscale(
            auto,
            target=target,
            running=running_now,
            samples=samples,
            now=now,
            last_scale_at=dep.last_scale_at,
        )
        if choice is not None:
            out.append(
                ev.AutoscaleDecision(
                    at=now,
                    app=app,
                    deployment=name,
                    from_replicas=target,
                    to_replicas=choice.to_replicas,
                    reason=choice.reason,
                    evidence=choice.evidence,
                )
            )
            target = choice.to_replicas

    # 2-5. timeouts and health
    failures = dep.failures
    active: list[Replica] = []
    for r in dep.replicas.values():
        age = now - r.since
        if r.state is S.STOPPING:
            if not r.killed and age > state.stop_timeout_s:
                out.append(
                    ev.ReplicaKilled(
                        at=now,
                        replica=r.id,
                        reason=f"did not exit within {state.stop_timeout_s:g}s of stopping",
                    )
                )
        elif r.state is S.DRAINING:
            if age > config.graceful_shutdown_timeout_s:
                out.append(
                    ev.ReplicaStopping(
                        at=now,
                        replica=r.id,
                        reason=(
                            "graceful_shutdown_timeout_s "
                            f"({config.graceful_shutdown_timeout_s:g}s) passed while draining"
                        ),
                    )
                )
        elif r.state is S.STARTING and age > state.start_timeout_s:
            out.append(ev.ReplicaStopping(at=now, replica=r.id, reason=REASON_START_TIMEOUT))
            if dep.is_current(r):
                failures += 1
        elif r.state is S.RUNNING and r.health_failures >= HEALTH_CHECK_FAILURE_THRESHOLD:
            out.append(
                ev.ReplicaDraining(
                    at=now,
                    replica=r.id,
                    reason=f"unhealthy: {r.health_failures} health checks failed in a row",
                )
            )
        elif r.state in (S.STARTING, S.RUNNING):
            active.append(r)

    # 6. give up
    failed = dep.failed
    if (
        dep.wanted
        and not failed
        and not dep.version_started
        and target > 0
        and failures >= failure_limit(target)
    ):
        out.append(
            ev.DeploymentFailed(
                at=now, app=app, deployment=name, failures=failures, error=dep.last_error
            )
        )
        failed = True

    current = [r for r in active if dep.is_current(r)]
    outdated = [r for r in active if not dep.is_current(r)]

    # 7. stop outdated replicas that are still starting
    for r in outdated:
        if r.state is S.STARTING:
            out.append(ev.ReplicaStopping(at=now, replica=r.id, reason="outdated version"))
    outdated_running = [r for r in outdated if r.state is S.RUNNING]

    # 8. scale down: starting replicas first, newest first
    excess = len(current) - target
    if excess > 0:
        starting = [r for r in current if r.state is S.STARTING]
        running = [r for r in current if r.state is S.RUNNING]
        victims = (starting[::-1] + running[::-1])[:excess]
        for r in victims:
            if r.state is S.STARTING:
                out.append(ev.ReplicaStopping(at=now, replica=r.id, reason="scale down"))
            else:
                out.append(ev.ReplicaDraining(at=now, replica=r.id, reason="scale down"))
        gone = {r.id for r in victims}
        current = [r for r in current if r.id not in gone]

    # 9. reconfigure in place
    for r in current:
        if r.state is S.RUNNING and r.config_version != dep.config_version:
            out.append(
                ev.ReplicaReconfigured(at=now, replica=r.id, config_version=dep.config_version)
            )

    # 10. drain outdated replicas while more than the target run
    running_count = sum(1 for r in current if r.state is S.RUNNING) + len(outdated_running)
    drain = min(max(running_count - target, 0), len(outdated_running))
    for r in outdated_running[:drain]:
        out.append(ev.ReplicaDraining(at=now, replica=r.id, reason="rolling update"))
    outdated_running = outdated_running[drain:]

    # 11. start up to the target, with a surge during a rolling update
    if dep.wanted and not failed:
        surge = max(1, math.ceil(ROLLING_BATCH_FRACTION * target)) if outdated_running else 0
        active_count = len(current) + len(outdated_running)
        reason = "rolling update" if outdated_running else "scale up"
        if dep.failures or failures:
            reason = f"{reason} (retry after {failures} failed start(s))"
        need = demand(config) if ledger is not None else {}
        while len(current) < target and active_count < target + surge:
            gpu_ids = () if ledger is None else ledger.place(need)
            if gpu_ids is None:
                outcome.unplaced = min(target - len(current), target + surge - active_count)
                outcome.need = need
                outcome.rolling = bool(outdated_running)
                break
            number = numbers.take()
            out.append(
                ev.ReplicaStarting(
                    at=now,
                    replica=replica_id(app, name, number),
                    app=app,
                    deployment=name,
                    code_version=dep.code_version,
                    config_version=dep.config_version,
                    reason=reason,
                    gpu_ids=gpu_ids,
                )
            )
            outcome.started = True
            current.append(_PLACEHOLDER)
            active_count += 1

    # 12. forget
    if not dep.wanted and not dep.replicas:
        out.append(ev.DeploymentRemoved(at=now, app=app, deployment=name))
        outcome.removed = 1
    return outcome


_PLACEHOLDER = Replica(
    id="", app="", deployment="", state=S.STARTING, code_version="", config_version="", since=0.0
)
