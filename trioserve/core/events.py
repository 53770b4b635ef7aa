"""The event log's vocabulary: every fact the controller records, and its codec.

Events come in three families (see ``docs/events.md``):

* **intents** - what a user asked for (:class:`AppDeployed`, :class:`AppDeleted`,
  :class:`DeploymentScaled`);
* **observations** - what the controller saw happen in the world
  (:class:`ReplicaRunning`, :class:`ReplicaDied`, :class:`HealthCheckFailed`, ...);
* **decisions** - what :func:`trioserve.core.reconcile.decide` chose to do
  (:class:`ReplicaStarting`, :class:`ReplicaDraining`, :class:`AutoscaleDecision`,
  :class:`DeploymentPending`, ...), each carrying its reason and evidence.

Every event is a frozen dataclass with a ``KIND`` (its class name) and a
``VERSION``. :func:`encode` turns an event into ``(kind, version, payload)``,
payload being msgpack bytes; :func:`decode` turns them back, first upcasting
payloads written by an older version of the kind through the registered
upcasters, and refusing versions newer than this code knows.

This module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import msgpack

from trioserve.core.config import DeploymentConfig

__all__ = [
    "EVENT_TYPES",
    "AppDeleted",
    "AppDeployed",
    "AppRemoved",
    "AutoscaleDecision",
    "ControllerStarted",
    "DECISION_KINDS",
    "DeploymentFailed",
    "DeploymentPending",
    "DeploymentRemoved",
    "DeploymentScaled",
    "DeploymentSpec",
    "Event",
    "EventDecodeError",
    "EventVersionError",
    "HealthCheckFailed",
    "HealthCheckPassed",
    "ProxyExited",
    "ProxyStarted",
    "ReplicaDied",
    "ReplicaDrained",
    "ReplicaDraining",
    "ReplicaExited",
    "ReplicaKilled",
    "ReplicaReconfigured",
    "ReplicaRunning",
    "ReplicaStartFailed",
    "ReplicaStarting",
    "ReplicaStopping",
    "decode",
    "encode",
    "register",
    "register_upcaster",
]


class EventDecodeError(ValueError):
    """A stored event could not be turned back into an event object."""


class EventVersionError(EventDecodeError):
    """A stored event was written by a newer trioserve than this one."""


@dataclasses.dataclass(frozen=True)
class Event:
    """Base of all events. ``at`` is the controller's clock when it was recorded."""

    KIND: ClassVar[str] = "Event"
    VERSION: ClassVar[int] = 1
    FAMILY: ClassVar[str] = "abstract"

    at: float

    def subject(self) -> str:
        """What the event is about, for one-line displays: a replica, deployment or app."""
        for name in ("replica", "deployment", "app"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                if name == "deployment":
                    return f"{getattr(self, 'app', '')}/{value}"
                return value
        return "-"

    def to_payload(self) -> dict[str, Any]:
        """The event's fields as plain msgpack-able values (sequences as lists)."""
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        return {name: _plain(getattr(self, name)) for name in names}

    @classmethod
    def from_payload(cls: type[E], payload: Mapping[str, Any]) -> E:
        """Rebuild the event from :meth:`to_payload`'s output."""
        return cls(**payload)


E = TypeVar("E", bound=Event)
_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float)) or value is None:
        return value
    if isinstance(value, DeploymentSpec):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- intents


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of an application, as the controller needs to run it.

    ``code_version`` identifies the code, init arguments and actor options:
    replicas of another code version are replaced by a rolling update.
    ``source`` says where the replica finds the code (``import:<module>:<attr>``
    or ``blob:<digest>``) and ``init_args`` names the blob with the pickled
    constructor arguments (``None`` for none).
    """

    name: str
    code_version: str
    config: DeploymentConfig
    source: str = ""
    init_args: str | None = None

    @functools.cached_property
    def config_version(self) -> str:
        """Digest of the fields that are updated in place (computed once per spec)."""
        return self.config.lightweight_digest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "code_version": self.code_version,
            "config": self.config.to_dict(),
            "source": self.source,
            "init_args": self.init_args,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentSpec:
        return cls(
            name=data["name"],
            code_version=data["code_version"],
            config=DeploymentConfig.from_dict(data["config"]),
            source=data.get("source", ""),
            init_args=data.get("init_args"),
        )


@dataclasses.dataclass(frozen=True)
class AppDeployed(Event):
    """Intent: run this application (new, or replacing the one of the same name)."""

    KIND: ClassVar[str] = "AppDeployed"
    FAMILY: ClassVar[str] = "intent"

    app: str
    route_prefix: str | None
    ingress: str
    deployments: tuple[DeploymentSpec, ...]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> AppDeployed:
        data = dict(payload)
        data["deployments"] = tuple(DeploymentSpec.from_dict(d) for d in data["deployments"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class AppDeleted(Event):
    """Intent: remove this application and all its replicas."""

    KIND: ClassVar[str] = "AppDeleted"
    FAMILY: ClassVar[str] = "intent"

    app: str


@dataclasses.dataclass(frozen=True)
class ConfigDeployed(Event):
    """Intent: a config file was deployed (``trioserve deploy``), as given.

    The applications it names are recorded as ``AppDeployed`` events before
    it, and those it left out as ``AppDeleted``; this event keeps the file
    itself, for ``trioserve config``.
    """

    KIND: ClassVar[str] = "ConfigDeployed"
    FAMILY: ClassVar[str] = "intent"

    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DeploymentScaled(Event):
    """Intent: run this many replicas of a deployment (overrides its target)."""

    KIND: ClassVar[str] = "DeploymentScaled"
    FAMILY: ClassVar[str] = "intent"

    app: str
    deployment: str
    num_replicas: int


# ---------------------------------------------------------------------- observations


@dataclasses.dataclass(frozen=True)
class ControllerStarted(Event):
    """Observation: a controller took charge of this log.

    Carries the controller's timing settings and the resources the instance
    declares, so that replaying the log (and re-checking its decisions) uses
    the settings the decisions were made with. ``resources`` maps a resource
    name (``"CPU"``, ``"GPU"``, ``"memory"`` in bytes, or a custom name) to
    the amount the instance has; ``None`` means no accounting: every replica
    fits.

    Version 2 added ``resources`` (version 1 is read as ``None``).
    """

    KIND: ClassVar[str] = "ControllerStarted"
    VERSION: ClassVar[int] = 2
    FAMILY: ClassVar[str] = "observation"

    instance_id: str
    pid: int
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    resources: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class ReplicaRunning(Event):
    """Observation: the replica's constructor returned and it serves at ``address``."""

    KIND: ClassVar[str] = "ReplicaRunning"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    address: str
    pid: int


@dataclasses.dataclass(frozen=True)
class ReplicaStartFailed(Event):
    """Observation: the replica could not start (its constructor raised, or the
    process could not be launched). ``error`` holds the traceback."""

    KIND: ClassVar[str] = "ReplicaStartFailed"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    error: str


@dataclasses.dataclass(frozen=True)
class ReplicaDied(Event):
    """Observation: the replica's process ended without being asked to."""

    KIND: ClassVar[str] = "ReplicaDied"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    exit_code: int | None
    reason: str


@dataclasses.dataclass(frozen=True)
class ReplicaDrained(Event):
    """Observation: a draining replica has no request in flight any more."""

    KIND: ClassVar[str] = "ReplicaDrained"
    FAMILY: ClassVar[str] = "observation"

    replica: str


@dataclasses.dataclass(frozen=True)
class ReplicaExited(Event):
    """Observation: a stopping replica's process is gone and reaped."""

    KIND: ClassVar[str] = "ReplicaExited"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    exit_code: int | None


@dataclasses.dataclass(frozen=True)
class ReplicaAdopted(Event):
    """Observation: a restarted controller found the replica's process ``pid`` alive
    and took it over, without restarting it (daemon mode)."""

    KIND: ClassVar[str] = "ReplicaAdopted"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    pid: int


@dataclasses.dataclass(frozen=True)
class ProxyStarted(Event):
    """Observation: the HTTP proxy process ``pid`` serves at ``url`` on ``event_loop``."""

    KIND: ClassVar[str] = "ProxyStarted"
    FAMILY: ClassVar[str] = "observation"

    pid: int
    url: str
    event_loop: str = "asyncio"


@dataclasses.dataclass(frozen=True)
class ProxyExited(Event):
    """Observation: the proxy process ``pid`` is gone, or could not start; ``reason`` says why.

    The controller starts a new one after a back-off.
    """

    KIND: ClassVar[str] = "ProxyExited"
    FAMILY: ClassVar[str] = "observation"

    pid: int | None
    exit_code: int | None
    reason: str


@dataclasses.dataclass(frozen=True)
class HealthCheckFailed(Event):
    """Observation: a health check failed; ``consecutive`` counts failures in a row."""

    KIND: ClassVar[str] = "HealthCheckFailed"
    FAMILY: ClassVar[str] = "observation"

    replica: str
    consecutive: int
    error: str


@dataclasses.dataclass(frozen=True)
class HealthCheckPassed(Event):
    """Observation: a health check passed after one or more failures."""

    KIND: ClassVar[str] = "HealthCheckPassed"
    FAMILY: ClassVar[str] = "observation"

    replica: str


# ------------------------------------------------------------------------- decisions


@dataclasses.dataclass(frozen=True)
class ReplicaStarting(Event):
    """Decision: start a new replica of a deployment at the given versions.

    ``gpu_ids`` are the GPUs (numbered from 0) the replica was placed on; empty
    when it asked for none or the instance does no accounting.

    Version 2 added ``gpu_ids`` (version 1 is read as ``()``).
    """

    KIND: ClassVar[str] = "ReplicaStarting"
    VERSION: ClassVar[int] = 2
    FAMILY: ClassVar[str] = "decision"

    replica: str
    app: str
    deployment: str
    code_version: str
    config_version: str
    reason: str
    gpu_ids: tuple[int, ...] = ()

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ReplicaStarting:
        data = dict(payload)
        data["gpu_ids"] = tuple(data.get("gpu_ids", ()))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ReplicaReconfigured(Event):
    """Decision: update a running replica's config in place (calls ``reconfigure``)."""

    KIND: ClassVar[str] = "ReplicaReconfigured"
    FAMILY: ClassVar[str] = "decision"

    replica: str
    config_version: str


@dataclasses.dataclass(frozen=True)
class ReplicaDraining(Event):
    """Decision: stop sending work to a running replica and let it finish."""

    KIND: ClassVar[str] = "ReplicaDraining"
    FAMILY: ClassVar[str] = "decision"

    replica: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ReplicaStopping(Event):
    """Decision: stop a replica's process (politely: SIGTERM, ``__del__``)."""

    KIND: ClassVar[str] = "ReplicaStopping"
    FAMILY: ClassVar[str] = "decision"

    replica: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ReplicaKilled(Event):
    """Decision: a stopping replica overran its stop timeout; kill it (SIGKILL)."""

    KIND: ClassVar[str] = "ReplicaKilled"
    FAMILY: ClassVar[str] = "decision"

    replica: str
    reason: str


@dataclasses.dataclass(frozen=True)
class AutoscaleDecision(Event):
    """Decision: change a deployment's target replica count.

    ``evidence`` holds everything the policy looked at (the load samples, the
    running count, the config values used) so the decision can be re-derived.
    """

    KIND: ClassVar[str] = "AutoscaleDecision"
    FAMILY: ClassVar[str] = "decision"

    app: str
    deployment: str
    from_replicas: int
    to_replicas: int
    reason: str
    evidence: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class DeploymentFailed(Event):
    """Decision: give up on a deployment's current version (``DEPLOY_FAILED``)."""

    KIND: ClassVar[str] = "DeploymentFailed"
    FAMILY: ClassVar[str] = "decision"

    app: str
    deployment: str
    failures: int
    error: str


@dataclasses.dataclass(frozen=True)
class DeploymentPending(Event):
    """Decision: some wanted replicas of a deployment cannot be placed now.

    ``message`` says why, for an operator (what a replica needs, what is free
    and what the instance has). It is recorded once per change of message; an
    empty message says that nothing is pending any more.
    """

    KIND: ClassVar[str] = "DeploymentPending"
    FAMILY: ClassVar[str] = "decision"

    app: str
    deployment: str
    message: str


@dataclasses.dataclass(frozen=True)
class DeploymentRemoved(Event):
    """Decision: a deployment that is no longer wanted has no replica left; forget it."""

    KIND: ClassVar[str] = "DeploymentRemoved"
    FAMILY: ClassVar[str] = "decision"

    app: str
    deployment: str


@dataclasses.dataclass(frozen=True)
class AppRemoved(Event):
    """Decision: a deleted application has no deployment left; forget it."""

    KIND: ClassVar[str] = "AppRemoved"
    FAMILY: ClassVar[str] = "decision"

    app: str


# ----------------------------------------------------------------------------- codec

EVENT_TYPES: dict[str, type[Event]] = {}
"""Every known event kind, by name."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register(cls: type[E]) -> type[E]:
    """Add an event type to the vocabulary (usable as a class decorator)."""
    existing = EVENT_TYPES.get(cls.KIND)
    if existing is not None and existing is not cls:
        raise ValueError(f"event kind {cls.KIND!r} is already registered")
    EVENT_TYPES[cls.KIND] = cls
    return cls


def register_upcaster(kind: str, from_version: int, upcaster: Upcaster) -> None:
    """Register how a payload of ``kind`` at ``from_version`` becomes ``from_version + 1``.

    Any change to an event's fields bumps its ``VERSION`` and registers an
    upcaster from the previous version, so that old logs stay readable and an
    older trioserve refuses a newer log with :class:`EventVersionError`.
    """
    if (kind, from_version) in _UPCASTERS:
        raise ValueError(f"an upcaster for {kind!r} version {from_version} is already registered")
    _UPCASTERS[(kind, from_version)] = upcaster


for _cls in (
    AppDeployed,
    AppDeleted,
    DeploymentScaled,
    ControllerStarted,
    ReplicaRunning,
    ReplicaStartFailed,
    ReplicaDied,
    ReplicaDrained,
    ReplicaExited,
    HealthCheckFailed,
    HealthCheckPassed,
    ReplicaStarting,
    ReplicaReconfigured,
    ReplicaDraining,
    ReplicaStopping,
    ReplicaKilled,
    AutoscaleDecision,
    DeploymentFailed,
    DeploymentPending,
    DeploymentRemoved,
    AppRemoved,
    ProxyStarted,
    ProxyExited,
    ConfigDeployed,
    ReplicaAdopted,
):
    register(_cls)


def _controller_started_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "resources": None}


def _replica_starting_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "gpu_ids": []}


register_upcaster("ControllerStarted", 1, _controller_started_v1_to_v2)
register_upcaster("ReplicaStarting", 1, _replica_starting_v1_to_v2)

DECISION_KINDS = frozenset(k for k, c in EVENT_TYPES.items() if c.FAMILY == "decision")
"""The kinds that :func:`trioserve.core.reconcile.decide` emits."""


def encode(event: Event) -> tuple[str, int, bytes]:
    """Return ``(kind, version, payload)`` for storage; the payload is msgpack."""
    if EVENT_TYPES.get(event.KIND) is not type(event):
        raise TypeError(f"{type(event).__name__} is not a registered event type")
    payload = msgpack.packb(event.to_payload(), use_bin_type=True)
    return event.KIND, event.VERSION, payload


def decode(kind: str, version: int, payload: bytes) -> Event:
    """Rebuild an event stored by :func:`encode`, upcasting older versions.

    Raises :class:`EventVersionError` for a version newer than this code knows
    and :class:`EventDecodeError` for an unknown kind or a payload that does
    not fit the kind.
    """
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise EventDecodeError(f"unknown event kind {kind!r}")
    if not isinstance(version, int):
        raise EventDecodeError(f"event kind {kind!r}: version {version!r} is not an integer")
    if version > cls.VERSION:
        raise EventVersionError(
            f"event kind {kind!r} has version {version}, but this trioserve only knows "
            f"versions up to {cls.VERSION}; upgrade trioserve to read this log"
        )
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventDecodeError(f"event kind {kind!r}: payload is not valid msgpack: {exc}") from exc
    if not isinstance(data, dict):
        raise EventDecodeError(f"event kind {kind!r}: payload is not a map")
    while version < cls.VERSION:
        upcaster = _UPCASTERS.get((kind, version))
        if upcaster is None:
            raise EventDecodeError(f"no upcaster for event kind {kind!r} version {version}")
        try:
            data = upcaster(data)
        except Exception as exc:
            raise EventDecodeError(
                f"event kind {kind!r}: upcasting from version {version} failed: {exc}"
            ) from exc
        version += 1
    try:
        return cls.from_payload(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise EventDecodeError(f"event kind {kind!r}: payload does not fit: {exc}") from exc
