"""``@serve.deployment``, :class:`Deployment`, :class:`Application`, and building an app.

A :class:`Deployment` is a class or function with its options (Ray Serve's,
with Ray Serve's defaults and errors). ``Deployment.bind(*args, **kwargs)``
makes an :class:`Application`: the deployment with its constructor
arguments. Applications bound into the arguments of another (anywhere: in a
list, a dict, an object) are the application's other deployments; in the
replica they arrive as :class:`~trioserve.handle.DeploymentHandle` objects
(model composition).

:func:`build_app` turns an application into what the controller runs: one
:class:`~trioserve.core.events.DeploymentSpec` per deployment (children first,
the ingress last) and the blobs they refer to:

* ``source``: ``import:<module>:<qualname>`` when the code can be imported by
  name from a module (the replica imports it), otherwise ``blob:<digest>`` of
  the code pickled by value with cloudpickle (classes defined in a script);
* ``init_args``: the digest of the pickled ``(args, kwargs)``, nested
  applications replaced by handles;
* ``code_version``: a digest of the code (the module's source file, or the
  pickled code), the init arguments, ``ray_actor_options`` and
  ``event_loop``; with an explicit ``version``, of the version instead of
  code and arguments, as in Ray Serve. Replicas of another code version are
  replaced by a rolling update; any other option changes in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from trioserve.core.config import AutoscalingConfig, ConfigError, DeploymentConfig
from trioserve.core.events import DeploymentSpec
from trioserve.core.logs import check_logging_config
from trioserve.core.runtime_env import validate_runtime_env
from trioserve.exceptions import warn_deprecated

__all__ = [
    "Application",
    "BuiltApp",
    "Deployment",
    "build_app",
    "deployment",
    "validate_app_name",
    "validate_route_prefix",
]

DEFAULT_APP_NAME = "default"

_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "DEFAULT"})()

_CONFIG_OPTIONS = (
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "user_config",
    "autoscaling_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "ray_actor_options",
    "logging_config",
    "version",
    "event_loop",
)
_IGNORED_OPTIONS = (
    "placement_group_bundles",
    "placement_group_strategy",
    "max_replicas_per_node",
    "request_router_config",
)
RAY_ACTOR_OPTIONS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "runtime_env",
    "accelerator_type",
    "object_store_memory",
)
AUTO_NUM_REPLICAS_DEFAULTS = {
    "min_replicas": 1,
    "max_replicas": 100,
    "target_ongoing_requests": 2.0,
}
"""What ``num_replicas="auto"`` means, as in Ray Serve (overridden by ``autoscaling_config``)."""


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate user-set deployment options; returns them normalised."""
    out = dict(options)
    if "route_prefix" in out:
        raise ValueError(
            "`route_prefix` can no longer be specified at the deployment level. "
            "Pass it to `serve.run` or in the application config instead."
        )
    if "max_concurrent_queries" in out:
        warn_deprecated("the deployment option 'max_concurrent_queries'", "'max_ongoing_requests'")
        value = out.pop("max_concurrent_queries")
        out.setdefault("max_ongoing_requests", value)
    for name in _IGNORED_OPTIONS:
        if name in out:
            out.pop(name)
            warn_deprecated(
                f"the deployment option {name!r}",
                "ray_actor_options (trioserve runs on one machine; the option has no effect)",
            )
    if "name" in out:
        _check_deployment_name(out["name"])
    if "max_ongoing_requests" in out and out["max_ongoing_requests"] is None:
        raise ValueError("`max_ongoing_requests` must be non-null, got None.")
    num = out.get("num_replicas", _UNSET)
    if num == 0:
        raise ValueError("num_replicas is expected to larger than 0")
    if num not in (_UNSET, None, "auto") and (
        isinstance(num, bool) or not isinstance(num, int) or num < 0
    ):
        raise TypeError(f'num_replicas must be a positive int or "auto", got {num!r}')
    auto = out.get("autoscaling_config", _UNSET)
    if num not in (_UNSET, None, "auto") and auto not in (_UNSET, None):
        raise ValueError(
            "Manually setting num_replicas is not allowed when autoscaling_config is provided."
        )
    if isinstance(auto, Mapping):
        out["autoscaling_config"] = AutoscalingConfig.from_dict(auto)
    elif auto not in (_UNSET, None) and not isinstance(auto, AutoscalingConfig):
        raise TypeError(f"autoscaling_config must be a dict or AutoscalingConfig, got {auto!r}")
    actor = out.get("ray_actor_options")
    if actor is not None:
        if not isinstance(actor, Mapping):
            raise TypeError(f"ray_actor_options must be a dict, got {actor!r}")
        unknown = sorted(set(actor) - set(RAY_ACTOR_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown ray_actor_options {', '.join(map(repr, unknown))}; valid options "
                f"are {', '.join(RAY_ACTOR_OPTIONS)}."
            )
        if actor.get("runtime_env") is not None:
            # Checked now (a remote URI or a missing folder fails at declaration),
            # and the working dir made absolute for a controller elsewhere.
            env = validate_runtime_env(actor["runtime_env"])
            out["ray_actor_options"] = {**actor, "runtime_env": env}
    if out.get("logging_config") is not None:
        # Ray's fields, with TEXT/JSON and a real level: refused here, not in the replica.
        out["logging_config"] = check_logging_config(out["logging_config"])
    if "version" in out and out["version"] is not None:
        if not isinstance(out["version"], str):
            raise TypeError(f"version must be a string, got {out['version']!r}")
    return out


def _check_deployment_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"A deployment's name must be a non-empty string, got {name!r}")
    for char in "#/":
        if char in name:
            raise ValueError(f"Deployment names must not contain {char!r}, got {name!r}.")


def _make_config(options: Mapping[str, Any]) -> DeploymentConfig:
    fields = {k: v for k, v in options.items() if k in _CONFIG_OPTIONS}
    if fields.get("num_replicas") == "auto":
        auto = fields.get("autoscaling_config")
        merged = dict(AUTO_NUM_REPLICAS_DEFAULTS)
        if isinstance(auto, AutoscalingConfig):
            defaults = AutoscalingConfig().to_dict()
            merged.update({k: v for k, v in auto.to_dict().items() if v != defaults[k]})
        fields["autoscaling_config"] = AutoscalingConfig.from_dict(merged)
        fields["num_replicas"] = None
    try:
        return DeploymentConfig(**fields)
    except ConfigError:
        raise
    except TypeError as exc:  # a value of the wrong type deep in a field
        raise ConfigError(str(exc)) from None


class Deployment:
    """A class or function served as a deployment, with its options.

    Made by ``@serve.deployment``. ``.options(...)`` returns a copy with
    options changed; ``.bind(*args, **kwargs)`` returns an :class:`Application`.
    """

    def __init__(self, func_or_class: Any, options: Mapping[str, Any]) -> None:
        if isinstance(func_or_class, Deployment):
            raise TypeError("@serve.deployment was applied twice")
        if not callable(func_or_class):
            raise TypeError(
                f"@serve.deployment must decorate a class or a function, got {func_or_class!r}"
            )
        self._func_or_class = func_or_class
        self._options = _check_options(options)
        self._config = _make_config(self._options)
        self._name = str(
            self._options.get("name")
            or getattr(func_or_class, "__name__", type(func_or_class).__name__)
        )

    # -- what it is

    @property
    def func_or_class(self) -> Any:
        """The user's class or function."""
        return self._func_or_class

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> DeploymentConfig:
        """The options as a :class:`~trioserve.core.config.DeploymentConfig`."""
        return self._config

    @property
    def version(self) -> str | None:
        return self._config.version

    @property
    def num_replicas(self) -> int | None:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def autoscaling_config(self) -> AutoscalingConfig | None:
        return self._config.autoscaling_config

    @property
    def ray_actor_options(self) -> dict[str, Any] | None:
        options = self._config.ray_actor_options
        return None if options is None else dict(options)

    @property
    def user_configured_option_names(self) -> frozenset[str]:
        """The options the user set (the others have their defaults)."""
        return frozenset(self._options)

    # -- deriving

    def options(self, **options: Any) -> Deployment:
        """A copy with these options changed (the same keywords as ``@serve.deployment``).

        Setting ``num_replicas`` drops an inherited ``autoscaling_config``, and
        setting ``autoscaling_config`` drops an inherited ``num_replicas``.
        """
        _reject_unknown(options)
        merged = dict(self._options)
        if options.get("num_replicas") not in (None, "auto") and "num_replicas" in options:
            merged.pop("autoscaling_config", None)
        if options.get("autoscaling_config") is not None:
            if merged.get("num_replicas") != "auto":
                merged.pop("num_replicas", None)
        merged.update({k: v for k, v in options.items() if v is not _UNSET})
        if "name" not in options and "name" not in self._options:
            merged.pop("name", None)
        return type(self)(self._func_or_class, merged)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """This deployment with its constructor arguments: an application to run."""
        if not inspect.isclass(self._func_or_class) and (args or kwargs):
            raise ValueError(
                f"Deployment '{self._name}' is a function: it takes no constructor "
                "arguments; pass values in the request instead."
            )
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Deployments cannot be constructed directly. Use `.bind()` instead.")

    # -- Ray Serve 1.x

    def deploy(self, *args: Any, **kwargs: Any) -> None:
        """Ray Serve 1.x: run this deployment alone, at ``/{name}``. Deprecated."""
        warn_deprecated(
            "Deployment.deploy()", "serve.run(Deployment.bind(...), name=..., route_prefix=...)"
        )
        from trioserve import api

        api.run(self.bind(*args, **kwargs), name=self._name, route_prefix=f"/{self._name}")

    def get_handle(self) -> Any:
        """Ray Serve 1.x: a handle to a deployment run with :meth:`deploy`. Deprecated."""
        warn_deprecated("Deployment.get_handle()", "serve.get_app_handle(name)")
        from trioserve import api

        return api.get_app_handle(self._name)

    def __repr__(self) -> str:
        return f"Deployment(name={self._name!r})"


class Application:
    """A deployment bound to its constructor arguments: what ``serve.run`` runs.

    Other applications in the arguments are this application's other
    deployments; the replica receives handles to them.
    """

    def __init__(self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._bound_deployment = deployment
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment:
        return self._bound_deployment

    def __repr__(self) -> str:
        return f"Application({self._bound_deployment.name})"


def _reject_unknown(options: Mapping[str, Any]) -> None:
    known = {
        "name",
        "route_prefix",
        "max_concurrent_queries",
        *_CONFIG_OPTIONS,
        *_IGNORED_OPTIONS,
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"Unknown deployment option(s): {', '.join(unknown)}")


def deployment(
    _func_or_class: Any = None,
    *,
    name: str = _UNSET,
    version: str = _UNSET,
    num_replicas: int | str | None = _UNSET,
    route_prefix: str | None = _UNSET,
    ray_actor_options: dict[str, Any] = _UNSET,
    placement_group_bundles: Any = _UNSET,
    placement_group_strategy: Any = _UNSET,
    max_replicas_per_node: Any = _UNSET,
    user_config: Any = _UNSET,
    max_ongoing_requests: int = _UNSET,
    max_queued_requests: int = _UNSET,
    autoscaling_config: dict[str, Any] | AutoscalingConfig | None = _UNSET,
    graceful_shutdown_wait_loop_s: float = _UNSET,
    graceful_shutdown_timeout_s: float = _UNSET,
    health_check_period_s: float = _UNSET,
    health_check_timeout_s: float = _UNSET,
    logging_config: dict[str, Any] | None = _UNSET,
    request_router_config: Any = _UNSET,
    max_concurrent_queries: int = _UNSET,
    event_loop: str = _UNSET,
) -> Any:
    """Make a class or function a :class:`Deployment`: ``@serve.deployment`` or
    ``@serve.deployment(num_replicas=2, ...)``.

    The options and their defaults are Ray Serve's (see
    :class:`~trioserve.core.config.DeploymentConfig`); ``event_loop`` is
    trioserve's own (``"asyncio"``, the default, or ``"trio"``). Invalid
    options raise at once, with Ray Serve's messages.
    """
    options = {k: v for k, v in locals().items() if k != "_func_or_class" and v is not _UNSET}
    if "version" in options:
        warn_deprecated("the deployment option 'version'", "code changes (the default)")
    checked = _check_options(options)  # fail at decoration time, not at bind time

    def decorate(func_or_class: Any) -> Deployment:
        return Deployment(func_or_class, checked)

    if _func_or_class is not None and callable(_func_or_class):
        return decorate(_func_or_class)
    if _func_or_class is not None:
        raise TypeError(
            f"@serve.deployment must decorate a class or a function, got {_func_or_class!r}"
        )
    return decorate


# ------------------------------------------------------------------------ building


def validate_route_prefix(route_prefix: Any) -> None:
    """Raise ``ValueError`` unless ``route_prefix`` is None or a path like ``/api``."""
    if route_prefix is None:
        return
    if not isinstance(route_prefix, str):
        raise TypeError(f"route_prefix must be a string or None, got {route_prefix!r}")
    if not route_prefix.startswith("/"):
        raise ValueError(
            f"Invalid route_prefix '{route_prefix}': the route_prefix must start with a "
            "forward slash ('/')."
        )
    if route_prefix != "/" and route_prefix.endswith("/"):
        raise ValueError(
            f"Invalid route_prefix '{route_prefix}': the route_prefix cannot end with a "
            "forward slash ('/')."
        )
    if "{" in route_prefix or "}" in route_prefix:
        raise ValueError(
            f"Invalid route_prefix '{route_prefix}': the route_prefix cannot contain "
            "wildcards ('{' and '}')."
        )


def validate_app_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        from trioserve.exceptions import RayServeException

        raise RayServeException("Application name must a non-empty string.")
    if "/" in name or "#" in name:
        raise ValueError(f"Application names must not contain '/' or '#', got {name!r}.")


@dataclasses.dataclass
class BuiltApp:
    """An application ready for the controller: specs (ingress last) and their blobs."""

    name: str
    route_prefix: str | None
    ingress: str
    deployments: list[DeploymentSpec]
    blobs: dict[str, bytes]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_app(
    app: Application,
    name: str,
    route_prefix: str | None = "/",
    *,
    logging_config: Mapping[str, Any] | None = None,
) -> BuiltApp:
    """Turn ``app`` and the applications bound into it into deployment specs.

    Deployments are named by their ``name`` option (or class/function name);
    two different bound deployments with the same name get the suffixes
    ``_1``, ``_2``, ... as in Ray Serve. The same :class:`Application` object
    bound twice is one deployment. ``logging_config`` applies to the
    deployments that have none of their own.
    """
    if not isinstance(app, Application):
        raise TypeError("`serve.run` expects an `Application` returned by `Deployment.bind()`.")
    validate_app_name(name)
    validate_route_prefix(route_prefix)
    names: dict[int, str] = {}
    specs: list[DeploymentSpec] = []
    blobs: dict[str, bytes] = {}
    _build(app, name, names, specs, blobs, set())
    if logging_config is not None:
        checked = _check_options({"logging_config": logging_config})["logging_config"]
        specs = [
            s
            if s.config.logging_config is not None
            else dataclasses.replace(
                s, config=dataclasses.replace(s.config, logging_config=checked)
            )
            for s in specs
        ]
    return BuiltApp(name, route_prefix, specs[-1].name, specs, blobs)


def _build(
    app: Application,
    app_name: str,
    names: dict[int, str],
    specs: list[DeploymentSpec],
    blobs: dict[str, bytes],
    visiting: set[int],
) -> str:
    key = id(app)
    if key in names:
        return names[key]
    if key in visiting:
        raise ValueError(f"Application {app!r} is bound into its own arguments (a cycle).")
    visiting.add(key)
    dep = app._bound_deployment
    children = _find_applications((app._args, app._kwargs))
    handles: dict[int, Any] = {}
    from trioserve.handle import DeploymentHandle

    for child in children:
        child_name = _build(child, app_name, names, specs, blobs, visiting)
        handles[id(child)] = DeploymentHandle(child_name, app_name)
    visiting.discard(key)

    name = dep.name
    taken = set(names.values())
    suffix = 1
    while name in taken:
        name = f"{dep.name}_{suffix}"
        suffix += 1
    names[key] = name

    source, code_blob, code_digest = _source(dep.func_or_class, name)
    if code_blob is not None:
        blobs[_digest(code_blob)] = code_blob
    init_args: str | None = None
    init_digest = ""
    if app._args or app._kwargs:
        data = _pickle_args(name, app._args, app._kwargs, handles)
        init_args = init_digest = _digest(data)
        blobs[init_args] = data
    config = dep.config
    if config.version is not None:
        basis: dict[str, Any] = {"version": config.version}
    else:
        basis = {"code": code_digest, "init": init_digest}
    basis["ray_actor_options"] = config.to_dict()["ray_actor_options"]
    basis["event_loop"] = config.event_loop
    text = json.dumps(basis, sort_keys=True, default=repr)
    specs.append(
        DeploymentSpec(
            name=name,
            code_version=_digest(text.encode())[:16],
            config=config,
            source=source,
            init_args=init_args,
        )
    )
    return name


def _source(target: Any, name: str) -> tuple[str, bytes | None, str]:
    """Where a replica finds the code: ``(source, blob or None, digest of the code)``."""
    module_name = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if module_name and module_name != "__main__" and "<locals>" not in qualname:
        try:
            module = importlib.import_module(module_name)
            found: Any = module
            for part in qualname.split("."):
                found = getattr(found, part)
            if found is target or getattr(found, "func_or_class", None) is target:
                path = inspect.getsourcefile(module)
                code = open(path, "rb").read() if path else repr(target).encode()
                return (
                    f"import:{module_name}:{qualname}",
                    None,
                    _digest(code + qualname.encode()),
                )
        except Exception:  # not importable by name: ship it by value
            pass
    import cloudpickle

    try:
        blob: bytes = cloudpickle.dumps(target)
    except Exception as exc:
        raise TypeError(f"The code of deployment '{name}' cannot be pickled: {exc}") from exc
    digest = _digest(blob)
    return f"blob:{digest}", blob, digest


def _find_applications(value: Any) -> list[Application]:
    """The applications inside ``value``, anywhere, in order, each once."""
    found: list[Application] = []
    seen: set[int] = set()

    def collect(app: Application) -> None:
        if id(app) not in seen:
            seen.add(id(app))
            found.append(app)

    _scan(value, collect)
    return found


def _scan(value: Any, on_app: Callable[[Application], None]) -> bytes:
    """Pickle ``value``, each :class:`Application` inside it as a reference ``on_app`` sees."""
    import cloudpickle

    class Scanner(cloudpickle.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, Application):
                on_app(obj)
                return ("app", id(obj))
            return None

    buffer = io.BytesIO()
    try:
        Scanner(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception as exc:
        raise TypeError(f"The arguments of .bind() cannot be pickled: {exc}") from exc
    return buffer.getvalue()


def _pickle_args(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], handles: Mapping[int, Any]
) -> bytes:
    """The blob of ``(args, kwargs)`` with applications replaced by handles."""
    import cloudpickle

    value = (tuple(args), dict(kwargs))
    if handles:
        data = _scan(value, lambda app: None)

        class Loader(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                return handles[pid[1]]

        value = Loader(io.BytesIO(data)).load()
    try:
        blob: bytes = cloudpickle.dumps(value)
    except Exception as exc:
        raise TypeError(f"The arguments of {name}.bind() cannot be pickled: {exc}") from exc
    return blob
