"""Daemon mode: a controller in its own process that outlives the commands that use it.

``trioserve start`` runs ``python -m trioserve.daemon`` in the background: a
controller with its event log, HTTP proxy and replicas, plus the admin API
(:mod:`trioserve.core.admin`) that ``trioserve deploy``, ``status``,
``config``, ``delete`` and ``shutdown`` talk to with :class:`AdminClient`.

Where things go
---------------
Everything lives in the daemon folder, ``<state dir>/daemon`` (the state dir
is ``$TRIOSERVE_HOME`` or ``~/.trioserve``): ``events.db`` (the event log),
``secret`` (the instance secret, mode 0600, also the admin API's bearer
token), ``logs/`` (one file per process, ``daemon.log`` for the controller),
and ``daemon.json``, which says where the running daemon listens.

Controller recovery
-------------------
Replicas and the proxy of a daemon have no lifeline: when the daemon's
process dies (even by SIGKILL) they keep serving, the proxy routing to the
replicas it knows. ``trioserve start`` then starts a new controller on the
same folder and the same RPC address: it replays the log, re-adopts the
processes that still run (``ReplicaAdopted``, same pids) and the proxy, and
replaces the replicas that died meanwhile. A clean stop (``trioserve
shutdown``, SIGTERM, Ctrl-C on ``python -m trioserve.daemon``) stops every
process and removes ``daemon.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx

from trioserve.core import rpc
from trioserve.core.admin import ADMIN_PREFIX, admin_app, bind_admin_socket, serve_admin
from trioserve.core.config import HTTPOptions
from trioserve.core.controller import Controller
from trioserve.core.deployment import BuiltApp
from trioserve.core.launcher import LocalProcessLauncher, detect_resources
from trioserve.exceptions import RayServeException
from trioserve.instance import http_options_from, point_latest, state_home
from trioserve.store import EventLog

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "AdminClient",
    "DaemonError",
    "DaemonInfo",
    "daemon_dir",
    "deploy_payload",
    "main",
    "read_info",
    "running_daemon",
    "start_daemon",
    "status_document",
]

log = logging.getLogger("trioserve.daemon")

DEFAULT_ADMIN_PORT = 8265
"""The admin API's port when none is given: the port Ray's ``serve deploy`` talks to."""

START_TIMEOUT_S = 60.0
"""How long ``trioserve start`` waits for the daemon to answer."""

SHUTDOWN_DRAIN_S = 60.0
"""How long ``trioserve shutdown`` lets replicas drain before every process is stopped."""

INFO_FILE = "daemon.json"
SETTINGS_FILE = "settings.json"
"""What the last ``trioserve start`` asked for (HTTP options, admin host and port);
kept after the daemon stops, so that the next start serves the same way."""
LOCK_FILE = "daemon.lock"


class DaemonError(RayServeException):
    """The daemon is not running, cannot start, or refused a request; the message says
    what to do. ``status`` is the admin API's HTTP status, when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def daemon_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """The daemon folder of the state dir ``home`` (default :func:`state_home`)."""
    return (Path(home) if home is not None else state_home()) / "daemon"


@dataclasses.dataclass(frozen=True)
class DaemonInfo:
    """Where a daemon listens, as it wrote it to ``daemon.json``."""

    pid: int
    controller: str
    """The controller's RPC address; a restarted daemon listens there again."""
    admin_url: str
    admin_host: str
    admin_port: int
    http_options: dict[str, Any] | None
    """The options its proxy serves with; None: no proxy."""
    instance_id: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_info(home: str | os.PathLike[str] | None = None) -> DaemonInfo | None:
    """What the last daemon of ``home`` wrote about itself (it may be gone since)."""
    try:
        data = json.loads((daemon_dir(home) / INFO_FILE).read_text())
        return DaemonInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _is_daemon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    zombie = stat[stat.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")
    return not zombie and b"trioserve.daemon" in argv


def running_daemon(home: str | os.PathLike[str] | None = None) -> DaemonInfo | None:
    """The daemon of ``home`` if its process runs, else None."""
    info = read_info(home)
    if info is None or not _is_daemon(info.pid):
        return None
    return info


def _write_json(path: Path, value: Any) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temp, path)


def _write_info(home: Path, info: DaemonInfo) -> None:
    _write_json(daemon_dir(home) / INFO_FILE, info.to_dict())


def read_settings(home: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the last ``trioserve start`` of ``home`` asked for ({} if none)."""
    try:
        data = json.loads((daemon_dir(home) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _take_lock(folder: Path) -> Any:
    """Hold the daemon folder's lock for this process's life: one daemon per folder."""
    import fcntl

    lock = open(folder / LOCK_FILE, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DaemonError(
            f"another trioserve daemon runs for {folder}; stop it with `trioserve shutdown`"
        ) from None
    return lock


# ------------------------------------------------------------------ the daemon process


async def serve_daemon(
    home: Path,
    http_options: HTTPOptions | None,
    admin_host: str,
    admin_port: int,
) -> None:
    """Run the daemon of ``home`` until SIGTERM, SIGINT or an admin shutdown."""
    folder = daemon_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(folder)
    point_latest(home, Path(folder.name))  # the log tools read this daemon's log by default
    try:
        # The admin port first: if it is taken, nothing has started (and no
        # process a previous daemon left running has been adopted, or stopped).
        admin_sock = bind_admin_socket(admin_host, admin_port)
    except OSError as exc:
        lock.close()
        raise DaemonError(
            f"cannot listen for the admin API on {admin_host}:{admin_port}: "
            f"{exc.strerror or exc}; choose another port with `trioserve start --admin-port N`"
        ) from None
    previous = read_info(home)
    secret_file = folder / "secret"
    secret = rpc.load_secret(secret_file)
    event_log = await anyio.to_thread.run_sync(EventLog.open, folder / "events.db")
    launcher = LocalProcessLauncher(folder, secret_file, embedded=False)
    controller = Controller(
        event_log,
        launcher,
        secret,
        # The same address as before, which the replicas and the proxy of the
        # previous daemon still report to.
        listen=previous.controller if previous is not None else "tcp://127.0.0.1:0",
        resources=detect_resources(),
        http_options=http_options,
        adopt=True,
    )
    stop = anyio.Event()
    delete_apps = False

    def shutdown() -> None:
        # ``trioserve shutdown``, as Ray's ``serve shutdown``: the applications go too,
        # so that the next ``trioserve start`` begins with none.
        nonlocal delete_apps
        delete_apps = True
        stop.set()

    async def metrics() -> bytes:
        from trioserve.core.metrics import instance_metrics

        return await instance_metrics(controller)

    try:
        async with anyio.create_task_group() as tg:
            address = await tg.start(controller.run)
            app = admin_app(controller, secret, shutdown, metrics)
            admin_url = await tg.start(serve_admin, app, admin_sock)
            _write_info(
                home,
                DaemonInfo(
                    pid=os.getpid(),
                    controller=address,
                    admin_url=admin_url,
                    admin_host=admin_host,
                    admin_port=int(admin_url.rsplit(":", 1)[1]),
                    http_options=None if http_options is None else http_options.to_dict(),
                    instance_id=event_log.instance_id,
                ),
            )
            log.info(
                "daemon %d: controller at %s, admin API at %s", os.getpid(), address, admin_url
            )
            tg.start_soon(_signals, stop)
            await stop.wait()
            if delete_apps:
                await _delete_all(controller)
            log.info("stopping every process")
            tg.cancel_scope.cancel()
        with contextlib.suppress(FileNotFoundError):
            (folder / INFO_FILE).unlink()
    finally:
        await anyio.to_thread.run_sync(event_log.close)
        lock.close()


async def _delete_all(controller: Controller) -> None:
    """Delete every application and wait (up to :data:`SHUTDOWN_DRAIN_S`) until they
    are gone, their replicas drained."""
    names = list(controller.state.apps)
    log.info("deleting the applications %s", ", ".join(names) or "(none)")
    for name in names:
        await controller.delete(name)
    with anyio.move_on_after(SHUTDOWN_DRAIN_S):
        await controller.wait_for(lambda state: not state.apps)


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trioserve.daemon``: what ``trioserve start`` runs in the background."""
    p = argparse.ArgumentParser(prog="python -m trioserve.daemon")
    p.add_argument("--home", required=True, help="the state dir")
    p.add_argument("--http-options", default=None, help="HTTPOptions as JSON; 'null': no proxy")
    p.add_argument("--admin-host", default="127.0.0.1")
    p.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s daemon %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = None if args.http_options is None else json.loads(args.http_options)
    http = None if options is None else http_options_from(options)
    try:
        anyio.run(
            serve_daemon,
            Path(args.home),
            http if http is not None and http.enabled else None,
            args.admin_host,
            args.admin_port,
            backend="trio",
        )
    except BaseException as exc:
        problem = _leaf(exc, (DaemonError, OSError))
        if problem is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(problem, OSError):
            log.error(
                "the daemon cannot start: %s; if a previous daemon's controller address "
                "is taken by another program, stop that program",
                problem,
            )
        else:
            log.error("the daemon cannot start: %s", problem)
        sys.exit(1)


def _leaf(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _leaf(inner, kinds)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ starting it


def start_daemon(
    home: str | os.PathLike[str] | None = None,
    *,
    http_options: Mapping[str, Any] | bool | None = True,
    admin_host: str | None = None,
    admin_port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> tuple[DaemonInfo, bool]:
    """Start the daemon of ``home`` in the background, unless it runs already.

    ``http_options``: a dict of ``HTTPOptions`` fields, ``None`` for no proxy,
    ``True`` for those of the previous daemon of this folder (or the
    defaults). Admin host and port default to the previous daemon's, else
    127.0.0.1 and :data:`DEFAULT_ADMIN_PORT`. Returns its info and whether it
    was started now (False: it was running). Raises :class:`DaemonError` with
    the end of its log when it does not come up.
    """
    root = Path(home) if home is not None else state_home()
    running = running_daemon(root)
    if running is not None:
        return running, False
    settings = read_settings(root)
    if http_options is True:
        options: dict[str, Any] | None = (
            settings["http_options"]
            if "http_options" in settings
            else http_options_from().to_dict()
        )
    elif http_options is None or http_options is False:
        options = None
    else:
        options = http_options_from(dict(http_options)).to_dict()
    host = admin_host or str(settings.get("admin_host") or "127.0.0.1")
    port = (
        admin_port
        if admin_port is not None
        else int(settings.get("admin_port", DEFAULT_ADMIN_PORT))
    )
    folder = daemon_dir(root)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    _write_json(
        folder / SETTINGS_FILE, {"http_options": options, "admin_host": host, "admin_port": port}
    )
    log_file = folder / "logs" / "daemon.log"
    argv = [
        sys.executable,
        "-m",
        "trioserve.daemon",
        "--home",
        str(root),
        "--http-options",
        json.dumps(options),
        "--admin-host",
        host,
        "--admin-port",
        str(port),
    ]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise DaemonError(
                f"the daemon exited with code {code} while starting:\n"
                f"{_tail(log_file)}\nits log: {log_file}"
            )
        info = read_info(root)
        if info is not None and info.pid == proc.pid:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{info.admin_url}/-/healthz", timeout=5).status_code == 200:
                    return info, True
        time.sleep(0.1)
    proc.terminate()
    raise DaemonError(
        f"the daemon did not answer within {timeout_s:.0f} s; its log ({log_file}) ends:\n"
        f"{_tail(log_file)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ the client


class AdminClient:
    """The admin API of the daemon of ``home``, for the CLI (httpx, synchronous).

    Raises :class:`DaemonError` when no daemon runs there, when it does not
    answer, or when it refuses a request (with its message).
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, timeout_s: float = 30.0):
        root = Path(home) if home is not None else state_home()
        info = running_daemon(root)
        if info is None:
            raise DaemonError(
                f"no trioserve daemon is running for {daemon_dir(root)}; "
                "start one with `trioserve start`"
            )
        self.info = info
        try:
            secret = rpc.load_secret(daemon_dir(root) / "secret", create=False)
        except (OSError, rpc.AuthenticationError) as exc:
            raise DaemonError(
                f"cannot read the daemon's secret: {exc}; run this command as the user "
                "that started the daemon"
            ) from None
        self._client = httpx.Client(
            base_url=info.admin_url,
            headers={"authorization": f"Bearer {secret.decode()}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DaemonError(
                f"the daemon's admin API at {self.info.admin_url} does not answer: {exc}; "
                "see its log, or restart it with `trioserve start`"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text}
        if response.status_code >= 400:
            raise DaemonError(str(body.get("error", body)), status=response.status_code)
        return body

    def status(self) -> dict[str, Any]:
        """The controller's status: applications, deployments, replicas and the proxy."""
        result: dict[str, Any] = self._call("GET", f"{ADMIN_PREFIX}/applications/")
        return result

    def deploy(self, payload: Mapping[str, Any]) -> dict[str, list[str]]:
        """Deploy a built config file (:func:`deploy_payload`); returns what changed."""
        result: dict[str, list[str]] = self._call(
            "PUT", f"{ADMIN_PREFIX}/applications/", json=dict(payload)
        )
        return result

    def delete(self, name: str) -> None:
        """Delete the application ``name``; :class:`DaemonError` (404) if there is none."""
        self._call("DELETE", f"{ADMIN_PREFIX}/applications/{quote(name, safe='')}")

    def config(self) -> dict[str, Any] | None:
        """The config file deployed last, or None when none was."""
        try:
            result: dict[str, Any] = self._call("GET", f"{ADMIN_PREFIX}/config")
        except DaemonError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Stop the daemon and every process it runs; return once it is gone."""
        self._call("POST", f"{ADMIN_PREFIX}/shutdown")
        deadline = time.monotonic() + timeout_s
        while _is_daemon(self.info.pid):
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"the daemon (pid {self.info.pid}) was still stopping after "
                    f"{timeout_s:.0f} s; see its log"
                )
            time.sleep(0.1)


def deploy_payload(config: Mapping[str, Any], apps: Sequence[BuiltApp]) -> dict[str, Any]:
    """The body of the admin API's deploy request: the file, its built apps, their blobs."""
    blobs: dict[str, str] = {}
    for app in apps:
        for digest, data in app.blobs.items():
            blobs[digest] = base64.b64encode(data).decode()
    return {
        "config": dict(config),
        "applications": [
            {
                "name": app.name,
                "route_prefix": app.route_prefix,
                "ingress": app.ingress,
                "deployments": [spec.to_dict() for spec in app.deployments],
            }
            for app in apps
        ],
        "blobs": blobs,
    }


# ------------------------------------------------------------------ showing the status


def status_document(status: Mapping[str, Any], app: str | None = None) -> dict[str, Any]:
    """The controller's status as ``trioserve status`` shows it (Ray's layout, plus
    each deployment's target and replicas). ``app``: only that application."""
    from trioserve.schema import ServeStatus

    overview = ServeStatus.from_dict(status)
    applications: dict[str, Any] = {}
    for name, a in overview.applications.items():
        if app is not None and name != app:
            continue
        applications[name] = {
            "status": a.status.value,
            "message": a.message,
            "last_deployed_time_s": a.last_deployed_time_s,
            "route_prefix": a.route_prefix,
            "deployments": {
                dname: {
                    "status": d.status.value,
                    "status_trigger": d.status_trigger,
                    "replica_states": dict(d.replica_states),
                    "message": d.message,
                    "target_replicas": d.target_replicas,
                    "replicas": [
                        {
                            "replica_id": r.replica_id,
                            "state": r.state,
                            "pid": r.pid,
                            "reason": r.reason,
                        }
                        for r in d.replicas
                    ],
                }
                for dname, d in a.deployments.items()
            },
        }
    document: dict[str, Any] = {
        "proxies": dict(overview.proxies),
        "applications": applications,
        "target_capacity": overview.target_capacity,
    }
    if overview.http_url:
        document["http_url"] = overview.http_url
    if overview.proxy_message:
        document["proxy_message"] = overview.proxy_message
    return document


if __name__ == "__main__":
    main()
