"""The CLI commands that run and operate the daemon (:mod:`trioserve.daemon`).

``trioserve start | deploy | status | config | delete | shutdown``; their
parsers are added to the ``trioserve`` parser by :func:`add_commands`. Each
handler returns the exit code: 0 done, 1 the daemon is not running or refused
(the message says what to do), 2 a usage error or a bad config file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trioserve.daemon import (
    AdminClient,
    DaemonError,
    daemon_dir,
    deploy_payload,
    start_daemon,
    status_document,
)
from trioserve.instance import state_home

__all__ = ["add_commands"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(exc: Exception, code: int = EXIT_FAILED) -> int:
    _say(f"trioserve: {exc}")
    return code


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _cmd_start(args: argparse.Namespace) -> int:
    http: dict[str, Any] | bool | None = True
    given = {
        key: value
        for key, value in (
            ("host", args.http_host),
            ("port", args.http_port),
            ("location", args.proxy_location),
        )
        if value is not None
    }
    if args.no_proxy:
        http = None
    elif given:
        http = given
    try:
        info, started = start_daemon(
            http_options=http, admin_host=args.admin_host, admin_port=args.admin_port
        )
    except (DaemonError, OSError, ValueError) as exc:
        return _fail(exc)
    verb = "started" if started else "is already running"
    _say(f"trioserve daemon {verb} (pid {info.pid}); admin API at {info.admin_url}")
    _say(f"its folder: {daemon_dir()}")
    if info.http_options is None:
        _say("no HTTP proxy; deploy with `trioserve deploy CONFIG.yaml`")
        return EXIT_OK
    try:
        proxy = _wait_for_proxy()
    except DaemonError as exc:
        return _fail(exc)
    if proxy.get("status") != "HEALTHY":
        return _fail(
            DaemonError(
                f"the HTTP proxy cannot serve: {proxy.get('message') or proxy.get('status')}; "
                "the daemon keeps running without it. Stop it with `trioserve shutdown -y` "
                "and start it with another port (`trioserve start --http-port N`)."
            )
        )
    _say(f"HTTP proxy at {proxy['url']}; deploy with `trioserve deploy CONFIG.yaml`")
    return EXIT_OK


PROXY_WAIT_S = 60.0
"""How long ``trioserve start`` waits for the HTTP proxy to serve or fail."""


def _wait_for_proxy() -> dict[str, Any]:
    """The proxy's status once it serves (HEALTHY) or cannot (a message), polled."""
    deadline = time.monotonic() + PROXY_WAIT_S
    with AdminClient() as admin:
        while True:
            proxy: dict[str, Any] = admin.status().get("proxy") or {}
            if proxy.get("status") == "HEALTHY" or proxy.get("message"):
                return proxy
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"the HTTP proxy did not start within {PROXY_WAIT_S:.0f} s; see "
                    f"{daemon_dir() / 'logs' / 'proxy.log'}"
                )
            time.sleep(0.1)


def _cmd_deploy(args: argparse.Namespace) -> int:
    from trioserve.config_file import ConfigFileError, build_applications, load_config_file

    try:
        config = load_config_file(args.config)
        built = build_applications(config)
    except ConfigFileError as exc:
        return _fail(exc, EXIT_USAGE)
    except Exception as exc:
        return _fail(
            RuntimeError(f"cannot build the applications of {args.config}: {exc}"), EXIT_USAGE
        )
    try:
        with AdminClient() as admin:
            daemon_http = admin.info.http_options
            outcome = admin.deploy(deploy_payload(config.to_dict(), built))
    except DaemonError as exc:
        return _fail(exc)
    if config.http_options and daemon_http is not None:
        changed = {
            k: v for k, v in config.http_options.items() if k in daemon_http and daemon_http[k] != v
        }
        if changed:
            _say(
                f"warning: the daemon's HTTP options cannot change while it runs; "
                f"ignoring {changed} (restart it with `trioserve shutdown` and "
                "`trioserve start --http-port ...`)"
            )
    for kind in ("deployed", "unchanged", "deleted"):
        if outcome.get(kind):
            _say(f"{kind}: {', '.join(outcome[kind])}")
    _say("Sent deploy request successfully. Use `trioserve status` to follow it.")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        with AdminClient() as admin:
            status = admin.status()
    except DaemonError as exc:
        return _fail(exc)
    if args.name is not None and args.name not in status.get("applications", {}):
        return _fail(DaemonError(f"Application '{args.name}' does not exist."))
    sys.stdout.write(_dump(status_document(status, args.name)))
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    try:
        with AdminClient() as admin:
            config = admin.config()
    except DaemonError as exc:
        return _fail(exc)
    if config is None:
        _say("no config file has been deployed; deploy one with `trioserve deploy`")
        return EXIT_OK
    apps = list(config.get("applications", []))
    if args.name is not None:
        apps = [a for a in apps if a.get("name", "default") == args.name]
        if not apps:
            return _fail(DaemonError(f"Application '{args.name}' is not in the deployed config."))
    sys.stdout.write("---\n".join(_dump(a) for a in apps))
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    try:
        with AdminClient() as admin:
            admin.delete(args.name)
    except DaemonError as exc:
        return _fail(exc)
    _say(f"Sent delete request for application '{args.name}'.")
    return EXIT_OK


def _cmd_shutdown(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            return _fail(
                DaemonError("shutting down stops every application; confirm with -y"), EXIT_USAGE
            )
        answer = input(
            "This shuts down the trioserve daemon and every application it runs. Continue? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            _say("not shut down")
            return EXIT_FAILED
    try:
        with AdminClient() as admin:
            _say(f"stopping the daemon (pid {admin.info.pid}) and every process it runs...")
            admin.shutdown()
    except DaemonError as exc:
        return _fail(exc)
    _say("Shut down.")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Add ``start``, ``deploy``, ``status``, ``config``, ``delete`` and ``shutdown``."""
    home = f"{state_home()}"
    start = commands.add_parser(
        "start",
        help="start the daemon: a controller that keeps running in the background",
        description=(
            "Start a controller in the background, with its HTTP proxy and admin API, in "
            "the daemon folder of $TRIOSERVE_HOME (default ~/.trioserve). When its earlier "
            "process died, the new one re-adopts the replicas and the proxy still running."
        ),
    )
    start.add_argument("--http-host", metavar="HOST", help="the proxy's host (default 127.0.0.1)")
    start.add_argument("--http-port", metavar="PORT", type=int, help="the proxy's port (8000)")
    start.add_argument(
        "--proxy-location",
        choices=["HeadOnly", "EveryNode", "Disabled"],
        help="Disabled: no HTTP proxy",
    )
    start.add_argument("--no-proxy", action="store_true", help="run without an HTTP proxy")
    start.add_argument("--admin-host", metavar="HOST", help="the admin API's host (127.0.0.1)")
    start.add_argument(
        "--admin-port", metavar="PORT", type=int, help="the admin API's port (8265; 0: any)"
    )
    start.set_defaults(handler=_cmd_start)

    deploy = commands.add_parser(
        "deploy",
        help="deploy a config file to the running daemon; returns at once",
        description=(
            "Build the applications of a Ray Serve config file here, then send them to the "
            "daemon, which makes its applications those of the file: unchanged ones are "
            "left alone, the ones the file leaves out are deleted. Returns at once."
        ),
    )
    deploy.add_argument("config", metavar="CONFIG.yaml", type=Path)
    deploy.set_defaults(handler=_cmd_deploy)

    status = commands.add_parser(
        "status",
        help="applications, deployments and replicas of the daemon, as YAML",
    )
    status.add_argument("-n", "--name", metavar="NAME", help="only the application NAME")
    status.set_defaults(handler=_cmd_status)

    config = commands.add_parser("config", help="the config file deployed last, as YAML")
    config.add_argument("-n", "--name", metavar="NAME", help="only the application NAME")
    config.set_defaults(handler=_cmd_config)

    delete = commands.add_parser("delete", help="delete one application of the daemon")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(handler=_cmd_delete)

    shutdown = commands.add_parser(
        "shutdown",
        help="stop the daemon and every process it runs",
        description=f"Stop the daemon of {home} and every replica and proxy it runs.",
    )
    shutdown.add_argument("-y", "--yes", action="store_true", help="do not ask to confirm")
    shutdown.set_defaults(handler=_cmd_shutdown)
