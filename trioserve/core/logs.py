"""Log records of the replica and proxy processes: formats and request context.

Each process writes its log to standard error, which the launcher sends to
that process's file in ``<run folder>/logs/``. :func:`setup` installs one
handler on the root logger, so that the user's loggers (``logging.getLogger(
"my_app")``) write there too, with a :class:`ContextFilter` that attaches to
every record the process's fields (``application``, ``deployment``,
``replica``; ``component_name``) and, for records made while a request is
handled, the request's (``request_id``, ``route``) from a context variable the
replica host sets around each request.

Two encodings, as Ray Serve's ``logging_config.encoding``:

- ``TEXT`` (default): ``INFO 2026-05-09 10:00:00,123 app Model app#Model#1
  3f2a... -- message`` (the request id only within a request);
- ``JSON``: one object per line with Ray's field names: ``levelname``,
  ``asctime``, ``timestamp_ns``, ``logger``, ``message``, ``component_name``,
  and ``application``, ``deployment``, ``replica``, ``request_id``, ``route``
  (and on access lines ``method``, ``status``, ``latency_ms``) when known;
  ``exc_text`` with the traceback of an exception.

Access lines (one per request: method, route or path, status, latency) are
logged at INFO on the component's logger; ``enable_access_log: False`` turns
them off, and then they cost nothing: callers check :func:`access_log_enabled`
before timing or formatting anything.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = [
    "ENCODINGS",
    "LEVELS",
    "LOGGING_CONFIG_FIELDS",
    "ContextFilter",
    "JSONFormatter",
    "TextFormatter",
    "access",
    "access_log_enabled",
    "apply_logging_config",
    "check_logging_config",
    "setup",
]

ENCODINGS = ("TEXT", "JSON")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGING_CONFIG_FIELDS = (
    "encoding",
    "log_level",
    "logs_dir",
    "enable_access_log",
    "additional_log_standard_attrs",
)
"""The fields of Ray Serve's ``LoggingConfig``."""
CONTEXT_FIELDS = ("application", "deployment", "replica", "request_id", "route")
ACCESS_FIELDS = ("method", "status", "latency_ms")

_access_log = True
_handler: logging.Handler | None = None
_file_handler: logging.Handler | None = None
_component = ""
_file_name = ""


def access_log_enabled() -> bool:
    """Whether this process logs one line per request (``enable_access_log``)."""
    return _access_log


class ContextFilter(logging.Filter):
    """Adds the process's fields and the current request's to each record.

    ``fields`` are constant (``application``, ``deployment``, ``replica``...);
    ``current()`` returns the request being handled (an object with
    ``request_id`` and ``route`` attributes) or None. Attributes a record
    already has (``extra=``) are kept.
    """

    def __init__(self, fields: Mapping[str, str], current: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields)
        self.current = current

    def filter(self, record: logging.LogRecord) -> bool:
        attrs = record.__dict__
        for key, value in self.fields.items():
            if key not in attrs:
                attrs[key] = value
        if self.current is not None and "request_id" not in attrs:
            request = self.current()
            request_id = getattr(request, "request_id", "") if request is not None else ""
            if request_id:
                attrs["request_id"] = request_id
                route = getattr(request, "route", "")
                if route and "route" not in attrs:
                    attrs["route"] = route
        return True


class _Formatter(logging.Formatter):
    """``logging.Formatter`` whose default time format is made once per second, not per record."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        created = int(record.created)
        second = self._second  # one tuple: threads may format with this formatter at once
        if second[0] != created:
            second = (created, time.strftime(self.default_time_format, self.converter(created)))
            self._second = second
        if self.default_msec_format:
            return self.default_msec_format % (second[1], record.msecs)
        return second[1]


class TextFormatter(_Formatter):
    """``LEVEL time <component fields> [request id] -- message``, as Ray Serve's."""

    def __init__(
        self,
        prefix_fields: tuple[str, ...],
        extra_attrs: tuple[str, ...] = (),
        *,
        show_request_id: bool = True,
    ) -> None:
        super().__init__()
        self.prefix_fields = prefix_fields
        self.extra_attrs = extra_attrs
        self.show_request_id = show_request_id

    def formatMessage(self, record: logging.LogRecord) -> str:
        attrs = record.__dict__
        parts = [record.levelname, record.asctime]
        parts += [str(attrs[f]) for f in self.prefix_fields if attrs.get(f)]
        request_id = attrs.get("request_id") if self.show_request_id else None
        if request_id:
            parts.append(str(request_id))
        line = " ".join(parts) + " -- " + record.message
        if self.extra_attrs:
            line += "".join(f" {a}={attrs.get(a)!s}" for a in self.extra_attrs)
        return line

    def usesTime(self) -> bool:
        return True


class JSONFormatter(_Formatter):
    """One JSON object per line, with Ray Serve's field names."""

    def __init__(self, extra_attrs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.extra_attrs = extra_attrs

    def format(self, record: logging.LogRecord) -> str:
        attrs = record.__dict__
        out: dict[str, Any] = {
            "levelname": record.levelname,
            "asctime": self.formatTime(record),
            "timestamp_ns": int(record.created * 1e9),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("component_name", *CONTEXT_FIELDS, *ACCESS_FIELDS):
            value = attrs.get(key)
            if value is not None and value != "":
                out[key] = value
        for key in self.extra_attrs:
            if key in attrs:
                out[key] = attrs[key]
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_text"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def _formatter(encoding: str, extra_attrs: tuple[str, ...]) -> logging.Formatter:
    if encoding == "JSON":
        return JSONFormatter(extra_attrs)
    if _component == "replica":
        return TextFormatter(("application", "deployment", "replica"), extra_attrs)
    # The proxy's messages start with the request id already.
    return TextFormatter(("component_name",), extra_attrs, show_request_id=False)


def setup(
    component: str,
    fields: Mapping[str, str],
    current: Callable[[], Any] | None = None,
    *,
    stream: TextIO | None = None,
    file_name: str = "",
) -> logging.Handler:
    """Install this process's log handler on the root logger (INFO, TEXT); return it.

    ``component`` is ``"replica"`` or ``"proxy"``; ``fields`` the constant
    fields of its records; ``current`` gives the request being handled.
    ``file_name`` names the file used when ``logs_dir`` is set.
    """
    global _handler, _component, _file_name
    _component = component
    _file_name = file_name
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter({"component_name": component, **fields}, current))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _handler = handler
    handler.setFormatter(_formatter("TEXT", ()))
    return handler


def check_logging_config(config: Any) -> dict[str, Any]:
    """Validate a ``logging_config`` (a dict, Ray's ``LoggingConfig``, or None); return a dict.

    Raises ValueError naming the field at fault and the values it may take
    (an unknown field, an ``encoding`` other than TEXT or JSON, a
    ``log_level`` that is not a logging level...), TypeError when it is not
    a mapping at all. ``encoding`` and ``log_level`` names are accepted in
    any case. Called where a config is declared (``@serve.deployment``,
    ``.options``, ``serve.run``, ``serve.start``), so that a bad one is
    refused there and not first noticed in a replica.
    """
    if config is None:
        return {}
    if hasattr(config, "dict") and not isinstance(config, Mapping):
        config = config.dict()  # Ray's LoggingConfig (pydantic)
    if not isinstance(config, Mapping):
        raise TypeError(f"logging_config must be a dict, got {config!r}")
    unknown = sorted(str(k) for k in set(config) - set(LOGGING_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown logging_config field(s) {', '.join(map(repr, unknown))}; valid "
            f"fields are {', '.join(LOGGING_CONFIG_FIELDS)}."
        )
    encoding = config.get("encoding")
    if encoding is not None and (
        not isinstance(encoding, str) or encoding.upper() not in ENCODINGS
    ):
        raise ValueError(f"logging_config encoding must be TEXT or JSON, got {encoding!r}.")
    level = config.get("log_level")
    if level is not None and (
        isinstance(level, bool)
        or not isinstance(level, (int, str))
        or (isinstance(level, str) and level.upper() not in logging.getLevelNamesMapping())
    ):
        raise ValueError(
            f"logging_config log_level {level!r} is not a logging level; use one of "
            f"{', '.join(LEVELS)} (or a level number)."
        )
    access = config.get("enable_access_log")
    if access is not None and not isinstance(access, bool):
        raise ValueError(f"logging_config enable_access_log must be True or False, got {access!r}.")
    attrs = config.get("additional_log_standard_attrs")
    if attrs is not None and (
        isinstance(attrs, str)
        or not isinstance(attrs, (list, tuple, set, frozenset))
        or not all(isinstance(a, str) for a in attrs)
    ):
        raise ValueError(
            "logging_config additional_log_standard_attrs must be a list of LogRecord "
            f"attribute names (funcName, lineno, process...), got {attrs!r}."
        )
    logs_dir = config.get("logs_dir")
    if logs_dir is not None and not isinstance(logs_dir, (str, os.PathLike)):
        raise ValueError(f"logging_config logs_dir must be a folder path, got {logs_dir!r}.")
    return dict(config)


def apply_logging_config(config: Mapping[str, Any] | None) -> None:
    """Apply ``logging_config`` (Ray's fields) to this process's logging.

    ``log_level`` sets the root level (the trioserve loggers' and the user's);
    ``encoding`` the format; ``enable_access_log`` the per-request lines;
    ``additional_log_standard_attrs`` the record attributes added to each
    line; ``logs_dir`` moves the records to ``<logs_dir>/<file name>`` (what
    the process prints, and its lines before its config is known, stay in its
    file of the run folder).
    """
    global _access_log, _file_handler
    try:
        config = check_logging_config(config)
    except (ValueError, TypeError) as exc:
        logging.getLogger("trioserve").warning("ignoring logging_config: %s", exc)
        return
    level = config.get("log_level")
    if level is not None:
        logging.getLogger().setLevel(level if isinstance(level, int) else str(level).upper())
    _access_log = config.get("enable_access_log", True) is not False
    encoding = str(config.get("encoding") or "TEXT").upper()
    extra = tuple(str(a) for a in config.get("additional_log_standard_attrs") or ())
    formatter = _formatter(encoding, extra)
    if _handler is None:
        return
    _handler.setFormatter(formatter)
    logs_dir = config.get("logs_dir")
    root = logging.getLogger()
    if logs_dir and _file_name:
        path = os.path.join(str(logs_dir), _file_name)
        if not isinstance(_file_handler, logging.FileHandler) or _file_handler.baseFilename != (
            os.path.abspath(path)
        ):
            os.makedirs(str(logs_dir), exist_ok=True)
            new = logging.FileHandler(path)
            for f in _handler.filters:
                new.addFilter(f)
            if _file_handler is not None:
                root.removeHandler(_file_handler)
                _file_handler.close()
            root.removeHandler(_handler)
            root.addHandler(new)
            _file_handler = new
        _file_handler.setFormatter(formatter)
    elif _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
        root.addHandler(_handler)


def access(
    logger: logging.Logger,
    method: str,
    path: str,
    status: object,
    latency_ms: float,
    **fields: Any,
) -> None:
    """Log an access line: ``GET /path 200 3.2ms`` (``CALL method OK 1.0ms`` for
    handle calls), with ``fields`` (``request_id``, ``route``...) for JSON.

    Call it only when :func:`access_log_enabled`.
    """
    access_line(
        logger,
        "%s %s %s %.1fms",
        (method, path, status, latency_ms),
        {"method": method, "status": status, "latency_ms": round(latency_ms, 3), **fields},
    )


def access_line(
    logger: logging.Logger, msg: str, args: tuple[Any, ...], extra: Mapping[str, Any]
) -> None:
    """``logger.info(msg, *args, extra=extra)``, without looking up the caller: the
    record names :func:`access` as where it was made (an access line's caller
    is no news). For the proxy's and replicas' per-request lines."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if logging._srcfile:
        where = _ACCESS_CALLER
    else:  # the application turned caller lookup off
        where = ("(unknown file)", 0, "(unknown function)")
    record = logger.makeRecord(
        logger.name, logging.INFO, where[0], where[1], msg, args, None, where[2], extra
    )
    logger.handle(record)


_ACCESS_CALLER = (access.__code__.co_filename, access.__code__.co_firstlineno, "access")
