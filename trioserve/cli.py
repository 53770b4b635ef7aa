"""The ``trioserve`` command line: read, replay, verify and export an event log.

Commands::

    trioserve log show    [--log PATH] [--app A] [--deployment D] [--replica R]
                          [--since SEQ_OR_TIME] [--kind KIND ...]
        the events, one line each: time, seq, kind, subject, reason or detail
    trioserve log replay  [--at SEQ|TIME] [--log PATH] [--format text|json]
        the applications, deployments and replicas as they were after an event
    trioserve log verify  [--log PATH]
        the hash chain, the snapshots, and every decision re-derived
    trioserve log export  [--format jsonl] [--log PATH] [-o FILE]
        every event as one JSON object per line

    trioserve run   IMPORT_PATH [KEY=VALUE ...] | CONFIG.yaml
                    [--name N] [--route-prefix P] [--host H] [--port N]
                    [--working-dir D] [--reload]
        serve an application (or a config file's) in the foreground until Ctrl-C
    trioserve build IMPORT_PATH ... [-o FILE]
        write a config file (Ray Serve's schema) for applications

``--log`` takes an ``events.db`` file or a run folder; without it, the log of
the latest run in the state dir is read (``$TRIOSERVE_HOME/latest/events.db``,
by default ``~/.trioserve/latest/events.db``). The log is opened without
creating anything and is only read, so these commands are safe on the log of a
running instance (SQLite WAL readers do not block its writer).

Exit codes: 0 done; 1 the log is damaged (``verify`` found a problem, or an
event could not be read or replayed); 2 a usage error, no event log at the
path, or a file that is not an event log.

:func:`main` takes the arguments and returns the exit code, so tests call it in
process; the ``trioserve`` console script and ``python -m trioserve.cli`` exit
with it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from trioserve.core import events as ev
from trioserve.core.controller import status_of
from trioserve.core.events import Event, EventDecodeError
from trioserve.core.journal import state_at, verify
from trioserve.core.logview import describe
from trioserve.core.state import IllegalTransition
from trioserve.instance import state_home
from trioserve.store import EventLog, StoredEvent, StoreError

__all__ = [
    "EXIT_DAMAGED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "Point",
    "build_parser",
    "event_record",
    "format_event",
    "format_time",
    "json_safe",
    "main",
    "parse_point",
    "resolve_log_path",
]

EXIT_OK = 0
EXIT_DAMAGED = 1
"""``verify`` found a problem, or an event could not be read or replayed."""
EXIT_USAGE = 2
"""Bad arguments, no event log at the path, or a file that is not an event log."""

UNIX_TIME_FROM = 1e9
"""Times from here on (September 2001) are wall-clock Unix times and are shown as
local ISO-8601 times; smaller ones come from a simulated clock and are shown as
seconds."""

_SEQ = re.compile(r"\d+")


class CliError(Exception):
    """A failure to report in one message, exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------- formatting


def format_time(at: float) -> str:
    """``2025-01-31T14:05:00.123`` (local time) for a Unix time, ``12.500s`` for a
    simulated clock."""
    if math.isfinite(at) and at >= UNIX_TIME_FROM:
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return dt.datetime.fromtimestamp(at).isoformat(timespec="milliseconds")
    return f"{at:9.3f}s"


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def format_event(stored: StoredEvent) -> str:
    """One line for a person: time, seq, kind, subject, reason or detail.

    ``2025-01-31T14:05:00.123  #3     ReplicaStarting      default#Hello#1   scale up (...)``
    """
    event = stored.event
    detail = _one_line(describe(event))
    line = (
        f"{format_time(stored.at)}  #{stored.seq:<5d} {event.KIND:<20} "
        f"{event.subject():<24} {detail}"
    )
    return line.rstrip()


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types: tuples and sets as lists, mapping keys as
    strings, bytes as base64 text, non-finite floats as ``"nan"``/``"inf"``/``"-inf"``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return str(value)


def event_record(stored: StoredEvent) -> dict[str, Any]:
    """What ``log export`` writes for one event: seq, at, kind, version, family and
    the event's fields (as of ``version``: older rows are upcast on reading)."""
    event = stored.event
    record: dict[str, Any] = {
        "seq": stored.seq,
        "at": json_safe(stored.at),
        "kind": event.KIND,
        "version": event.VERSION,
        "family": event.FAMILY,
    }
    for name, value in event.to_payload().items():
        record.setdefault(name, json_safe(value))
    return record


# --------------------------------------------------------------------- the log file


def resolve_log_path(arg: str | None) -> Path:
    """The ``events.db`` that ``--log`` names (a file or a run folder), or the latest
    run's; raises :class:`CliError` (exit 2) if there is none."""
    if arg is None:
        home = state_home()
        path = home / "latest" / "events.db"
        if not path.is_file():
            raise CliError(
                f"there is no event log at {path} (the latest run in the state dir {home}, "
                "which is $TRIOSERVE_HOME or else ~/.trioserve). Point at a log with "
                "--log PATH (an events.db file or a run folder), or set TRIOSERVE_HOME to "
                "the state dir the instance used."
            )
    else:
        path = Path(arg).expanduser()
        if path.is_dir():
            path = path / "events.db"
        if not path.is_file():
            raise CliError(
                f"there is no event log at {path}. --log takes an events.db file or a run "
                "folder (runs/<date>-<time>-<pid> in the state dir); without --log, the "
                "latest run in $TRIOSERVE_HOME (default ~/.trioserve) is read."
            )
    # Resolved once, so that a new run moving `latest` meanwhile changes nothing.
    return path.resolve()


@contextlib.contextmanager
def _open_log(arg: str | None) -> Iterator[EventLog]:
    path = resolve_log_path(arg)
    try:
        log = EventLog.open(path, create=False)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    with log:
        yield log


@contextlib.contextmanager
def _reading(log: EventLog) -> Iterator[None]:
    """Turn a damaged or unreadable event into a :class:`CliError` (exit 1)."""
    try:
        yield
    except (StoreError, EventDecodeError, IllegalTransition) as exc:
        raise CliError(
            f"cannot read the event log at {log.where}: {exc} "
            "(`trioserve log verify` finds the first damaged event)",
            EXIT_DAMAGED,
        ) from exc


# ---------------------------------------------------------------- times and seqs


@dataclasses.dataclass(frozen=True)
class Point:
    """A point in the log given on the command line: a seq, or a Unix time."""

    text: str
    seq: int | None = None
    at: float | None = None


def parse_point(text: str) -> Point:
    """A seq number (digits only) or an ISO-8601 time: a date and time (local time
    unless it has an offset), a date, or a time of day (today)."""
    text = text.strip()
    if _SEQ.fullmatch(text):
        return Point(text, seq=int(text))
    when: dt.datetime | None = None
    with contextlib.suppress(ValueError):
        when = dt.datetime.fromisoformat(text)
    if when is None:
        with contextlib.suppress(ValueError):
            when = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(text))
    if when is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a seq number nor an ISO-8601 time "
            "(such as 2025-01-31T14:05:00, 2025-01-31 or 14:05:30.5)"
        )
    return Point(text, at=when.timestamp())


def _kind_names(values: Sequence[str]) -> frozenset[str]:
    known = {kind.lower(): kind for kind in ev.EVENT_TYPES}
    kinds = set()
    for value in values:
        kind = known.get(value.lower())
        if kind is None:
            raise CliError(
                f"unknown event kind {value!r}; the kinds are: {', '.join(sorted(known.values()))}"
            )
        kinds.add(kind)
    return frozenset(kinds)


# ---------------------------------------------------------------------- log show


def _replica_parts(replica: str) -> tuple[str, str] | None:
    """``(app, deployment)`` of a replica id ``<app>#<deployment>#<n>``."""
    parts = replica.rsplit("#", 2)
    return (parts[0], parts[1]) if len(parts) == 3 else None


def _matcher(
    app: str | None, deployment: str | None, replica: str | None
) -> Callable[[Event], bool]:
    def matches(event: Event) -> bool:
        replica_id = getattr(event, "replica", None)
        if not isinstance(replica_id, str):
            replica_id = None
        of_replica = None if replica_id is None else _replica_parts(replica_id)
        event_app = getattr(event, "app", None)
        if not isinstance(event_app, str):
            event_app = None if of_replica is None else of_replica[0]
        event_deployment = getattr(event, "deployment", None)
        if not isinstance(event_deployment, str):
            event_deployment = None if of_replica is None else of_replica[1]
        if app is not None and event_app != app:
            return False
        if deployment is not None and event_deployment != deployment:
            return False
        if replica is not None:
            if replica_id is None:
                return False
            # A bare number names the replica by its counter (ids are never reused).
            if replica_id != replica and not (
                replica.isdigit() and replica_id.endswith(f"#{replica}")
            ):
                return False
        return True

    return matches


def _cmd_show(args: argparse.Namespace) -> int:
    kinds = _kind_names(args.kind) if args.kind else None
    since: Point | None = args.since
    matches = _matcher(args.app, args.deployment, args.replica)
    out: TextIO = sys.stdout
    shown = 0
    with _open_log(args.log) as log, _reading(log):
        after = since.seq - 1 if since is not None and since.seq is not None else 0
        for stored in log.read(after=max(after, 0)):
            if kinds is not None and stored.kind not in kinds:
                continue
            if since is not None and since.at is not None and stored.at < since.at:
                continue
            if not matches(stored.event):
                continue
            out.write(format_event(stored) + "\n")
            shown += 1
        if shown == 0:
            total = log.last_seq()
            print(
                f"no event matches (the log at {log.where} holds {total} events)",
                file=sys.stderr,
            )
    return EXIT_OK


# -------------------------------------------------------------------- log replay


def _seq_at(log: EventLog, point: Point | None) -> int:
    """The seq after which to replay: the last, the one given, or the last event
    recorded at or before a time (events in seq order, up to the first later one)."""
    last = log.last_seq()
    if point is None:
        return last
    if point.seq is not None:
        if point.seq > last:
            raise CliError(
                f"there is no event seq {point.seq}: the log at {log.where} holds seqs 1..{last}"
                if last
                else f"there is no event seq {point.seq}: the log at {log.where} is empty"
            )
        return point.seq
    assert point.at is not None
    seq = 0
    for stored in log.read(upto=last):
        if stored.at > point.at:
            break
        seq = stored.seq
    return seq


def _message_lines(message: str, indent: str) -> list[str]:
    return [f"{indent}{line}" for line in message.strip().splitlines()]


def _render_state(doc: Mapping[str, Any]) -> list[str]:
    seq, last = doc["seq"], doc["last_seq"]
    if seq == 0:
        lines = [f"before the first event (the log holds {last} events)"]
    else:
        lines = [f"after seq {seq} of {last}, {format_time(doc['at']).strip()}"]
    apps: Mapping[str, Any] = doc["applications"]
    if not apps:
        lines.append("no applications")
    for name, app in apps.items():
        route = app["route_prefix"]
        where = "no route" if route is None else f"route prefix {route}"
        lines.append(f"application {name}: {app['status']}, {where}, ingress {app['ingress']}")
        lines += _message_lines(app["message"], "  ")
        for dep_name, dep in app["deployments"].items():
            lines.append(
                f"  deployment {dep_name}: {dep['status']}, "
                f"target {dep['target_replicas']} replica(s)"
            )
            lines += _message_lines(dep["message"], "    ")
            for replica in dep["replicas"]:
                parts = [replica["state"]]
                if replica["pid"] is not None:
                    parts.append(f"pid {replica['pid']}")
                since = f"since {format_time(replica['since']).strip()}"
                if replica["reason"]:
                    since += f" ({_one_line(replica['reason'])})"
                parts.append(since)
                lines.append(f"    replica {replica['id']}: {', '.join(parts)}")
    return lines


def _cmd_replay(args: argparse.Namespace) -> int:
    with _open_log(args.log) as log, _reading(log):
        last = log.last_seq()
        seq = _seq_at(log, args.at)
        state = state_at(log, seq)
        at: float | None = None
        if seq:
            at = next(iter(log.read(after=seq - 1, upto=seq))).at
    doc: dict[str, Any] = {"seq": seq, "last_seq": last, "at": at, **status_of(state)}
    if args.format == "json":
        print(json.dumps(json_safe(doc), indent=2, allow_nan=False))
    else:
        print("\n".join(_render_state(doc)))
    return EXIT_OK


# -------------------------------------------------------------------- log verify


def _cmd_verify(args: argparse.Namespace) -> int:
    with _open_log(args.log) as log, _reading(log):
        report = verify(log)
        where = log.where
    if report.ok:
        print(
            f"OK: {report.events} events checked, {report.snapshots} snapshot(s), "
            f"{report.decisions} decisions re-derived ({where})"
        )
        return EXIT_OK
    at = "" if report.first_bad_seq is None else f" at seq {report.first_bad_seq}"
    print(f"FAILED{at}: {report.problem} ({report.events} events checked before it; {where})")
    return EXIT_DAMAGED


# -------------------------------------------------------------------- log export


def _write_jsonl(log: EventLog, out: TextIO) -> int:
    count = 0
    for stored in log.read():
        out.write(json.dumps(event_record(stored), allow_nan=False) + "\n")
        count += 1
    return count


def _cmd_export(args: argparse.Namespace) -> int:
    with _open_log(args.log) as log, _reading(log):
        if args.output in (None, "-"):
            _write_jsonl(log, sys.stdout)
            return EXIT_OK
        target = Path(args.output).expanduser()
        db = Path(log.where)
        if target.resolve() in {db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")}:
            raise CliError(f"refusing to write the export over the event log itself: {target}")
        try:
            with open(target, "w", encoding="utf-8", newline="\n") as out:
                count = _write_jsonl(log, out)
        except OSError as exc:
            raise CliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    print(f"exported {count} events to {target}", file=sys.stderr)
    return EXIT_OK


# -------------------------------------------------------------------- run, build


def _cmd_run(args: argparse.Namespace) -> int:
    """``trioserve run``: the work is :func:`trioserve.config_file.run_foreground`."""
    from trioserve import config_file as cf

    try:
        if cf.is_config_path(args.target):
            given = [
                flag
                for flag, value in (
                    ("--name", args.name),
                    ("--route-prefix", args.route_prefix),
                    ("--working-dir", args.working_dir),
                    ("KEY=VALUE arguments", args.app_args),
                )
                if value
            ]
            if given:
                raise CliError(
                    f"{', '.join(given)} cannot be used with a config file: set name, "
                    "route_prefix, args and runtime_env.working_dir in the file instead."
                )
            path = Path(args.target).expanduser()

            def load() -> cf.ServeConfig:
                return cf.load_config_file(path)

            config = load()
            folders = {
                Path(a.runtime_env.get("working_dir") or Path.cwd()) for a in config.applications
            }
            watch = [path, *sorted(folders)]
        else:
            app = cf.app_from_import_path(
                args.target,
                name=args.name,
                route_prefix=args.route_prefix,
                args=cf.parse_key_value_args(args.app_args),
                working_dir=args.working_dir,
            )

            def load() -> cf.ServeConfig:
                return cf.ServeConfig(applications=(app,))

            watch = [Path(app.runtime_env.get("working_dir") or Path.cwd())]
        return cf.run_foreground(
            load, host=args.host, port=args.port, reload=args.reload, watch=watch
        )
    except cf.ConfigFileError as exc:
        raise CliError(str(exc)) from exc


def _cmd_build(args: argparse.Namespace) -> int:
    """``trioserve build``: :func:`trioserve.config_file.build_config`, as YAML."""
    from trioserve import config_file as cf

    try:
        text = cf.dump_config(cf.build_config(args.import_paths))
    except cf.ConfigFileError as exc:
        raise CliError(str(exc)) from exc
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.output).expanduser()
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    print(f"wrote the config of {len(args.import_paths)} app(s) to {target}", file=sys.stderr)
    return EXIT_OK


def _add_run_build_commands(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="serve an application or a config file in the foreground until Ctrl-C",
        description=(
            "Serve in the foreground until Ctrl-C (or SIGTERM), which stops every replica "
            "and the proxy. TARGET is a config file (.yaml/.yml, Ray Serve's schema) or an "
            "import path module:app naming an Application or a builder function, which "
            "gets the KEY=VALUE arguments as a dict."
        ),
        epilog=(
            "Exit codes: 0 stopped by Ctrl-C/SIGTERM, 1 the deployment failed (or the proxy "
            "could not serve), 2 a bad config file, import path or argument."
        ),
    )
    run.add_argument("target", metavar="IMPORT_PATH|CONFIG.yaml")
    run.add_argument(
        "app_args", nargs="*", metavar="KEY=VALUE", help="arguments for a builder function"
    )
    run.add_argument("--name", help="the application's name (default: default)")
    run.add_argument("--route-prefix", metavar="P", help="the application's route (default: /)")
    run.add_argument("--host", metavar="H", help="where the HTTP proxy listens (default 127.0.0.1)")
    run.add_argument(
        "--port", metavar="N", type=int, help="the HTTP proxy's port (default 8000; 0: any free)"
    )
    run.add_argument(
        "--working-dir",
        metavar="D",
        help="the folder the application is imported from (default: the current directory)",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="redeploy when a .py file under the working dir (or the config file) changes",
    )
    run.set_defaults(handler=_cmd_run, help_of=run)

    build = commands.add_parser(
        "build",
        help="write a config file for applications",
        description=(
            "Import each application and write a config file in Ray Serve's schema: "
            "applications app1, app2, ... with the options their code sets, ready to edit "
            "and to serve with `trioserve run CONFIG.yaml`."
        ),
    )
    build.add_argument("import_paths", nargs="+", metavar="IMPORT_PATH")
    build.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    build.set_defaults(handler=_cmd_build, help_of=build)


# ------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The ``trioserve`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description=(
            "trioserve serves Python classes as scalable HTTP services, Ray Serve's "
            "programming model without a cluster. Every controller decision is an event "
            "in an append-only log."
        ),
        epilog=(
            "Exit codes: 0 done; 1 a failure (a deployment failed, the daemon is not running "
            "or refused, the log is damaged); 2 a usage error, a bad config file or import "
            "path, or no event log."
        ),
    )
    parser.set_defaults(handler=None, help_of=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    log_parser = commands.add_parser(
        "log",
        help="read, replay, verify and export an instance's event log",
        description=(
            "Read an instance's event log without changing it. Without --log, the latest "
            "run in $TRIOSERVE_HOME (default ~/.trioserve) is read."
        ),
        epilog="Exit codes: 0 done, 1 the log is damaged, 2 usage error or no event log.",
    )
    log_parser.set_defaults(help_of=log_parser)
    log_commands = log_parser.add_subparsers(title="log commands", metavar="COMMAND")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--log",
        metavar="PATH",
        help="an events.db file or a run folder (default: $TRIOSERVE_HOME/latest/events.db, "
        "$TRIOSERVE_HOME defaulting to ~/.trioserve)",
    )

    show = log_commands.add_parser(
        "show",
        parents=[where],
        help="the events, one line each",
        description=(
            "Print the events, one line each: time (local, or seconds for a simulated "
            "clock), seq, kind, subject, and the reason or detail. Filters combine."
        ),
    )
    show.add_argument("--app", metavar="A", help="only events of application A")
    show.add_argument(
        "--deployment",
        metavar="D",
        help="only events of deployment D and of its replicas (add --app when names repeat)",
    )
    show.add_argument(
        "--replica",
        metavar="R",
        help="only events of replica R (its id <app>#<deployment>#<n>, or just n)",
    )
    show.add_argument(
        "--since",
        metavar="SEQ_OR_TIME",
        type=parse_point,
        help="only events from seq SEQ on, or recorded at or after an ISO-8601 time "
        "(2025-01-31T14:05:00, local unless an offset is given; a date; or a time of day)",
    )
    show.add_argument(
        "--kind",
        metavar="KIND",
        nargs="+",
        action="extend",
        help="only events of these kinds (such as ReplicaStarting; case does not matter)",
    )
    show.set_defaults(handler=_cmd_show)

    replay = log_commands.add_parser(
        "replay",
        parents=[where],
        help="the state after an event: applications, deployments, replicas",
        description=(
            "Replay the log up to a point and print the applications, deployments and "
            "replicas as the controller knew them there. Without --at: the current state."
        ),
    )
    replay.add_argument(
        "--at",
        metavar="SEQ|TIME",
        type=parse_point,
        help="after event SEQ (0: before the first), or after the last event recorded at "
        "or before an ISO-8601 time",
    )
    replay.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (default) or json, the form of serve.status() plus seq, last_seq and at",
    )
    replay.set_defaults(handler=_cmd_replay)

    check = log_commands.add_parser(
        "verify",
        parents=[where],
        help="check the hash chain, the snapshots and every decision",
        description=(
            "Replay the log from zero: check its hash chain and snapshots, and re-derive "
            "every logged decision from the state just before it. Exits 0 when all is "
            "well, 1 with the first bad seq otherwise."
        ),
    )
    check.set_defaults(handler=_cmd_verify)

    export = log_commands.add_parser(
        "export",
        parents=[where],
        help="every event as one JSON object per line",
        description=(
            "Write every event as one JSON object per line: seq, at (Unix time), kind, "
            "version, family and the event's fields."
        ),
    )
    export.add_argument(
        "--format", choices=["jsonl"], default="jsonl", help="jsonl (the only format)"
    )
    export.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    export.set_defaults(handler=_cmd_export)
    _add_run_build_commands(commands)

    from trioserve._daemon_commands import add_commands

    add_commands(commands)
    return parser


# -------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trioserve`` with ``argv`` (default: the process's arguments); return
    the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] | None = args.handler
    if handler is None:
        args.help_of.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except CliError as exc:
        print(f"trioserve: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # The reader went away (`trioserve log show | head`): stop quietly.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Exit the process with :func:`main`'s exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
