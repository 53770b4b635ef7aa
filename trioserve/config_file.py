"""Ray Serve YAML config files: parse, validate, build, and generate them.

A config file describes what to serve in Ray Serve's schema (``ServeDeploySchema``),
so files written for Ray Serve deploy unchanged::

    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: app1
        route_prefix: /calculator
        import_path: calculator:app
        args: {model: small}
        runtime_env: {working_dir: ., env_vars: {MODE: fast}}
        deployments:
          - name: Multiplier
            num_replicas: 2
            user_config: {factor: 3}

:func:`load_config_file` / :func:`parse_config` read a file into a
:class:`ServeConfig`, or raise :class:`ConfigFileError` naming the file, the
line, the key (``applications[0].deployments[1].num_replicas``), what is wrong
and what to do. Nothing is imported while parsing: a file that parses may
still fail to build (its import path does not import, an override names a
deployment the code has not), and :func:`build_from_config` reports that with
the line of the offending entry too, before anything is deployed.

:func:`build_from_config` imports an application (:func:`import_application`),
applies the file's per-deployment overrides (only the fields the file sets)
and the application's ``runtime_env``, and returns the
:class:`~trioserve.core.deployment.BuiltApp` the controller deploys. Building
the same file twice gives equal specs, so deploying a file again changes
nothing, and changing one override changes only that deployment.

:func:`build_config` and :func:`dump_config` write a config file for import
paths (``trioserve build``); :func:`run_foreground` is ``trioserve run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import traceback
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml

from trioserve.core.config import IGNORED_HTTP_FIELDS, AutoscalingConfig, HTTPOptions
from trioserve.core.deployment import (
    RAY_ACTOR_OPTIONS,
    Application,
    BuiltApp,
    Deployment,
    _find_applications,
    build_app,
)
from trioserve.core.logs import ENCODINGS, LEVELS, LOGGING_CONFIG_FIELDS, check_logging_config

__all__ = [
    "APP_KEYS",
    "DEPLOYMENT_KEYS",
    "HTTP_OPTIONS_KEYS",
    "RUNTIME_ENV_KEYS",
    "TOP_LEVEL_KEYS",
    "AppConfig",
    "ConfigFileError",
    "ServeConfig",
    "app_from_import_path",
    "build_applications",
    "build_config",
    "build_from_config",
    "dump_config",
    "http_options_of",
    "import_application",
    "is_config_path",
    "load_config_file",
    "parse_config",
    "parse_key_value_args",
    "run_foreground",
]

TOP_LEVEL_KEYS = (
    "proxy_location",
    "http_options",
    "grpc_options",
    "logging_config",
    "applications",
    "target_capacity",
)
"""The keys of a config file (Ray's ``ServeDeploySchema``)."""

APP_KEYS = (
    "name",
    "route_prefix",
    "import_path",
    "runtime_env",
    "args",
    "deployments",
    "logging_config",
    "external_scaler_enabled",
    "autoscaling_policy",
    "host",
    "port",
)
"""The keys of an application entry (Ray's ``ServeApplicationSchema``)."""

DEPLOYMENT_KEYS = (
    "name",
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
    "placement_group_bundles",
    "placement_group_strategy",
    "max_replicas_per_node",
    "logging_config",
    "request_router_config",
    "max_concurrent_queries",
    "event_loop",
)
"""The keys of a deployment override (Ray's ``DeploymentSchema``, plus trioserve's
``event_loop``): ``name`` and every deployment option."""

HTTP_OPTIONS_KEYS = (
    "host",
    "port",
    "root_path",
    "request_timeout_s",
    "keep_alive_timeout_s",
    "max_request_body_bytes",
    "event_loop",
    *IGNORED_HTTP_FIELDS,
)
"""The keys of ``http_options``: Ray's, and trioserve's ``max_request_body_bytes``
and ``event_loop``; ``ssl_*``, ``middlewares``, ``num_cpus`` and ``root_url`` are
accepted and ignored."""

GRPC_OPTIONS_KEYS = ("port", "grpc_servicer_functions", "request_timeout_s")

RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "pip", "config", "excludes")
"""The ``runtime_env`` keys trioserve supports (``config`` and ``excludes`` are accepted
and ignored: a local working_dir is used in place, never uploaded)."""

PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")
DEFAULT_APP_NAME = "default"
REMOTE_URI_SCHEMES = ("s3://", "gs://", "http://", "https://", "gcs://", "file://", "az://")

# ------------------------------------------------------------------------ errors


class ConfigFileError(ValueError):
    """A config file (or an import path) cannot be used: the message says where and why.

    ``str(error)`` is ``config.yaml:12: applications[0].deployments[1].num_replicas:
    <what is wrong and what to do>``; ``source``, ``line`` and ``key`` hold the
    parts (None when unknown, e.g. for an import path given on the command line).
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.line = line
        self.key = key
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(f"{where}{key + ': ' if key else ''}{problem}")


# -------------------------------------------------------------- YAML with lines


class _Map(dict[Any, Any]):
    """A YAML mapping that knows the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class _Seq(list[Any]):
    """A YAML sequence that knows the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """A safe loader whose mappings and sequences remember their lines."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in result:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {result.key_lines[key]}); "
                "remove one of them",
                key_node.start_mark,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _plain(value: Any) -> Any:
    """``value`` with plain dicts and lists (no line bookkeeping)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass
class _Where:
    """Raises errors for one file: ``source:line: key: problem``."""

    source: str
    base_dir: Path

    def fail(self, line: int | None, key: str, problem: str) -> NoReturn:
        raise ConfigFileError(problem, source=self.source, line=line, key=key or None)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    kinds = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


def _check_keys(where: _Where, data: _Map, path: str, valid: Sequence[str], what: str) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where.fail(
                data.key_lines.get(key, data.line),
                _join(path, str(key)),
                f"unknown key in {what}.{hint} Valid keys: {', '.join(valid)}.",
            )


def _line(data: _Map, key: str) -> int:
    return data.key_lines.get(key, data.line)


# ------------------------------------------------------------------ the config


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """One application of a config file (or of ``trioserve run IMPORT_PATH``).

    ``runtime_env`` has ``working_dir`` resolved to an absolute path;
    ``deployments`` holds the override entries as the file gives them (each
    with its ``name``). ``source``, ``key`` and ``lines`` locate the entry in its
    file for error messages (``lines`` maps keys relative to the entry, such
    as ``"import_path"`` or ``"deployments[1].num_replicas"``, to lines).
    """

    name: str = DEFAULT_APP_NAME
    route_prefix: str | None = "/"
    import_path: str = ""
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    runtime_env: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    deployments: tuple[Mapping[str, Any], ...] = ()
    logging_config: Mapping[str, Any] | None = None
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)
    key: str = dataclasses.field(default="", compare=False, repr=False)
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def fail(self, key: str, problem: str) -> NoReturn:
        """Raise :class:`ConfigFileError` at ``key`` (relative to this entry)."""
        line = self.lines.get(key)
        if line is None:
            line = self.lines.get(key.split(".")[0].split("[")[0], self.lines.get(""))
        full = f"{self.key}.{key}" if self.key and key else (self.key or key)
        raise ConfigFileError(problem, source=self.source, line=line, key=full or None)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """A parsed, validated config file.

    ``http_options`` and ``logging_config`` are None when the file does not
    set them (trioserve's defaults apply); ``proxy_location`` likewise.
    :meth:`to_dict` gives the file's content back as written.
    """

    applications: tuple[AppConfig, ...]
    http_options: Mapping[str, Any] | None = None
    proxy_location: str | None = None
    logging_config: Mapping[str, Any] | None = None
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The file's content as given (plain dicts and lists), paths unresolved."""
        return typing.cast(dict[str, Any], _plain(self.raw))


def is_config_path(target: str) -> bool:
    """Whether ``trioserve run TARGET`` names a config file (``.yaml``/``.yml``)."""
    return target.lower().endswith((".yaml", ".yml"))


def load_config_file(path: str | os.PathLike[str]) -> ServeConfig:
    """Read and validate the config file at ``path``.

    Relative ``working_dir`` paths are relative to the file's folder. Raises
    :class:`ConfigFileError` if the file cannot be read or is not valid.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError("there is no such file; check the path", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read the file: {exc}", source=str(path)) from None
    return parse_config(text, str(path), base_dir=file.parent)


def parse_config(
    text: str, source_name: str = "<config>", *, base_dir: str | os.PathLike[str] | None = None
) -> ServeConfig:
    """Validate ``text``, a config file in Ray Serve's YAML schema.

    ``source_name`` names the file in error messages; ``base_dir`` is where
    relative ``working_dir`` paths start (default: the current directory).
    Raises :class:`ConfigFileError` with the line and key of the first problem.
    Imports nothing: :func:`build_from_config` does that.
    """
    where = _Where(source_name, Path(base_dir) if base_dir is not None else Path.cwd())
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        where.fail(line, "", f"not valid YAML: {problem}")
    except yaml.YAMLError as exc:
        where.fail(None, "", f"not valid YAML: {exc}")
    if data is None:
        where.fail(1, "", "the file is empty; a config file lists `applications:`.")
    if not isinstance(data, _Map):
        where.fail(
            getattr(data, "line", 1),
            "",
            f"the top level must be a mapping with `applications:`, got {_describe(data)}.",
        )
    if "applications" not in data and "import_path" in data:
        where.fail(
            data.line,
            "",
            "this is Ray's single-application format (import_path at the top level); "
            "put the application under `applications:` as a list item (`- import_path: "
            "...`) and move host/port to `http_options:`.",
        )
    _check_keys(where, data, "", TOP_LEVEL_KEYS, "a config file")
    proxy_location = _proxy_location(where, data)
    http_options = _http_options(where, data, proxy_location)
    if "grpc_options" in data:
        _grpc_options(where, data)
    logging_config = None
    if data.get("logging_config") is not None:
        logging_config = _logging_config(where, data, "logging_config", data["logging_config"])
    target = data.get("target_capacity")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 100
    ):
        where.fail(
            _line(data, "target_capacity"),
            "target_capacity",
            f"must be a number from 0 to 100 or null, got {_describe(target)}.",
        )
    if "applications" not in data:
        where.fail(
            data.line,
            "applications",
            "required: list the applications to run (`applications:` with items like "
            "`- name: app1` / `import_path: module:app`).",
        )
    apps = data["applications"]
    if not isinstance(apps, _Seq):
        where.fail(
            _line(data, "applications"),
            "applications",
            f"must be a list of applications, got {_describe(apps)}.",
        )
    parsed = tuple(_application(where, apps, i) for i in range(len(apps)))
    _check_unique(where, apps, parsed)
    return ServeConfig(
        applications=parsed,
        http_options=http_options,
        proxy_location=proxy_location,
        logging_config=logging_config,
        source=source_name,
        raw=_plain(data),
    )


def _proxy_location(where: _Where, data: _Map) -> str | None:
    value = data.get("proxy_location")
    if value is None:
        return None
    if value == "NoServer":
        value = "Disabled"
    if value not in PROXY_LOCATIONS:
        where.fail(
            _line(data, "proxy_location"),
            "proxy_location",
            f"must be one of {', '.join(PROXY_LOCATIONS)}, got {_describe(value)}.",
        )
    return str(value)


_HTTP_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "host": ((str, type(None)), "a host name or address (or null: no proxy)"),
    "port": ((int,), "a port number"),
    "root_path": ((str,), "a path such as /api"),
    "request_timeout_s": ((int, float, type(None)), "a number of seconds or null"),
    "keep_alive_timeout_s": ((int, float), "a number of seconds"),
    "max_request_body_bytes": ((int,), "a number of bytes"),
    "event_loop": ((str,), "'asyncio' or 'trio'"),
}


def _http_options(where: _Where, data: _Map, proxy_location: str | None) -> dict[str, Any] | None:
    options = data.get("http_options")
    if options is None:
        return None
    if not isinstance(options, _Map):
        where.fail(
            _line(data, "http_options"),
            "http_options",
            f"must be a mapping (host, port, ...), got {_describe(options)}.",
        )
    _check_keys(where, options, "http_options", HTTP_OPTIONS_KEYS, "http_options")
    for key, value in options.items():
        types, what = _HTTP_TYPES.get(key, ((object,), ""))
        if isinstance(value, bool) or not isinstance(value, types):
            where.fail(
                _line(options, key),
                f"http_options.{key}",
                f"must be {what}, got {_describe(value)}.",
            )
    plain = typing.cast(dict[str, Any], _plain(options))
    try:
        HTTPOptions.from_dict({**plain, **({"location": proxy_location} if proxy_location else {})})
    except (ValueError, TypeError) as exc:
        key = next((k for k in plain if k in str(exc)), "")
        where.fail(
            _line(options, key) if key else _line(data, "http_options"),
            f"http_options.{key}" if key else "http_options",
            str(exc),
        )
    return plain


def _grpc_options(where: _Where, data: _Map) -> None:
    options = data["grpc_options"]
    if options is None:
        return
    if not isinstance(options, _Map):
        where.fail(
            _line(data, "grpc_options"),
            "grpc_options",
            f"must be a mapping, got {_describe(options)}.",
        )
    _check_keys(where, options, "grpc_options", GRPC_OPTIONS_KEYS, "grpc_options")
    if options.get("grpc_servicer_functions"):
        warnings.warn(
            f"{where.source}:{_line(options, 'grpc_servicer_functions')}: trioserve serves "
            "HTTP only; grpc_options are ignored",
            UserWarning,
            stacklevel=3,
        )


def _logging_config(where: _Where, parent: _Map, path: str, value: Any) -> dict[str, Any]:
    key = path.rsplit(".", 1)[-1]
    if not isinstance(value, _Map):
        where.fail(
            _line(parent, key),
            path,
            f"must be a mapping ({', '.join(LOGGING_CONFIG_FIELDS)}), got {_describe(value)}.",
        )
    _check_keys(where, value, path, LOGGING_CONFIG_FIELDS, "logging_config")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "encoding": (
            lambda v: isinstance(v, str) and v.upper() in ENCODINGS,
            " or ".join(map(repr, ENCODINGS)),
        ),
        "log_level": (
            lambda v: (
                (isinstance(v, int) and not isinstance(v, bool))
                or (isinstance(v, str) and v.upper() in logging.getLevelNamesMapping())
            ),
            f"a logging level: one of {', '.join(LEVELS)} (or a level number)",
        ),
        "logs_dir": (lambda v: v is None or isinstance(v, str), "a folder path or null"),
        "enable_access_log": (lambda v: isinstance(v, bool), "true or false"),
        "additional_log_standard_attrs": (
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of LogRecord attribute names",
        ),
    }
    for name, item in value.items():
        ok, what = checks[name]
        if not ok(item):
            where.fail(
                _line(value, name), f"{path}.{name}", f"must be {what}, got {_describe(item)}."
            )
    plain = typing.cast(dict[str, Any], _plain(value))
    try:  # what @serve.deployment and serve.run refuse, refused here too
        return check_logging_config(plain)
    except (ValueError, TypeError) as exc:
        where.fail(_line(parent, key), path, str(exc))


def _import_path_problem(value: str) -> str | None:
    """Ray's import path checks: ``module:attr`` or ``module.attr``."""
    if ":" in value:
        if value.count(":") > 1:
            return f'Got invalid import path "{value}". An import path may have at most one colon.'
        if value.startswith(":") or value.endswith(":"):
            return (
                f'Got invalid import path "{value}". An import path may not start or end '
                "with a colon."
            )
        return None
    if "." not in value:
        return (
            f'Got invalid import path "{value}". An import path must contain at least one dot '
            'or colon separating the module from the application, e.g. "module:app".'
        )
    if value.startswith(".") or value.endswith("."):
        return f'Got invalid import path "{value}". An import path may not start or end with a dot.'
    return None


def _route_prefix_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return f"must be a path such as /api, or null (no HTTP route), got {_describe(value)}."
    if not value.startswith("/"):
        return f'Got "{value}" for route_prefix. Route prefix must start with "/".'
    if len(value) > 1 and value.endswith("/"):
        return (
            f'Got "{value}" for route_prefix. Route prefix cannot end with "/" unless the '
            'entire prefix is just "/".'
        )
    if "{" in value or "}" in value:
        return (
            f'Got "{value}" for route_prefix. Route prefix cannot contain wildcards, so it '
            'cannot contain "{" or "}".'
        )
    return None


def _application(where: _Where, apps: _Seq, index: int) -> AppConfig:
    path = f"applications[{index}]"
    entry = apps[index]
    entry_line = apps.item_lines[index]
    if not isinstance(entry, _Map):
        where.fail(
            entry_line,
            path,
            f"must be a mapping (name, route_prefix, import_path, ...), got {_describe(entry)}.",
        )
    _check_keys(where, entry, path, APP_KEYS, "an application")
    lines: dict[str, int] = {"": entry.line}
    lines.update({str(k): v for k, v in entry.key_lines.items()})
    for key in ("host", "port"):
        if key in entry:
            where.fail(
                _line(entry, key),
                _join(path, key),
                f"{key} is set in the config for an application; remove it and set {key} "
                "under the top-level `http_options:` instead.",
            )
    name = entry.get("name", DEFAULT_APP_NAME)
    if not isinstance(name, str) or not name:
        where.fail(
            _line(entry, "name"),
            _join(path, "name"),
            f"Application names must be nonempty strings, got {_describe(name)}.",
        )
    if "/" in name or "#" in name:
        where.fail(
            _line(entry, "name"),
            _join(path, "name"),
            f"Application names must not contain '/' or '#', got {name!r}.",
        )
    route_prefix = entry.get("route_prefix", "/")
    problem = _route_prefix_problem(route_prefix)
    if problem:
        where.fail(_line(entry, "route_prefix"), _join(path, "route_prefix"), problem)
    if "import_path" not in entry:
        where.fail(
            entry.line,
            _join(path, "import_path"),
            "required: the application to run, as `module:app` (an Application, or a "
            "builder function that takes the `args:` dict).",
        )
    import_path = entry["import_path"]
    if not isinstance(import_path, str):
        where.fail(
            _line(entry, "import_path"),
            _join(path, "import_path"),
            f"must be a string like module:app, got {_describe(import_path)}.",
        )
    problem = _import_path_problem(import_path)
    if problem:
        where.fail(_line(entry, "import_path"), _join(path, "import_path"), problem)
    args = entry.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        where.fail(
            _line(entry, "args"),
            _join(path, "args"),
            f"must be a mapping of argument names to values, got {_describe(args)}.",
        )
    runtime_env: dict[str, Any] = {}
    if entry.get("runtime_env") is not None:
        runtime_env = _runtime_env(where, entry, _join(path, "runtime_env"), lines, "runtime_env")
    logging_config = None
    if entry.get("logging_config") is not None:
        logging_config = _logging_config(
            where, entry, _join(path, "logging_config"), entry["logging_config"]
        )
    scaler = entry.get("external_scaler_enabled", False)
    if not isinstance(scaler, bool):
        where.fail(
            _line(entry, "external_scaler_enabled"),
            _join(path, "external_scaler_enabled"),
            f"must be true or false, got {_describe(scaler)}.",
        )
    if entry.get("autoscaling_policy") is not None:
        where.fail(
            _line(entry, "autoscaling_policy"),
            _join(path, "autoscaling_policy"),
            "application-level autoscaling policies are not supported (Ray Serve marks them "
            "as under development); set autoscaling_config per deployment instead.",
        )
    deployments = _deployments(where, entry, path, lines)
    return AppConfig(
        name=name,
        route_prefix=route_prefix,
        import_path=import_path,
        args=typing.cast(dict[str, Any], _plain(args)),
        runtime_env=runtime_env,
        deployments=deployments,
        logging_config=logging_config,
        source=where.source,
        key=path,
        lines=lines,
    )


def _runtime_env(
    where: _Where, parent: _Map, path: str, lines: dict[str, int], rel: str
) -> dict[str, Any]:
    """Validate a ``runtime_env`` mapping; returns it with working_dir made absolute."""
    env = parent[path.rsplit(".", 1)[-1]]
    if not isinstance(env, _Map):
        where.fail(
            _line(parent, path.rsplit(".", 1)[-1]),
            path,
            f"must be a mapping (env_vars, working_dir, pip), got {_describe(env)}.",
        )
    for key, line in env.key_lines.items():
        lines[f"{rel}.{key}"] = line
    for key in env:
        if key not in RUNTIME_ENV_KEYS:
            where.fail(
                _line(env, key),
                _join(path, str(key)),
                f"runtime_env key {key!r} is not supported by trioserve, which runs replicas "
                "as local processes; supported keys: env_vars, working_dir, pip (and "
                "config, excludes, ignored). Remove it, or install what it provides in this "
                "environment.",
            )
    out: dict[str, Any] = typing.cast(dict[str, Any], _plain(env))
    env_vars = env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, _Map):
            where.fail(
                _line(env, "env_vars"),
                _join(path, "env_vars"),
                f"must be a mapping of variable names to strings, got {_describe(env_vars)}.",
            )
        for name, value in env_vars.items():
            if not isinstance(name, str) or not isinstance(value, str):
                where.fail(
                    _line(env_vars, name),
                    _join(_join(path, "env_vars"), str(name)),
                    f"environment variables must be strings; got {_describe(value)}. Quote "
                    f'the value ("{value}").',
                )
    working_dir = env.get("working_dir")
    if working_dir is not None:
        key = _join(path, "working_dir")
        line = _line(env, "working_dir")
        if not isinstance(working_dir, str) or not working_dir:
            where.fail(line, key, f"must be a local folder path, got {_describe(working_dir)}.")
        if "://" in working_dir or working_dir.startswith(REMOTE_URI_SCHEMES):
            where.fail(
                line,
                key,
                f"{working_dir!r} is a remote URI; trioserve supports only local paths (a "
                "folder or a .zip file). Download it and point working_dir at the local copy.",
            )
        resolved = (where.base_dir / Path(working_dir).expanduser()).resolve()
        if not (resolved.is_dir() or (resolved.is_file() and resolved.suffix == ".zip")):
            where.fail(
                line,
                key,
                f"{working_dir!r} is not a folder or .zip file (looked at {resolved}; relative "
                "paths start at the config file's folder).",
            )
        out["working_dir"] = str(resolved)
    pip = env.get("pip")
    if pip is not None:
        key = _join(path, "pip")
        line = _line(env, "pip")
        if isinstance(pip, str):
            # The path of a requirements file, relative to the config file's folder.
            requirements = (where.base_dir / Path(pip).expanduser()).resolve()
            if not requirements.is_file():
                where.fail(line, key, f"there is no requirements file at {requirements}.")
            out["pip"] = str(requirements)
        elif isinstance(pip, dict):
            packages = pip.get("packages")
            if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
                where.fail(line, key, "must have `packages:`, a list of requirement strings.")
        elif not isinstance(pip, list) or not all(isinstance(p, str) for p in pip):
            where.fail(
                line,
                key,
                'must be a list of requirement strings (such as "requests==2.31"), a '
                f"mapping with `packages:`, or the path of a requirements file; got "
                f"{_describe(pip)}.",
            )
    excludes = env.get("excludes")
    if excludes is not None and not isinstance(excludes, list):
        where.fail(_line(env, "excludes"), _join(path, "excludes"), "must be a list of patterns.")
    return out


_OPTION_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_replicas": (
        lambda v: v is None or v == "auto" or (_is_int(v) and v > 0),
        'an integer greater than 0, or "auto"',
    ),
    "max_ongoing_requests": (lambda v: _is_int(v) and v > 0, "an integer greater than 0"),
    "max_concurrent_queries": (lambda v: _is_int(v) and v > 0, "an integer greater than 0"),
    "max_queued_requests": (
        lambda v: _is_int(v) and (v == -1 or v > 0),
        "-1 (no limit) or an integer greater than 0",
    ),
    "user_config": (lambda v: True, "any value"),
    "autoscaling_config": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "graceful_shutdown_wait_loop_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "graceful_shutdown_timeout_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "health_check_period_s": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "health_check_timeout_s": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "ray_actor_options": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "placement_group_bundles": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(b, dict) for b in v)),
        "a list of resource mappings",
    ),
    "placement_group_strategy": (lambda v: v is None or isinstance(v, str), "a string"),
    "max_replicas_per_node": (lambda v: v is None or (_is_int(v) and v > 0), "an integer > 0"),
    "logging_config": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "request_router_config": (lambda v: v is None or isinstance(v, dict), "a mapping"),
    "event_loop": (lambda v: v in ("asyncio", "trio"), "'asyncio' or 'trio'"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


_AUTOSCALING_FIELDS = {f.name: str(f.type) for f in dataclasses.fields(AutoscalingConfig)}


class _Probe:
    """A stand-in class for checking override options before the code is imported."""


def _deployments(
    where: _Where, entry: _Map, app_path: str, lines: dict[str, int]
) -> tuple[dict[str, Any], ...]:
    items = entry.get("deployments")
    if items is None:
        return ()
    path = _join(app_path, "deployments")
    if not isinstance(items, _Seq):
        where.fail(
            _line(entry, "deployments"),
            path,
            f"must be a list of deployment overrides (`- name: ...`), got {_describe(items)}.",
        )
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        rel = f"deployments[{i}]"
        lines[rel] = items.item_lines[i]
        if not isinstance(item, _Map):
            where.fail(
                items.item_lines[i],
                item_path,
                f"must be a mapping with a `name` and options, got {_describe(item)}.",
            )
        for key, line in item.key_lines.items():
            lines[f"{rel}.{key}"] = line
        if "route_prefix" in item:
            where.fail(
                _line(item, "route_prefix"),
                f"{item_path}.route_prefix",
                "`route_prefix` can no longer be specified at the deployment level; set "
                "route_prefix on the application instead.",
            )
        _check_keys(where, item, item_path, DEPLOYMENT_KEYS, "a deployment override")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            where.fail(
                _line(item, "name") if "name" in item else item.line,
                f"{item_path}.name",
                "required: the name of the deployment to override (its class or function "
                "name, or its `name` option).",
            )
        if name in seen:
            where.fail(
                _line(item, "name"),
                f"{item_path}.name",
                f"deployment {name!r} is listed twice in this application (also at line "
                f"{seen[name]}); merge the two entries.",
            )
        seen[name] = _line(item, "name")
        for key, value in item.items():
            if key == "name":
                continue
            ok, what = _OPTION_TYPES[key]
            if not ok(value):
                where.fail(
                    _line(item, key),
                    f"{item_path}.{key}",
                    f"must be {what}, got {_describe(value)}.",
                )
        auto = item.get("autoscaling_config")
        if isinstance(auto, _Map):
            _check_autoscaling(where, auto, f"{item_path}.autoscaling_config")
        actor = item.get("ray_actor_options")
        plain = typing.cast(dict[str, Any], _plain(item))
        if isinstance(actor, _Map):
            _check_keys(
                where,
                actor,
                f"{item_path}.ray_actor_options",
                RAY_ACTOR_OPTIONS,
                "ray_actor_options",
            )
            if actor.get("runtime_env") is not None:
                plain["ray_actor_options"]["runtime_env"] = _runtime_env(
                    where,
                    actor,
                    f"{item_path}.ray_actor_options.runtime_env",
                    lines,
                    f"{rel}.ray_actor_options.runtime_env",
                )
        if isinstance(item.get("logging_config"), _Map):
            _logging_config(where, item, f"{item_path}.logging_config", item["logging_config"])
        # Ray's own checks and messages, one option at a time (for its line), then together.
        options = {k: v for k, v in plain.items() if k != "name"}
        probe = Deployment(_Probe, {})
        for key, value in options.items():
            try:
                probe.options(**{key: value})
            except (ValueError, TypeError) as exc:
                where.fail(_line(item, key), f"{item_path}.{key}", str(exc))
        try:
            probe.options(**options)
        except (ValueError, TypeError) as exc:
            where.fail(item.line, item_path, str(exc))
        out.append(plain)
    return tuple(out)


def _check_autoscaling(where: _Where, auto: _Map, path: str) -> None:
    _check_keys(where, auto, path, tuple(_AUTOSCALING_FIELDS), "autoscaling_config")
    for key, value in auto.items():
        kind = _AUTOSCALING_FIELDS[key]
        optional = "None" in kind
        if value is None and optional:
            continue
        if kind.startswith("int"):
            ok, what = _is_int(value), "an integer"
        elif kind.startswith("float"):
            ok, what = _is_number(value), "a number"
        else:
            ok, what = isinstance(value, str), "a string"
        if not ok:
            where.fail(
                _line(auto, key),
                f"{path}.{key}",
                f"must be {what}{' or null' if optional else ''}, got {_describe(value)}.",
            )


def _check_unique(where: _Where, apps: _Seq, parsed: tuple[AppConfig, ...]) -> None:
    names: dict[str, int] = {}
    routes: dict[str, int] = {}
    for i, app in enumerate(parsed):
        entry = apps[i]
        if app.name in names:
            where.fail(
                _line(entry, "name"),
                f"applications[{i}].name",
                f'Found multiple configs for application "{app.name}" (also at line '
                f"{names[app.name]}). Please remove all duplicates; give each application "
                'its own `name:` (the default name is "default").',
            )
        names[app.name] = _line(entry, "name")
        if app.route_prefix is not None:
            if app.route_prefix in routes:
                where.fail(
                    _line(entry, "route_prefix"),
                    f"applications[{i}].route_prefix",
                    f'Found duplicate applications for route prefix "{app.route_prefix}" '
                    f"(also at line {routes[app.route_prefix]}). Please ensure each "
                    'application\'s route_prefix is unique (the default is "/").',
                )
            routes[app.route_prefix] = _line(entry, "route_prefix")


def app_from_import_path(
    import_path: str,
    *,
    name: str | None = None,
    route_prefix: str | None = None,
    args: Mapping[str, Any] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
) -> AppConfig:
    """The application ``trioserve run IMPORT_PATH`` serves, checked as a file's would be.

    ``name`` defaults to ``"default"``, ``route_prefix`` to ``"/"``; a
    ``working_dir`` must be an existing folder (it is made absolute). Raises
    :class:`ConfigFileError` naming the command-line option at fault.
    """
    problem = _import_path_problem(import_path)
    if problem:
        raise ConfigFileError(problem + ' Use the form "module:app".')
    name = DEFAULT_APP_NAME if name is None else name
    if not name or "/" in name or "#" in name:
        raise ConfigFileError(f"--name {name!r}: an application name is non-empty, without / or #.")
    route_prefix = "/" if route_prefix is None else route_prefix
    problem = _route_prefix_problem(route_prefix)
    if problem:
        raise ConfigFileError(f"--route-prefix: {problem}")
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        folder = Path(working_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigFileError(
                f"--working-dir {os.fspath(working_dir)}: there is no such folder."
            )
        runtime_env["working_dir"] = str(folder)
    return AppConfig(
        name=name,
        route_prefix=route_prefix,
        import_path=import_path,
        args=dict(args or {}),
        runtime_env=runtime_env,
    )


def http_options_of(
    config: ServeConfig | None, *, host: str | None = None, port: int | None = None
) -> dict[str, Any]:
    """The ``http_options`` for ``open_instance``: the file's, with ``host``/``port``
    (from the command line) winning, and its ``proxy_location`` as ``location``."""
    options: dict[str, Any] = dict(config.http_options or {}) if config is not None else {}
    if config is not None and config.proxy_location is not None:
        options["location"] = config.proxy_location
    if host is not None:
        options["host"] = host
    if port is not None:
        options["port"] = port
    return options


# ---------------------------------------------------------------------- importing


def _split_import_path(import_path: str) -> tuple[str, str]:
    problem = _import_path_problem(import_path)
    if problem:
        raise ConfigFileError(problem + ' Use the form "module:app".')
    if ":" in import_path:
        module, _, attr = import_path.partition(":")
    else:
        module, _, attr = import_path.rpartition(".")
    return module, attr


def _put_on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def import_application(
    import_path: str,
    args: Mapping[str, Any] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
) -> Application:
    """Import ``module:attr`` (or ``module.attr``) and return the application it names.

    ``working_dir`` (absolute) and the current directory go on ``sys.path``
    first, as with Ray's ``serve run``. The attribute may be an
    :class:`~trioserve.core.deployment.Application` (then ``args`` must be
    empty) or a builder function taking one argument, the ``args`` dict (or a
    pydantic model, if its parameter is annotated with one), that returns an
    Application. Raises :class:`ConfigFileError` saying what went wrong and
    what to do.
    """
    args = dict(args or {})
    module_name, attr = _split_import_path(import_path)
    _put_on_path(os.getcwd())
    if working_dir is not None:
        _put_on_path(os.fspath(working_dir))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigFileError(
                f"cannot import module {module_name!r} of import path {import_path!r}: "
                f"{exc}. Run from the folder that holds it, or give that folder as the "
                "working_dir (--working-dir, or runtime_env.working_dir in a config file)."
            ) from None
        raise ConfigFileError(
            f"importing {module_name!r} (import path {import_path!r}) failed:\n"
            f"{_traceback(exc)}Install the missing module or fix the import."
        ) from None
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigFileError(
            f"importing {module_name!r} (import path {import_path!r}) failed:\n"
            f"{_traceback(exc)}Fix the error in the module."
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigFileError(
                f"module {module_name!r} has no attribute {attr!r} (import path "
                f"{import_path!r}); check the name after the colon."
            ) from None
    return _application_from(target, args, import_path)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _application_from(target: Any, args: dict[str, Any], import_path: str) -> Application:
    if isinstance(target, Application):
        if args:
            raise ConfigFileError(
                f"{import_path!r} is an Application, and args are only accepted for builder "
                "functions (a function that takes the args dict and returns an "
                "Application). Remove the args, or point at a builder function.",
                key="args",
            )
        return target
    if isinstance(target, Deployment):
        raise ConfigFileError(
            f"{import_path!r} is a Deployment, not an Application: did you forget .bind()? "
            f"Point at `{target.name}.bind(...)` assigned to a variable (app = "
            f"{target.name}.bind()), or at a builder function."
        )
    if not inspect.isfunction(target):
        raise ConfigFileError(
            f"Expected a built Serve application or an application builder function but "
            f"got: {type(target)} at {import_path!r}. Point the import path at "
            "`Deployment.bind(...)` or at a function that returns one."
        )
    signature = inspect.signature(target)
    if len(signature.parameters) != 1:
        raise ConfigFileError(
            f"Application builder functions should take exactly one parameter, a dictionary "
            f"containing the passed arguments; {import_path!r} takes "
            f"{len(signature.parameters)}."
        )
    param_name = next(iter(signature.parameters))
    value: Any = args
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    model = hints.get(param_name)
    if inspect.isclass(model) and _is_pydantic_model(model):
        pydantic_model: Any = model
        try:
            validate = getattr(pydantic_model, "model_validate", None) or pydantic_model.parse_obj
            value = validate(args)
        except Exception as exc:
            raise ConfigFileError(
                f"the args for builder {import_path!r} do not fit {model.__name__}: {exc}",
                key="args",
            ) from None
    try:
        app = target(value)
    except Exception as exc:
        raise ConfigFileError(
            f"the builder function {import_path!r} raised an error:\n{_traceback(exc)}"
            "Fix the builder or the args given to it."
        ) from None
    if not isinstance(app, Application):
        raise ConfigFileError(
            "Application builder functions must return an `Application` returned from "
            f"`Deployment.bind()`, but {import_path!r} returned {type(app)}."
        )
    return app


def _is_pydantic_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:
        return False
    return issubclass(cls, pydantic.BaseModel)


# ---------------------------------------------------------------------- building

_swap_lock = threading.Lock()


def _in_build_order(app: Application) -> list[Application]:
    """The applications of ``app``'s graph in :func:`build_app`'s order (children first)."""
    order: list[Application] = []
    seen: set[int] = set()

    def visit(node: Application) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for child in _find_applications((node._args, node._kwargs)):
            visit(child)
        order.append(node)

    visit(app)
    return order


def _merge_runtime_env(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Ray's rule: the deployment's keys win, except env_vars, which are merged."""
    merged = {**parent, **child}
    if "env_vars" in parent or "env_vars" in child:
        merged["env_vars"] = {**(parent.get("env_vars") or {}), **(child.get("env_vars") or {})}
    merged.pop("excludes", None)
    return merged


def build_from_config(
    app: AppConfig, *, logging_config: Mapping[str, Any] | None = None
) -> BuiltApp:
    """Import ``app.import_path`` and build it with the file's overrides.

    Each override changes only the options it sets (through
    ``Deployment.options``, so invalid values get Ray Serve's messages); the
    application's ``runtime_env`` is merged into every deployment's
    ``ray_actor_options["runtime_env"]`` (a deployment's own keys win, env_vars
    are merged). ``logging_config`` (the file's top-level one) applies when the
    application sets none. The user's objects are left as they were. Raises
    :class:`ConfigFileError` at the entry's line; nothing is deployed.
    """
    working_dir = app.runtime_env.get("working_dir")
    try:
        root = import_application(app.import_path, app.args, working_dir)
    except ConfigFileError as exc:
        app.fail(exc.key or "import_path", exc.problem)
    effective_logging = app.logging_config if app.logging_config is not None else logging_config
    with _swap_lock:
        try:
            first = build_app(root, app.name, app.route_prefix)
        except (TypeError, ValueError) as exc:
            app.fail("import_path", f"cannot build the application: {exc}")
        order = _in_build_order(root)
        by_name = {spec.name: node for spec, node in zip(first.deployments, order, strict=True)}
        for i, override in enumerate(app.deployments):
            if override["name"] not in by_name:
                app.fail(
                    f"deployments[{i}].name",
                    f"there is no deployment {override['name']!r} in application "
                    f"{app.name!r} ({app.import_path}); its deployments are: "
                    f"{', '.join(by_name)}.",
                )
        overrides = {o["name"]: (i, o) for i, o in enumerate(app.deployments)}
        originals = {id(node): node._bound_deployment for node in order}
        try:
            for name, node in by_name.items():
                dep = node._bound_deployment
                index, override = overrides.get(name, (-1, {}))
                options = {k: v for k, v in override.items() if k != "name"}
                if app.runtime_env:
                    if "ray_actor_options" in options:
                        actor = dict(options["ray_actor_options"] or {})
                    else:
                        actor = dict(dep.ray_actor_options or {})
                    env = _merge_runtime_env(app.runtime_env, actor.get("runtime_env") or {})
                    options["ray_actor_options"] = {**actor, "runtime_env": env}
                if not options:
                    continue
                try:
                    node._bound_deployment = dep.options(**options)
                except (TypeError, ValueError) as exc:
                    where = f"deployments[{index}]" if index >= 0 else "runtime_env"
                    app.fail(where, str(exc))
            try:
                return build_app(root, app.name, app.route_prefix, logging_config=effective_logging)
            except (TypeError, ValueError) as exc:
                app.fail("import_path", f"cannot build the application: {exc}")
        finally:
            for node in order:
                node._bound_deployment = originals[id(node)]


def build_applications(config: ServeConfig) -> list[BuiltApp]:
    """:func:`build_from_config` for every application of ``config``, in file order
    (the file's top-level ``logging_config`` is the default for each)."""
    return [
        build_from_config(app, logging_config=config.logging_config) for app in config.applications
    ]


# ---------------------------------------------------------------- trioserve build


def _deployment_entry(name: str, dep: Deployment) -> dict[str, Any]:
    """The options the code set, as a config file's deployment entry (Ray's
    ``deployment_to_schema``: only user-configured options, plus the name)."""
    configured = dep.user_configured_option_names
    config = dep.config.to_dict()
    entry: dict[str, Any] = {"name": name}
    for option in DEPLOYMENT_KEYS:
        if option == "name" or option not in configured:
            continue
        if option == "num_replicas":
            entry[option] = "auto" if config["num_replicas"] is None else config["num_replicas"]
        elif option in config:
            entry[option] = config[option]
    return entry


def build_config(import_paths: Sequence[str]) -> dict[str, Any]:
    """A config file (as a dict) that serves the applications at ``import_paths``.

    As Ray's ``serve build``: applications are named ``app1``, ``app2``, ...,
    routed at ``/`` (one application) or ``/app1``, ``/app2``, ...; each
    deployment lists the options its code sets. ``http_options`` holds
    trioserve's defaults (127.0.0.1:8000). Raises :class:`ConfigFileError` if an
    import path does not name an Application.
    """
    apps: list[dict[str, Any]] = []
    for index, import_path in enumerate(import_paths):
        name = f"app{index + 1}"
        root = import_application(import_path)
        built = build_app(root, name, "/")
        entries = [
            _deployment_entry(spec.name, node._bound_deployment)
            for spec, node in zip(built.deployments, _in_build_order(root), strict=True)
        ]
        apps.append(
            {
                "name": name,
                "route_prefix": "/" if len(import_paths) == 1 else f"/{name}",
                "import_path": import_path,
                "runtime_env": {},
                "deployments": entries,
            }
        )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": apps,
    }


def dump_config(config: Mapping[str, Any]) -> str:
    """``config`` as YAML text, keys in their order, with a header line."""
    from trioserve import __version__

    body = yaml.safe_dump(_plain(dict(config)), sort_keys=False, default_flow_style=False)
    return (
        f"# This file was generated using the `trioserve build` command on trioserve "
        f"v{__version__}.\n\n{body}"
    )


# ------------------------------------------------------------------ trioserve run


def parse_key_value_args(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` → ``{"a": "1", "b": "x=y"}``; values stay strings, as in Ray."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigFileError(
                f"argument {item!r} is not key=value; builder arguments are given as "
                "key=value after the import path."
            )
        out[key] = value
    return out


class _Progress:
    """Progress on stderr: a live line on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.live = False
        self.last = ""

    def status(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.live = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def note(self, line: str) -> None:
        if self.live:
            self.out.write("\n")
            self.live = False
        self.last = ""
        self.out.write(line + "\n")
        self.out.flush()


def _describe_app(name: str, status: Any) -> str:
    app = status.applications.get(name)
    if app is None:
        return f"{name}: waiting for the controller"
    parts = []
    for dep_name, dep in app.deployments.items():
        running = dep.replica_states.get("RUNNING", 0)
        parts.append(f"{dep_name} {running}/{dep.target_replicas}")
    state = getattr(app.status, "value", app.status)
    return f"{name}: {state}, replicas running: {', '.join(parts) or 'none yet'}"


def _watched_files(paths: Sequence[Path]) -> dict[str, tuple[int, int]]:
    """``(mtime, size)`` of the watched files: given files, and .py files under given
    folders (the size too: an edit within the clock's resolution changes it, mostly)."""
    found: dict[str, tuple[int, int]] = {}
    for path in paths:
        if path.is_file():
            with contextlib.suppress(OSError):
                st = path.stat()
                found[str(path)] = (st.st_mtime_ns, st.st_size)
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [
                d
                for d in dirs
                if not d.startswith(".")
                and d not in ("__pycache__", "node_modules", "site-packages", "venv")
            ]
            for file in files:
                if file.endswith(".py"):
                    full = os.path.join(folder, file)
                    with contextlib.suppress(OSError):
                        st = os.stat(full)
                        found[full] = (st.st_mtime_ns, st.st_size)
    return found


def _files_digest(files: Iterable[str]) -> str:
    """A digest of the names and contents of ``files``."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        try:
            with open(name, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        except OSError:
            h.update(b"(unreadable)")
    return h.hexdigest()


def _with_files_version(built: list[BuiltApp], files_digest: str) -> list[BuiltApp]:
    """``built``, with ``files_digest`` folded into each deployment's code version.

    A deployment's own code version covers its class's source file only; with
    the digest of every watched file, a reload rolls the replicas whatever file
    changed (a helper module the class imports, too), as Ray's ``serve run
    --reload`` does. A deployment with an explicit ``version`` keeps it (the
    user decides when it rolls, as in Ray).
    """
    for app in built:
        app.deployments = [
            spec
            if spec.config.version is not None
            else dataclasses.replace(
                spec,
                code_version=hashlib.sha256(
                    f"{spec.code_version}:{files_digest}".encode()
                ).hexdigest()[:16],
            )
            for spec in app.deployments
        ]
    return built


def _build_watched(
    watch: Sequence[Path], load: Callable[[], ServeConfig]
) -> tuple[ServeConfig, list[BuiltApp], dict[str, tuple[int, int]]]:
    """Load and build for ``--reload``: the config, its applications (versioned by the
    watched files' contents, see :func:`_with_files_version`) and the files' snapshot
    taken before. Blocking: it imports user code."""
    seen = _watched_files(watch)
    config = load()
    built = build_applications(config)
    return config, _with_files_version(built, _files_digest(seen)), seen


def _forget_modules(folders: Sequence[Path], keep: set[str]) -> None:
    """Drop modules loaded from ``folders`` (other than ``keep``) so they import afresh."""
    roots = [str(f.resolve()) + os.sep for f in folders if f.is_dir()]
    for name, module in list(sys.modules.items()):
        if name in keep or name.split(".")[0] == "trioserve":
            continue
        file = getattr(module, "__file__", None)
        if not file or "site-packages" in file:
            continue
        if any(os.path.abspath(file).startswith(root) for root in roots):
            del sys.modules[name]
    importlib.invalidate_caches()


@dataclasses.dataclass
class _RunState:
    load: Callable[[], ServeConfig]
    http_options: dict[str, Any]
    reload: bool
    watch: list[Path]
    keep_modules: set[str]
    progress: _Progress
    names: list[str] = dataclasses.field(default_factory=list)
    seen: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """With ``reload``: the watched files' snapshot that the running version was built from."""
    logging_config: Mapping[str, Any] | None = None
    """The file's top-level ``logging_config``: the proxy's too, as in Ray Serve."""


def run_foreground(
    load: Callable[[], ServeConfig],
    *,
    host: str | None = None,
    port: int | None = None,
    reload: bool = False,
    watch: Sequence[str | os.PathLike[str]] = (),
    out: TextIO | None = None,
) -> int:
    """``trioserve run``: build what ``load()`` describes, serve it until SIGINT/SIGTERM.

    Builds every application first (a :class:`ConfigFileError` propagates and
    nothing starts), then runs an instance in this process, deploys, shows
    progress on ``out`` (stderr) until every application is RUNNING, prints
    where each is served, and waits. A signal stops every replica and the
    proxy before returning 0. A failed deployment prints its error (with the
    traceback) and a hint, stops everything and returns 1. With ``reload``,
    files under ``watch`` (``.py`` files in folders, and given files) are
    polled; a change re-imports and redeploys, printing ``reloaded``.
    """
    import trio

    progress = _Progress(out if out is not None else sys.stderr)
    keep = set(sys.modules)
    watched = [Path(p).resolve() for p in watch]
    seen: dict[str, tuple[int, int]] = {}
    if reload:
        config, built, seen = _build_watched(watched, load)
    else:
        config = load()
        built = build_applications(config)
    if not config.applications:
        raise ConfigFileError("there are no applications to run.", source=config.source)
    state = _RunState(
        load=load,
        http_options=http_options_of(config, host=host, port=port),
        reload=reload,
        watch=watched,
        keep_modules=keep,
        progress=progress,
        seen=seen,
        logging_config=config.logging_config,
    )
    try:
        return trio.run(_serve, state, built)
    except Exception as exc:  # the instance itself failed (not the user's code)
        leaves = _leaves(exc)
        if any(not isinstance(leaf, Exception) for leaf in leaves):
            raise
        from trioserve.instance import state_home

        progress.note(
            "trioserve: the instance failed: "
            + "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves)
            + f"\nThe logs of this run are under {state_home() / 'latest' / 'logs'}; fix the "
            "cause and run again."
        )
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _serve(state: _RunState, built: list[BuiltApp]) -> int:
    import trio

    from trioserve.instance import open_instance

    code = 0
    progress = state.progress
    work_scope = trio.CancelScope()
    # Signals are received (and queued) from the start, and consumed until the
    # instance has stopped (trio would redeliver unconsumed ones on exit). The
    # instance is left normally, not by cancellation, so that it stops its
    # replicas and proxy.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def consume_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if work_scope.cancel_called:
                        progress.note(f"Received {name}: already stopping...")
                        continue
                    progress.note(f"Received {name}: stopping the replicas and the proxy...")
                    work_scope.cancel()

            nursery.start_soon(consume_signals)
            progress.note("Starting trioserve...")
            async with open_instance(
                http_options=state.http_options, logging_config=state.logging_config
            ) as serve:
                with work_scope:
                    code = await _deploy_and_wait(serve, built, progress)
                    if code == 0:
                        state.names = [b.name for b in built]
                        await _report_ready(serve, built, progress)
                        progress.note("Serving. Press Ctrl-C to stop.")
                        if state.reload:
                            await _watch_and_reload(serve, state)
                        else:
                            await trio.sleep_forever()
                    progress.note("Stopping the replicas and the proxy...")
            nursery.cancel_scope.cancel()
    progress.note("Stopped.")
    return code


async def _deploy_and_wait(serve: Any, built: Sequence[BuiltApp], progress: _Progress) -> int:
    """Deploy ``built`` and wait for RUNNING, showing progress; 0, or 1 after printing why."""
    import trio

    from trioserve.exceptions import DeployFailedError, RayServeException

    for app in built:
        try:
            await serve.deploy(app)
        except (ValueError, RayServeException) as exc:
            progress.note(f"trioserve: cannot deploy application {app.name!r}: {exc}")
            return 1
    for app in built:
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def watch(name: str = app.name) -> None:
                while True:
                    with contextlib.suppress(RayServeException):
                        progress.status(_describe_app(name, await serve.status()))
                    await trio.sleep(0.5)

            nursery.start_soon(watch)
            try:
                await serve.wait_running(app.name)
            except (DeployFailedError, RayServeException, TimeoutError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if isinstance(failure, DeployFailedError):
            details = await _failure_details(serve, app.name, str(failure))
            progress.note(f"trioserve: {failure}{details}\nFix the error and run again.")
            return 1
        if failure is not None:
            hint = ""
            if "proxy" in str(failure):
                hint = (
                    "\nPick another port with --port (or http_options.port in the config "
                    "file), or stop what is using this one."
                )
            progress.note(f"trioserve: {failure}{hint}")
            return 1
    return 0


async def _failure_details(serve: Any, name: str, shown: str) -> str:
    try:
        status = await serve.status()
    except Exception:
        return ""
    app = status.applications.get(name)
    if app is None:
        return ""
    extra = [
        f"\n{dep_name}: {dep.message}"
        for dep_name, dep in app.deployments.items()
        if dep.message and dep.message not in shown
    ]
    return "".join(extra)


async def _report_ready(serve: Any, built: Sequence[BuiltApp], progress: _Progress) -> None:
    status = await serve.status()
    for app in built:
        if app.route_prefix is None or not status.http_url:
            progress.note(f"Application '{app.name}' is running (no HTTP route).")
        else:
            progress.note(
                f"Application '{app.name}' is ready at {status.http_url}{app.route_prefix}."
            )


async def _watch_and_reload(serve: Any, state: _RunState) -> None:
    import trio

    progress = state.progress
    seen = state.seen or await trio.to_thread.run_sync(_watched_files, state.watch)
    progress.note(f"Watching {', '.join(map(str, state.watch))} for changes (--reload).")
    while True:
        await trio.sleep(0.5)
        now = await trio.to_thread.run_sync(_watched_files, state.watch)
        if now == seen:
            continue
        progress.note("Change detected: reloading...")

        def rebuild() -> tuple[ServeConfig, list[BuiltApp], dict[str, tuple[int, int]]]:
            # In a worker thread: importing and building user code may take long,
            # and the controller and the signal handling run on this loop.
            _forget_modules(state.watch, state.keep_modules)
            return _build_watched(state.watch, state.load)

        try:
            config, built, seen = await trio.to_thread.run_sync(rebuild)
        except ConfigFileError as exc:
            seen = now
            progress.note(f"trioserve: {exc}\nFix the error; still serving the previous version.")
            continue
        if await _deploy_and_wait(serve, built, progress) != 0:
            progress.note("Still watching; the previous version serves where it can.")
            continue
        if config.logging_config != state.logging_config:
            progress.note(
                "The top-level logging_config changed: the replicas use the new one; "
                "the HTTP proxy keeps the one it started with until trioserve run restarts."
            )
        names = [b.name for b in built]
        for gone in [n for n in state.names if n not in names]:
            await serve.delete(gone)
        state.names = names
        await _report_ready(serve, built, progress)
        pinned = [
            f"{b.name}/{spec.name}"
            for b in built
            for spec in b.deployments
            if spec.config.version is not None
        ]
        if pinned:
            progress.note(
                f"Deployments with an explicit version keep their replicas: {', '.join(pinned)} "
                "(change the version to roll them)."
            )
        progress.note("Reloaded.")
