"""Deployment and autoscaling configuration: plain, frozen, validated values.

Field names and defaults follow Ray Serve's ``DeploymentConfig`` and
``AutoscalingConfig`` so that options written for Ray Serve mean the same
thing here. Every class converts to and from a plain ``dict`` of msgpack-able
values (``to_dict`` / ``from_dict``), which is how configurations travel inside
the event log.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_ONGOING_REQUESTS",
    "DEFAULT_TARGET_ONGOING_REQUESTS",
    "EVENT_LOOPS",
    "AutoscalingConfig",
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_KEEP_ALIVE_TIMEOUT_S",
    "DEFAULT_MAX_REQUEST_BODY_BYTES",
    "IGNORED_HTTP_FIELDS",
    "HTTPOptions",
    "ConfigError",
    "DeploymentConfig",
    "LIGHTWEIGHT_FIELDS",
    "REPLICA_CONFIG_FIELDS",
    "RESOURCE_OPTIONS",
    "check_ray_actor_options",
]

DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0
EVENT_LOOPS = ("asyncio", "trio")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a non-negative number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AutoscalingConfig:
    """How a deployment scales with load (Ray Serve's fields and defaults).

    The number of replicas is kept near ``total ongoing requests /
    target_ongoing_requests``, within ``[min_replicas, max_replicas]``, changing
    only after ``upscale_delay_s`` / ``downscale_delay_s`` of agreement.
    """

    min_replicas: int = 1
    initial_replicas: int | None = None
    max_replicas: int = 1
    target_ongoing_requests: float = DEFAULT_TARGET_ONGOING_REQUESTS
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    smoothing_factor: float = 1.0
    upscale_smoothing_factor: float | None = None
    downscale_smoothing_factor: float | None = None
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    upscale_delay_s: float = 30.0
    aggregation_function: str = "mean"
    target_num_ongoing_requests_per_replica: float | None = None
    """The older name of ``target_ongoing_requests``: accepted, with a warning."""

    def __post_init__(self) -> None:
        old = self.target_num_ongoing_requests_per_replica
        if old is not None:
            from trioserve.exceptions import warn_deprecated

            warn_deprecated(
                "autoscaling_config 'target_num_ongoing_requests_per_replica'",
                "'target_ongoing_requests'",
                stacklevel=4,
            )
            if self.target_ongoing_requests == DEFAULT_TARGET_ONGOING_REQUESTS:
                object.__setattr__(self, "target_ongoing_requests", old)
            object.__setattr__(self, "target_num_ongoing_requests_per_replica", None)
        if self.min_replicas < 0:
            raise ConfigError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < 1:
            raise ConfigError(f"max_replicas must be >= 1, got {self.max_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"max_replicas ({self.max_replicas}) must be greater than or equal "
                f"to min_replicas ({self.min_replicas})"
            )
        if self.initial_replicas is not None:
            if self.initial_replicas < self.min_replicas:
                raise ConfigError(
                    f"min_replicas ({self.min_replicas}) must be less than or equal "
                    f"to initial_replicas ({self.initial_replicas})"
                )
            if self.initial_replicas > self.max_replicas:
                raise ConfigError(
                    f"max_replicas ({self.max_replicas}) must be greater than or "
                    f"equal to initial_replicas ({self.initial_replicas})"
                )
        _positive("target_ongoing_requests", self.target_ongoing_requests)
        _positive("metrics_interval_s", self.metrics_interval_s)
        _positive("look_back_period_s", self.look_back_period_s)
        _positive("smoothing_factor", self.smoothing_factor)
        for name in (
            "upscale_smoothing_factor",
            "downscale_smoothing_factor",
            "upscaling_factor",
            "downscaling_factor",
        ):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        _non_negative("downscale_delay_s", self.downscale_delay_s)
        _non_negative("upscale_delay_s", self.upscale_delay_s)
        if self.downscale_to_zero_delay_s is not None:
            _non_negative("downscale_to_zero_delay_s", self.downscale_to_zero_delay_s)
        if self.aggregation_function not in ("mean", "max", "min"):
            raise ConfigError(
                "aggregation_function must be one of 'mean', 'max', 'min', got "
                f"{self.aggregation_function!r}"
            )

    @property
    def upscale_factor(self) -> float:
        """The gain applied when scaling up (``upscaling_factor`` or its older names)."""
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    @property
    def downscale_factor(self) -> float:
        """The gain applied when scaling down (``downscaling_factor`` or its older names)."""
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor

    @property
    def start_replicas(self) -> int:
        """The number of replicas a newly deployed deployment starts with."""
        if self.initial_replicas is not None:
            return self.initial_replicas
        return self.min_replicas

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["target_num_ongoing_requests_per_replica"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoscalingConfig:
        return cls(**_known_fields(cls, data, "autoscaling_config"))


LIGHTWEIGHT_FIELDS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "user_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "logging_config",
)
"""Fields whose change updates running replicas in place (no restart)."""

REPLICA_CONFIG_FIELDS = LIGHTWEIGHT_FIELDS[2:]
"""The in-place fields a replica itself uses; a change to them reconfigures it.

``num_replicas`` and ``autoscaling_config`` only change how many replicas run.
"""


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """The per-deployment options of Ray Serve, with Ray Serve's defaults.

    ``num_replicas`` is ``None`` when ``autoscaling_config`` is set. Changing
    any of :data:`LIGHTWEIGHT_FIELDS` updates replicas in place; anything else
    (code, init arguments, ``ray_actor_options``, ``version``) restarts them.
    """

    num_replicas: int | None = None
    """Defaults to 1 without ``autoscaling_config``; must stay unset with it."""
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    ray_actor_options: Mapping[str, Any] | None = None
    logging_config: Mapping[str, Any] | None = None
    version: str | None = None
    event_loop: str = "asyncio"
    """trioserve's own option: the event loop user coroutines run on in the replica,
    ``"asyncio"`` (as in Ray Serve) or ``"trio"``. Changing it restarts replicas."""

    def __post_init__(self) -> None:
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ConfigError(
                "Manually setting num_replicas is not allowed when autoscaling_config is provided."
            )
        if self.autoscaling_config is None:
            if self.num_replicas is None:
                object.__setattr__(self, "num_replicas", 1)
            assert self.num_replicas is not None
            if self.num_replicas <= 0:
                raise ConfigError(f"num_replicas must be > 0, got {self.num_replicas}")
        if self.max_ongoing_requests <= 0:
            raise ConfigError(f"max_ongoing_requests must be > 0, got {self.max_ongoing_requests}")
        if self.max_queued_requests != -1 and self.max_queued_requests <= 0:
            raise ConfigError(
                f"max_queued_requests must be -1 (no limit) or > 0, got {self.max_queued_requests}"
            )
        if self.user_config is not None:
            # As in Ray Serve, user_config is JSON: normalising it here makes a
            # replayed config equal to the live one (tuples become lists).
            try:
                text = json.dumps(self.user_config, sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"user_config must be JSON-serializable: {exc}") from None
            object.__setattr__(self, "user_config", json.loads(text))
        _non_negative("graceful_shutdown_wait_loop_s", self.graceful_shutdown_wait_loop_s)
        _non_negative("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s)
        _positive("health_check_period_s", self.health_check_period_s)
        _positive("health_check_timeout_s", self.health_check_timeout_s)
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}"
            )
        if self.ray_actor_options is not None:
            check_ray_actor_options(self.ray_actor_options)

    @property
    def initial_target(self) -> int:
        """The replica count a newly deployed deployment aims for."""
        if self.autoscaling_config is not None:
            return self.autoscaling_config.start_replicas
        assert self.num_replicas is not None
        return self.num_replicas

    def lightweight_digest(self) -> str:
        """A digest of the replica-side in-place fields (:data:`REPLICA_CONFIG_FIELDS`).

        Two configs with equal digests need no ``reconfigure`` between them.
        """
        data = self.to_dict()
        picked = {name: data[name] for name in REPLICA_CONFIG_FIELDS}
        text = json.dumps(picked, sort_keys=True, default=repr, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "user_config": self.user_config,
            "autoscaling_config": (
                None if self.autoscaling_config is None else self.autoscaling_config.to_dict()
            ),
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "ray_actor_options": (
                None if self.ray_actor_options is None else dict(self.ray_actor_options)
            ),
            "logging_config": None if self.logging_config is None else dict(self.logging_config),
            "version": self.version,
            "event_loop": self.event_loop,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentConfig:
        fields = _known_fields(cls, data, "deployment config")
        autoscaling = fields.get("autoscaling_config")
        if isinstance(autoscaling, Mapping):
            fields["autoscaling_config"] = AutoscalingConfig.from_dict(autoscaling)
        return cls(**fields)


RESOURCE_OPTIONS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
"""The ``ray_actor_options`` that reserve a built-in resource, and its name."""


def _resource_amount(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"ray_actor_options {name} must be a number, got {value!r}")
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"ray_actor_options {name} must be a non-negative number, got {value!r}")


def check_ray_actor_options(options: Any) -> None:
    """Validate the resource entries of ``ray_actor_options``; raise :class:`ConfigError`
    naming the option. Other options (``runtime_env``, ...) are not looked at here."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"ray_actor_options must be a dict, got {options!r}")
    for name in RESOURCE_OPTIONS:
        value = options.get(name)
        if value is not None:
            _resource_amount(name, value)
    gpus = options.get("num_gpus")
    if gpus is not None and gpus > 1 and not float(gpus).is_integer():
        raise ConfigError(
            f"ray_actor_options num_gpus must be a whole number when above 1, got {gpus!r}"
        )
    custom = options.get("resources")
    if custom is None:
        return
    if not isinstance(custom, Mapping):
        raise ConfigError(f"ray_actor_options resources must be a dict, got {custom!r}")
    for key, value in custom.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(
                f"ray_actor_options resources: a resource name must be a non-empty string, "
                f"got {key!r}"
            )
        if key in RESOURCE_OPTIONS.values():
            option = next(o for o, n in RESOURCE_OPTIONS.items() if n == key)
            raise ConfigError(
                f"ray_actor_options resources: use the {option!r} option instead of {key!r} "
                "in 'resources'"
            )
        _resource_amount(f"resources[{key!r}]", value)


DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 90.0
"""Ray Serve's default (``DEFAULT_UVICORN_KEEP_ALIVE_TIMEOUT_S``)."""
DEFAULT_MAX_REQUEST_BODY_BYTES = 100 * 1024 * 1024
PROXY_LOCATIONS = ("HeadOnly", "EveryNode", "Disabled")
IGNORED_HTTP_FIELDS = (
    "middlewares",
    "num_cpus",
    "root_url",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_keyfile_password",
    "ssl_ca_certs",
)
"""Ray Serve ``HTTPOptions`` fields that trioserve accepts and ignores."""


@dataclasses.dataclass(frozen=True)
class HTTPOptions:
    """How the proxy serves HTTP (Ray Serve's ``HTTPOptions``, one machine).

    ``host``/``port`` are where it listens (port 0: a free port, which
    ``serve.status()`` then shows); ``host=None`` runs no proxy, as in Ray
    Serve (``location`` becomes ``"Disabled"`` and ``host`` keeps its default,
    so that it is always a string). ``root_path`` is prepended to every
    application's ASGI ``root_path`` (for serving behind a path-prefixing
    reverse proxy); ``request_timeout_s`` bounds a request end to end (408
    after it; ``None``: no bound); ``keep_alive_timeout_s`` closes idle
    client connections (90 s by default, as in Ray Serve). trioserve adds
    ``max_request_body_bytes`` (413 above it) and ``event_loop``, the proxy's
    loop (``"asyncio"`` with uvloop, or ``"trio"``). ``location`` is Ray's
    proxy location: ``"Disabled"`` (or ``"NoServer"``, or ``None``) runs no
    proxy; the others run one, on this machine.

    Ray Serve's ``middlewares``, ``num_cpus``, ``root_url``, ``ssl_keyfile``,
    ``ssl_certfile``, ``ssl_keyfile_password`` and ``ssl_ca_certs``
    (:data:`IGNORED_HTTP_FIELDS`) are accepted so that options written for Ray
    Serve load, and are ignored: they have no effect (the proxy serves plain
    HTTP, never HTTPS), are left out of ``to_dict``, comparisons and the repr,
    and values other than Ray's defaults give one ``UserWarning`` naming them.
    """

    host: str = DEFAULT_HTTP_HOST
    port: int = DEFAULT_HTTP_PORT
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    event_loop: str = "asyncio"
    location: str = "HeadOnly"
    # Accepted for Ray Serve compatibility, with Ray's defaults; no effect here.
    middlewares: list[Any] = dataclasses.field(default_factory=list, compare=False, repr=False)
    num_cpus: int = dataclasses.field(default=0, compare=False, repr=False)
    root_url: str = dataclasses.field(default="", compare=False, repr=False)
    ssl_keyfile: str | None = dataclasses.field(default=None, compare=False, repr=False)
    ssl_certfile: str | None = dataclasses.field(default=None, compare=False, repr=False)
    ssl_keyfile_password: str | None = dataclasses.field(default=None, compare=False, repr=False)
    ssl_ca_certs: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        given = [name for name in IGNORED_HTTP_FIELDS if getattr(self, name)]
        if given:
            https = any(name.startswith("ssl_") for name in given)
            warnings.warn(
                f"http_options {', '.join(given)}: accepted for compatibility with Ray "
                "Serve and ignored by trioserve"
                + (" (the proxy serves plain HTTP, not HTTPS)" if https else ""),
                UserWarning,
                stacklevel=3,
            )
        # Ray Serve: no host, or no location, means no proxy.
        if self.host is None or self.location is None:
            object.__setattr__(self, "location", "Disabled")
        if self.host is None:
            object.__setattr__(self, "host", DEFAULT_HTTP_HOST)
        if not isinstance(self.host, str):
            raise ConfigError(f"http_options host must be a str or None, got {self.host!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"http_options port must be an int in [0, 65535], got {self.port!r}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ConfigError(
                f"http_options root_path must start with '/' and not end with '/', "
                f"got {self.root_path!r}"
            )
        if self.request_timeout_s is not None:
            _positive("http_options request_timeout_s", self.request_timeout_s)
        _positive("http_options keep_alive_timeout_s", self.keep_alive_timeout_s)
        _positive("http_options max_request_body_bytes", self.max_request_body_bytes)
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"http_options event_loop must be one of {EVENT_LOOPS}, got {self.event_loop!r}"
            )
        # Ray's ProxyLocation / DeploymentMode enums stand for their value.
        object.__setattr__(self, "location", getattr(self.location, "value", self.location))
        if self.location == "NoServer":
            object.__setattr__(self, "location", "Disabled")
        if self.location not in PROXY_LOCATIONS:
            raise ConfigError(
                f"proxy location must be one of {PROXY_LOCATIONS}, got {self.location!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether a proxy runs."""
        return self.location != "Disabled"

    def to_dict(self) -> dict[str, Any]:
        """The fields that take effect (the ignored Ray fields are left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in IGNORED_HTTP_FIELDS
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HTTPOptions:
        return cls(**_known_fields(cls, data, "http_options"))


def _known_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}")
    return dict(data)
