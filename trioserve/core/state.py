"""The controller's view of the world, and how each event changes it.

:func:`apply` folds one event into a :class:`ClusterState`. It is the only way
the state changes, it is deterministic, and it rejects anything the design does
not allow: the replica lifecycle is the table :data:`TRANSITIONS` below, and an
event that would make any other transition raises :class:`IllegalTransition`
naming the replica, its state and the event.

```
STARTING --ReplicaRunning------------------------------> RUNNING
STARTING --ReplicaStartFailed | ReplicaStopping | Died--> STOPPING
RUNNING  --ReplicaDraining (scale-down/update/unhealthy)-> DRAINING
RUNNING  --ReplicaDied-----------------------------------> STOPPING
DRAINING --ReplicaDrained | ReplicaStopping | Died-------> STOPPING
STOPPING --ReplicaExited---------------------------------> (gone)
any      --ReplicaAdopted (a restarted controller kept it)-> the same state
```

For speed, :func:`apply` updates the state it is given in place and returns
it; use :meth:`ClusterState.copy` first to keep the old one. This module is
pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from trioserve.core import events as ev
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.placement import demand

__all__ = [
    "HEALTH_CHECK_FAILURE_THRESHOLD",
    "REASON_START_TIMEOUT",
    "TRANSITIONS",
    "AppStatus",
    "Application",
    "ClusterState",
    "Deployment",
    "DeploymentStatus",
    "IllegalTransition",
    "Replica",
    "ReplicaState",
    "app_status",
    "apply",
    "check",
    "deployment_status",
    "replay",
    "state_from_bytes",
    "state_to_bytes",
]

HEALTH_CHECK_FAILURE_THRESHOLD = 3
"""Consecutive failed health checks that make a replica unhealthy (as in Ray Serve)."""

REASON_START_TIMEOUT = "start timeout"
"""The reason of a :class:`~trioserve.core.events.ReplicaStopping` for a replica that
did not become ready in time; it counts as a failed start."""


class ReplicaState(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"


class DeploymentStatus(enum.StrEnum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"
    DEPLOY_FAILED = "DEPLOY_FAILED"


class AppStatus(enum.StrEnum):
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class IllegalTransition(ValueError):
    """An event does not fit the state: it names what it would have broken."""


S = ReplicaState
GONE = None

TRANSITIONS: dict[tuple[ReplicaState | None, str], ReplicaState | None] = {
    (None, "ReplicaStarting"): S.STARTING,
    (S.STARTING, "ReplicaRunning"): S.RUNNING,
    (S.STARTING, "ReplicaStartFailed"): S.STOPPING,
    (S.STARTING, "ReplicaStopping"): S.STOPPING,
    (S.STARTING, "ReplicaDied"): S.STOPPING,
    (S.RUNNING, "HealthCheckFailed"): S.RUNNING,
    (S.RUNNING, "HealthCheckPassed"): S.RUNNING,
    (S.RUNNING, "ReplicaReconfigured"): S.RUNNING,
    (S.RUNNING, "ReplicaDraining"): S.DRAINING,
    (S.RUNNING, "ReplicaDied"): S.STOPPING,
    (S.DRAINING, "ReplicaDrained"): S.STOPPING,
    (S.DRAINING, "ReplicaStopping"): S.STOPPING,
    (S.DRAINING, "ReplicaDied"): S.STOPPING,
    (S.STOPPING, "ReplicaKilled"): S.STOPPING,
    (S.STOPPING, "ReplicaExited"): GONE,
    (S.STARTING, "ReplicaAdopted"): S.STARTING,
    (S.RUNNING, "ReplicaAdopted"): S.RUNNING,
    (S.DRAINING, "ReplicaAdopted"): S.DRAINING,
    (S.STOPPING, "ReplicaAdopted"): S.STOPPING,
}
"""The replica lifecycle: (state before, event kind) -> state after (``None``: gone)."""

REPLICA_EVENT_KINDS = frozenset(kind for _, kind in TRANSITIONS)


@dataclasses.dataclass
class Replica:
    """One replica process of a deployment, as the controller knows it."""

    id: str
    app: str
    deployment: str
    state: ReplicaState
    code_version: str
    config_version: str
    since: float
    """When the replica entered its current state."""
    reason: str = ""
    """Why it entered its current state."""
    address: str | None = None
    pid: int | None = None
    health_failures: int = 0
    last_error: str = ""
    killed: bool = False
    gpu_ids: tuple[int, ...] = ()
    """The GPUs it was placed on (``ReplicaStarting.gpu_ids``)."""
    demand: dict[str, float] = dataclasses.field(default_factory=dict)
    """What it reserves (from its deployment's ``ray_actor_options`` when it started);
    held until the replica is gone."""


@dataclasses.dataclass
class Deployment:
    """A deployment of an application: what it should run and what runs."""

    app: str
    name: str
    spec: DeploymentSpec
    target_replicas: int
    wanted: bool = True
    """False once the app was deleted or redeployed without this deployment."""
    failures: int = 0
    """Failed starts of the current code version."""
    failed: bool = False
    """The current version was given up on (``DEPLOY_FAILED``)."""
    version_started: bool = False
    """A replica of the current code version has run: failures stop counting."""
    version_reached: bool = False
    """Since the last change of spec, all target replicas ran the current version."""
    last_error: str = ""
    scale_direction: int = 0
    """+1 / -1 while a change of target is being carried out, else 0."""
    last_scale_at: float | None = None
    last_scale_reason: str = ""
    """Why the autoscaler last changed the target (``AutoscaleDecision.reason``)."""
    pending: str = ""
    """Why wanted replicas cannot be placed now (``DeploymentPending``); empty if none."""
    replicas: dict[str, Replica] = dataclasses.field(default_factory=dict)

    @property
    def code_version(self) -> str:
        return self.spec.code_version

    @property
    def config_version(self) -> str:
        return self.spec.config_version

    @property
    def goal(self) -> int:
        """How many replicas of the current version should run now."""
        return self.target_replicas if self.wanted else 0

    def is_current(self, replica: Replica) -> bool:
        return replica.code_version == self.spec.code_version

    def count(self, state: ReplicaState, *, current: bool | None = None) -> int:
        return sum(
            1
            for r in self.replicas.values()
            if r.state is state and (current is None or self.is_current(r) == current)
        )


@dataclasses.dataclass
class Application:
    name: str
    route_prefix: str | None
    ingress: str
    deleting: bool = False
    deployed_at: float = 0.0
    deployments: dict[str, Deployment] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClusterState:
    """Everything the controller knows, rebuilt exactly by replaying the log."""

    apps: dict[str, Application] = dataclasses.field(default_factory=dict)
    replicas: dict[str, Replica] = dataclasses.field(default_factory=dict)
    """Every replica by id (the same objects as under the deployments)."""
    next_replica: int = 1
    """Number given to the next replica started; ids are never reused."""
    instance_id: str = ""
    controller_pid: int | None = None
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    resources: dict[str, float] | None = None
    """What the instance has for replicas, by resource name (``ControllerStarted``);
    ``None``: no accounting, every replica fits."""
    proxy_pid: int | None = None
    """The HTTP proxy's process while it serves (``ProxyStarted``), else None."""
    proxy_url: str = ""
    proxy_error: str = ""
    """Why the last proxy process exited or could not start (``ProxyExited``)."""
    proxy_starts: int = 0
    deployed_config: dict[str, Any] | None = None
    """The config file deployed last (``ConfigDeployed``), for ``trioserve config``."""
    applied: int = 0
    """How many events were applied."""

    def copy(self) -> ClusterState:
        """A deep copy, independent of this state."""
        return copy.deepcopy(self)

    def deployment(self, app: str, name: str) -> Deployment:
        try:
            return self.apps[app].deployments[name]
        except KeyError:
            raise IllegalTransition(f"no deployment {name!r} in application {app!r}") from None

    def deployment_of(self, replica: Replica) -> Deployment:
        return self.apps[replica.app].deployments[replica.deployment]


# ---------------------------------------------------------------------------- apply


def check(state: ClusterState, event: Event) -> None:
    """Raise :class:`IllegalTransition` if ``event`` does not fit ``state``.

    The controller uses this to drop stale observations (a health check that
    raced with a drain) before they reach the log.
    """
    if event.KIND in REPLICA_EVENT_KINDS:
        replica_id = str(event.__dict__["replica"])
        replica = state.replicas.get(replica_id)
        before = None if replica is None else replica.state
        if (before, event.KIND) not in TRANSITIONS:
            where = "does not exist" if before is None else f"is {before.value}"
            raise IllegalTransition(f"replica {replica_id!r} {where}: {event.KIND} is not allowed")
        if replica is None:
            assert isinstance(event, ev.ReplicaStarting)
            dep = state.deployment(event.app, event.deployment)
            if not dep.wanted:
                raise IllegalTransition(
                    f"replica {replica_id!r}: deployment {event.app}/{event.deployment} "
                    "is being removed"
                )
    elif isinstance(
        event,
        (ev.DeploymentScaled, ev.AutoscaleDecision, ev.DeploymentFailed, ev.DeploymentPending),
    ):
        state.deployment(event.app, event.deployment)
    elif isinstance(event, ev.DeploymentRemoved):
        dep = state.deployment(event.app, event.deployment)
        if dep.wanted or dep.replicas:
            raise IllegalTransition(
                f"deployment {event.app}/{event.deployment} cannot be removed: "
                f"{'it is wanted' if dep.wanted else f'{len(dep.replicas)} replicas remain'}"
            )
    elif isinstance(event, ev.AppDeleted):
        if event.app not in state.apps:
            raise IllegalTransition(f"no application {event.app!r}")
    elif isinstance(event, ev.AppRemoved):
        app = state.apps.get(event.app)
        if app is None or not app.deleting or app.deployments:
            raise IllegalTransition(f"application {event.app!r} cannot be removed now")


def apply(state: ClusterState, event: Event) -> ClusterState:
    """Fold ``event`` into ``state`` (in place) and return it.

    Raises :class:`IllegalTransition`, leaving ``state`` unchanged, when the
    event does not fit.
    """
    check(state, event)
    handler = _HANDLERS.get(event.KIND)
    if handler is None:
        raise IllegalTransition(f"no rule for event kind {event.KIND!r}")
    handler(state, event)
    state.applied += 1
    return state


def replay(events: Iterable[Event], state: ClusterState | None = None) -> ClusterState:
    """Apply ``events`` in order to ``state`` (a new, empty state by default)."""
    state = ClusterState() if state is None else state
    for event in events:
        apply(state, event)
    return state


def _move(state: ClusterState, replica_id: str, kind: str, at: float, reason: str) -> Replica:
    replica = state.replicas[replica_id]
    after = TRANSITIONS[(replica.state, kind)]
    if after is GONE:
        del state.replicas[replica_id]
        dep = state.deployment_of(replica)
        del dep.replicas[replica_id]
        return replica
    if after is not replica.state:
        replica.state = after
        replica.since = at
        replica.reason = reason
    return replica


def _on_app_deployed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.AppDeployed)
    app = state.apps.get(event.app)
    if app is None:
        app = Application(event.app, event.route_prefix, event.ingress)
        state.apps[event.app] = app
    app.route_prefix = event.route_prefix
    app.ingress = event.ingress
    app.deleting = False
    app.deployed_at = event.at
    named = {spec.name: spec for spec in event.deployments}
    for name, existing in app.deployments.items():
        if name not in named:
            existing.wanted = False
    for spec in event.deployments:
        config = spec.config
        if spec.name not in app.deployments:
            new = Deployment(event.app, spec.name, spec, target_replicas=config.initial_target)
            app.deployments[spec.name] = new
            _note_progress(new)  # a goal of 0 (min_replicas=0) is reached at once
            continue
        dep = app.deployments[spec.name]
        auto = config.autoscaling_config
        if auto is None:
            target = config.initial_target
        elif dep.spec.config.autoscaling_config is None or not dep.wanted:
            target = auto.start_replicas
        else:
            target = min(max(dep.target_replicas, auto.min_replicas), auto.max_replicas)
        if target != dep.target_replicas:
            dep.scale_direction = 1 if target > dep.target_replicas else -1
            dep.target_replicas = target
            if auto is None:
                # A new num_replicas is a config update (UPDATING until it is
                # reached), as in Ray Serve; UPSCALING is for autoscaling.
                dep.version_reached = False
        if spec.code_version != dep.spec.code_version or not dep.wanted:
            dep.version_started = False
            dep.version_reached = False
        if spec != dep.spec:
            dep.failures = 0
            dep.failed = False
            dep.last_error = ""
            if spec.config_version != dep.spec.config_version:
                dep.version_reached = False
        dep.spec = spec
        dep.wanted = True
        _note_progress(dep)


def _on_app_deleted(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.AppDeleted)
    app = state.apps[event.app]
    app.deleting = True
    for dep in app.deployments.values():
        dep.wanted = False


def _on_deployment_scaled(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.DeploymentScaled)
    if event.num_replicas < 0:
        raise IllegalTransition(f"cannot scale to {event.num_replicas} replicas")
    dep = state.deployment(event.app, event.deployment)
    if event.num_replicas != dep.target_replicas:
        dep.scale_direction = 1 if event.num_replicas > dep.target_replicas else -1
    dep.target_replicas = event.num_replicas
    dep.last_scale_reason = f"scaled by hand to {event.num_replicas}"
    _note_progress(dep)


def _on_controller_started(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ControllerStarted)
    state.instance_id = event.instance_id
    state.controller_pid = event.pid
    state.start_timeout_s = event.start_timeout_s
    state.stop_timeout_s = event.stop_timeout_s
    state.resources = (
        None
        if event.resources is None
        else {str(name): float(amount) for name, amount in event.resources.items()}
    )
    state.proxy_pid = None  # a proxy of an earlier controller is gone with it
    state.proxy_url = ""


def _on_config_deployed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ConfigDeployed)
    state.deployed_config = dict(event.config)


def _on_replica_adopted(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaAdopted)
    state.replicas[event.replica].pid = event.pid


def _on_proxy_started(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ProxyStarted)
    state.proxy_pid = event.pid
    state.proxy_url = event.url
    state.proxy_error = ""
    state.proxy_starts += 1


def _on_proxy_exited(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ProxyExited)
    state.proxy_pid = None
    state.proxy_url = ""
    state.proxy_error = event.reason


def _on_replica_starting(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaStarting)
    dep = state.deployment(event.app, event.deployment)
    replica = Replica(
        id=event.replica,
        app=event.app,
        deployment=event.deployment,
        state=S.STARTING,
        code_version=event.code_version,
        config_version=event.config_version,
        since=event.at,
        reason=event.reason,
        gpu_ids=tuple(event.gpu_ids),
        demand=demand(dep.spec.config),
    )
    state.replicas[replica.id] = replica
    dep.replicas[replica.id] = replica
    state.next_replica += 1
    dep.pending = ""


def _on_replica_running(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaRunning)
    replica = _move(state, event.replica, event.KIND, event.at, "ready")
    replica.address = event.address
    replica.pid = event.pid
    dep = state.deployment_of(replica)
    if dep.is_current(replica):
        dep.version_started = True
        dep.failed = False
    _note_progress(dep)


def _count_start_failure(state: ClusterState, replica: Replica, error: str) -> None:
    dep = state.deployment_of(replica)
    replica.last_error = error
    if dep.is_current(replica):
        dep.failures += 1
        dep.last_error = error


def _on_replica_start_failed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaStartFailed)
    replica = _move(state, event.replica, event.KIND, event.at, "start failed")
    _count_start_failure(state, replica, event.error)


def _on_replica_died(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaDied)
    was = state.replicas[event.replica].state
    replica = _move(state, event.replica, event.KIND, event.at, f"died: {event.reason}")
    if was is S.STARTING:
        _count_start_failure(state, replica, event.reason)
    else:
        replica.last_error = event.reason


def _on_replica_drained(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaDrained)
    _move(state, event.replica, event.KIND, event.at, "drained")


def _on_replica_exited(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaExited)
    replica = _move(state, event.replica, event.KIND, event.at, "exited")
    _note_progress(state.deployment_of(replica))


def _on_health_check_failed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.HealthCheckFailed)
    replica = _move(state, event.replica, event.KIND, event.at, "")
    replica.health_failures = event.consecutive
    replica.last_error = event.error


def _on_health_check_passed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.HealthCheckPassed)
    replica = _move(state, event.replica, event.KIND, event.at, "")
    replica.health_failures = 0


def _on_replica_reconfigured(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaReconfigured)
    replica = _move(state, event.replica, event.KIND, event.at, "")
    replica.config_version = event.config_version
    _note_progress(state.deployment_of(replica))


def _on_replica_draining(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaDraining)
    replica = _move(state, event.replica, event.KIND, event.at, event.reason)
    _note_progress(state.deployment_of(replica))


def _on_replica_stopping(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaStopping)
    was = state.replicas[event.replica].state
    replica = _move(state, event.replica, event.KIND, event.at, event.reason)
    if was is S.STARTING and event.reason == REASON_START_TIMEOUT:
        _count_start_failure(state, replica, "the replica did not become ready in time")


def _on_replica_killed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.ReplicaKilled)
    replica = _move(state, event.replica, event.KIND, event.at, "")
    replica.killed = True


def _on_autoscale_decision(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.AutoscaleDecision)
    dep = state.deployment(event.app, event.deployment)
    if dep.target_replicas != event.from_replicas:
        raise IllegalTransition(
            f"deployment {event.app}/{event.deployment} has target {dep.target_replicas}, "
            f"not {event.from_replicas}: {event.KIND} does not fit"
        )
    dep.scale_direction = (event.to_replicas > event.from_replicas) - (
        event.to_replicas < event.from_replicas
    )
    dep.target_replicas = event.to_replicas
    dep.last_scale_at = event.at
    dep.last_scale_reason = event.reason
    _note_progress(dep)


def _on_deployment_failed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.DeploymentFailed)
    dep = state.deployment(event.app, event.deployment)
    dep.failed = True
    dep.last_error = event.error


def _on_deployment_pending(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.DeploymentPending)
    state.deployment(event.app, event.deployment).pending = event.message


def _on_deployment_removed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.DeploymentRemoved)
    del state.apps[event.app].deployments[event.deployment]


def _on_app_removed(state: ClusterState, event: Event) -> None:
    assert isinstance(event, ev.AppRemoved)
    del state.apps[event.app]


def _note_progress(dep: Deployment) -> None:
    """Record that the deployment reached its goal, once it has."""
    code, config = dep.spec.code_version, dep.spec.config_version
    running = others = 0
    for r in dep.replicas.values():
        if r.state is S.RUNNING or r.state is S.STARTING:
            if r.code_version == code and r.config_version == config:
                running += r.state is S.RUNNING
            else:
                others += 1
    if running >= dep.goal and others == 0:
        dep.version_reached = True
    if running == dep.goal:
        dep.scale_direction = 0


_HANDLERS: dict[str, Callable[[ClusterState, Event], None]] = {
    "AppDeployed": _on_app_deployed,
    "AppDeleted": _on_app_deleted,
    "DeploymentScaled": _on_deployment_scaled,
    "ControllerStarted": _on_controller_started,
    "ReplicaStarting": _on_replica_starting,
    "ReplicaRunning": _on_replica_running,
    "ReplicaStartFailed": _on_replica_start_failed,
    "ReplicaDied": _on_replica_died,
    "ReplicaDrained": _on_replica_drained,
    "ReplicaExited": _on_replica_exited,
    "HealthCheckFailed": _on_health_check_failed,
    "HealthCheckPassed": _on_health_check_passed,
    "ReplicaReconfigured": _on_replica_reconfigured,
    "ReplicaDraining": _on_replica_draining,
    "ReplicaStopping": _on_replica_stopping,
    "ReplicaKilled": _on_replica_killed,
    "AutoscaleDecision": _on_autoscale_decision,
    "DeploymentFailed": _on_deployment_failed,
    "DeploymentPending": _on_deployment_pending,
    "DeploymentRemoved": _on_deployment_removed,
    "AppRemoved": _on_app_removed,
    "ProxyStarted": _on_proxy_started,
    "ProxyExited": _on_proxy_exited,
    "ConfigDeployed": _on_config_deployed,
    "ReplicaAdopted": _on_replica_adopted,
}


# ------------------------------------------------------------------------- statuses


def deployment_status(dep: Deployment) -> tuple[DeploymentStatus, str]:
    """The deployment's status as Ray Serve names it, with a message for people.

    While some of its replicas cannot be placed, the message ends with why.
    """
    status, message = _status(dep)
    if dep.pending and status not in (DeploymentStatus.HEALTHY, DeploymentStatus.DEPLOY_FAILED):
        message = f"{message} {dep.pending}" if message else dep.pending
    return status, message


def _status(dep: Deployment) -> tuple[DeploymentStatus, str]:
    running = sum(1 for r in dep.replicas.values() if r.state is S.RUNNING and dep.is_current(r))
    goal = dep.goal
    if dep.failed:
        return DeploymentStatus.DEPLOY_FAILED, (
            f"The deployment failed to start {dep.failures} times in a row. This may be "
            "due to a problem with its constructor or an initial health check failing. "
            f"The last error:\n{dep.last_error}"
        )
    if not dep.version_reached:
        msg = f"Deploying: {running} of {goal} replicas running the new version."
        if dep.failures:
            msg += f" {dep.failures} failed to start; the last error:\n{dep.last_error}"
        return DeploymentStatus.UPDATING, msg
    why = f" ({dep.last_scale_reason})" if dep.last_scale_reason else ""
    if dep.scale_direction > 0 and running < goal:
        return DeploymentStatus.UPSCALING, f"Upscaling from {running} to {goal} replicas{why}."
    if dep.scale_direction < 0 and running > goal:
        return DeploymentStatus.DOWNSCALING, f"Downscaling from {running} to {goal} replicas{why}."
    if running < goal:
        return DeploymentStatus.UNHEALTHY, (
            f"{running} of {goal} replicas are running; replacing the others."
            + (f" The last error:\n{dep.last_error}" if dep.last_error else "")
        )
    return DeploymentStatus.HEALTHY, ""


def app_status(app: Application) -> tuple[AppStatus, str]:
    """The application's status, derived from its deployments'."""
    if app.deleting:
        return AppStatus.DELETING, "Deleting."
    statuses = {name: deployment_status(d) for name, d in app.deployments.items() if d.wanted}
    for wanted in (DeploymentStatus.DEPLOY_FAILED,):
        failed = [n for n, (s, _) in statuses.items() if s is wanted]
        if failed:
            name = failed[0]
            return AppStatus.DEPLOY_FAILED, (
                f"Deploying application {app.name!r} failed: deployment {name!r}: "
                f"{statuses[name][1]}"
            )
    if any(s is DeploymentStatus.UPDATING for s, _ in statuses.values()):
        waiting = [n for n, (s, _) in statuses.items() if s is DeploymentStatus.UPDATING]
        return AppStatus.DEPLOYING, f"Waiting for deployments: {', '.join(waiting)}."
    unhealthy = [n for n, (s, _) in statuses.items() if s is DeploymentStatus.UNHEALTHY]
    if unhealthy:
        return AppStatus.UNHEALTHY, f"Unhealthy deployments: {', '.join(unhealthy)}."
    return AppStatus.RUNNING, ""


# ------------------------------------------------------------------------ snapshots


def state_to_bytes(state: ClusterState) -> bytes:
    """Encode a state for a snapshot (msgpack)."""
    apps = []
    for app in state.apps.values():
        deps = []
        for dep in app.deployments.values():
            d = dataclasses.asdict(dep)
            d["spec"] = dep.spec.to_dict()
            d["replicas"] = [_replica_dict(r) for r in dep.replicas.values()]
            deps.append(d)
        a = {f.name: getattr(app, f.name) for f in dataclasses.fields(app)}
        a["deployments"] = deps
        apps.append(a)
    top = {
        f.name: getattr(state, f.name)
        for f in dataclasses.fields(state)
        if f.name not in ("apps", "replicas")
    }
    top["apps"] = apps
    packed: bytes = msgpack.packb(top, use_bin_type=True)
    return packed


def _replica_dict(replica: Replica) -> dict[str, Any]:
    d = dataclasses.asdict(replica)
    d["state"] = replica.state.value
    return d


def state_from_bytes(data: bytes) -> ClusterState:
    """Decode a state written by :func:`state_to_bytes`."""
    top = msgpack.unpackb(data, raw=False, strict_map_key=False)
    apps_data = top.pop("apps")
    state = ClusterState(**top)
    for a in apps_data:
        deps_data = a.pop("deployments")
        app = Application(**a)
        state.apps[app.name] = app
        for d in deps_data:
            replicas = d.pop("replicas")
            d["spec"] = DeploymentSpec.from_dict(d["spec"])
            dep = Deployment(**d)
            app.deployments[dep.name] = dep
            for r in replicas:
                r["state"] = ReplicaState(r["state"])
                r["gpu_ids"] = tuple(r.get("gpu_ids", ()))
                if "demand" not in r:  # a snapshot from before placement
                    r["demand"] = demand(dep.spec.config)
                replica = Replica(**r)
                dep.replicas[replica.id] = replica
                state.replicas[replica.id] = replica
    return state
