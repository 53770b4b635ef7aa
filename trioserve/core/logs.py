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
before timing or formatting anything. While the process's own handler is the
only one its records reach (always in the proxy; in a replica unless the user
added handlers), an access line is formatted without a ``LogRecord`` and the
lines of one event-loop turn are written together when the turn ends
(:class:`LineHandler`): the same text, at a fraction of the cost. Otherwise
it is an ordinary record, so that the user's handlers see it too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from trioserve.core.eventloop import running_loop

__all__ = [
    "ENCODINGS",
    "LEVELS",
    "LOGGING_CONFIG_FIELDS",
    "ContextFilter",
    "JSONFormatter",
    "LineHandler",
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
_handler: LineHandler | None = None
_file_handler: LineHandler | None = None
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
        self.add_fields(record.__dict__)
        return True

    def add_fields(self, attrs: dict[str, Any]) -> None:
        """Add the fields to a record's attributes ``attrs``, keeping those it has."""
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


class _Formatter(logging.Formatter):
    """``logging.Formatter`` whose default time format is made once per second, not per record."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return self._asctime(record.created, record.msecs)

    def _asctime(self, created: float, msecs: float) -> str:
        whole = int(created)
        second = self._second  # one tuple: threads may format with this formatter at once
        if second[0] != whole:
            second = (whole, time.strftime(self.default_time_format, self.converter(whole)))
            self._second = second
        if self.default_msec_format:
            return self.default_msec_format % (second[1], msecs)
        return second[1]

    def info_line(self, name: str, message: str, attrs: Mapping[str, Any]) -> str | None:
        """The line an INFO record of logger ``name`` made now would format to, given
        its ``message`` and attributes ``attrs``; None when it needs a real
        ``LogRecord`` (here, always; the formats below know better)."""
        return None


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
        return self._text(record.levelname, record.asctime, record.message, record.__dict__)

    def info_line(self, name: str, message: str, attrs: Mapping[str, Any]) -> str | None:
        if self.extra_attrs:  # standard attributes: those of a real record
            return None
        return self._text(
            logging.getLevelName(logging.INFO), self._asctime(*_now()), message, attrs
        )

    def _text(self, levelname: str, asctime: str, message: str, attrs: Mapping[str, Any]) -> str:
        parts = [levelname, asctime]
        parts += [str(attrs[f]) for f in self.prefix_fields if attrs.get(f)]
        request_id = attrs.get("request_id") if self.show_request_id else None
        if request_id:
            parts.append(str(request_id))
        line = " ".join(parts) + " -- " + message
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
        out = self._fields(
            record.levelname,
            self.formatTime(record),
            record.created,
            record.name,
            record.getMessage(),
            attrs,
        )
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

    def info_line(self, name: str, message: str, attrs: Mapping[str, Any]) -> str | None:
        if self.extra_attrs:  # standard attributes: those of a real record
            return None
        created, msecs = _now()
        info = logging.getLevelName(logging.INFO)  # as a record's, should it be renamed
        out = self._fields(info, self._asctime(created, msecs), created, name, message, attrs)
        return json.dumps(out, default=str)

    @staticmethod
    def _fields(
        levelname: str,
        asctime: str,
        created: float,
        name: str,
        message: str,
        attrs: Mapping[str, Any],
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "levelname": levelname,
            "asctime": asctime,
            "timestamp_ns": int(created * 1e9),
            "logger": name,
            "message": message,
        }
        for key in ("component_name", *CONTEXT_FIELDS, *ACCESS_FIELDS):
            value = attrs.get(key)
            if value is not None and value != "":
                out[key] = value
        return out


def _now() -> tuple[float, float]:
    """The time now and its milliseconds, as a ``LogRecord`` made now would have them."""
    created = time.time()
    return created, int((created - int(created)) * 1000) + 0.0


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's handler: records as any ``StreamHandler``, and ready-made lines.

    :meth:`write_soon` takes a line (an access line, formatted without a
    ``LogRecord``); the lines of one event-loop turn are written in one go
    once the turn ends, or at once in a thread that runs no loop. A record
    written meanwhile goes after them, so the order holds. Lines never wait
    in more than :data:`MAX_WAITING_LINES` (should a loop stop without
    another turn). A process killed with SIGKILL loses the lines of the turn
    it was in.
    """

    MAX_WAITING_LINES = 256

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def write_soon(self, line: str) -> None:
        """Write ``line`` (and a newline) once the current event-loop turn ends."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            waiting = len(self._lines)
        if waiting >= self.MAX_WAITING_LINES or (
            waiting == 1 and not _after_this_turn(self._write_lines)
        ):
            self._write_lines()

    def _write_lines(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self._lines:
                return
            text = self.terminator.join(self._lines) + self.terminator
            self._lines.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:  # a full disk, a closed stream: as logging, report and go on
                if logging.raiseExceptions and sys.stderr is not None:
                    traceback.print_exc(file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if self._lines:
            self._write_lines()
        super().emit(record)

    def flush(self) -> None:
        if self._lines:
            self._write_lines()
        super().flush()


class _FileLineHandler(LineHandler, logging.FileHandler):
    """:class:`LineHandler` writing to a file (``logs_dir``)."""

    def __init__(self, path: str) -> None:
        logging.FileHandler.__init__(self, path)
        self._lines = []


def _after_this_turn(callback: Callable[[], None]) -> bool:
    """Call ``callback`` once the running event loop's current turn ends (asyncio or
    trio); False, and nothing scheduled, when this thread runs no loop."""
    library, loop = running_loop()
    if library == "asyncio":
        loop.call_soon(callback)
    elif library == "trio":
        loop.run_sync_soon(callback)
    else:
        return False
    return True


def _sole_handler(
    logger: logging.Logger,
) -> tuple[LineHandler, ContextFilter, _Formatter] | None:
    """The process's handler, with its filter and format, when it is the only one
    a record of ``logger`` reaches and nothing on the way may change or drop
    the record; else None."""
    if logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    node = logger
    while node.parent is not None:
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    handlers = node.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if not isinstance(handler, LineHandler) or handler.level > logging.INFO:
        return None
    filters, formatter = handler.filters, handler.formatter
    if len(filters) != 1 or not isinstance(filters[0], ContextFilter):
        return None
    if not isinstance(formatter, _Formatter):
        return None
    return handler, filters[0], formatter


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
    handler = LineHandler(stream if stream is not None else sys.stderr)
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
        if not isinstance(_file_handler, _FileLineHandler) or _file_handler.baseFilename != (
            os.path.abspath(path)
        ):
            os.makedirs(str(logs_dir), exist_ok=True)
            new = _FileLineHandler(path)
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
    is no news). For the proxy's and replicas' per-request lines.

    When the process's own handler is the only one the record would reach,
    the line is made without a record and written when the event-loop turn
    ends (:class:`LineHandler`); the text is the same."""
    if not logger.isEnabledFor(logging.INFO):
        return
    sole = _sole_handler(logger)
    if sole is not None:
        handler, context, formatter = sole
        attrs = dict(extra)
        context.add_fields(attrs)
        line = formatter.info_line(logger.name, msg % args, attrs)
        if line is not None:
            handler.write_soon(line)
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
