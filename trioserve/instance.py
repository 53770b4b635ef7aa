"""An instance of trioserve: its controller, event log and run folder, and the client API.

``async with trioserve.open_instance() as serve:`` runs a controller inside
the caller's trio or asyncio program (library mode) and gives a
:class:`ServeInstance` with ``serve.run``, ``serve.status`` and the rest as
awaitables. The synchronous ``trioserve.run`` & co. (:mod:`trioserve.api`)
run the same instance on the process's background loop (embedded mode).

Where things go
---------------
The state dir is ``$TRIOSERVE_HOME``, or ``~/.trioserve``. Each instance
gets a run folder ``runs/<date>-<time>-<pid>`` in it holding ``events.db``
(the event log), ``secret`` (the instance secret, mode 0600) and ``logs/``
(one file per process); the link ``latest`` points at the newest run, so
the log of a script that already exited can still be read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from trioserve.core import rpc
from trioserve.core.config import DEFAULT_HTTP_PORT, HTTPOptions
from trioserve.core.controller import Controller
from trioserve.core.deployment import Application, BuiltApp, build_app
from trioserve.core.launcher import LocalProcessLauncher, detect_resources
from trioserve.core.logs import check_logging_config
from trioserve.core.routing import (
    InstanceAddress,
    current_instance,
    set_current_instance,
)
from trioserve.exceptions import DeployFailedError, RayServeException
from trioserve.handle import DeploymentHandle
from trioserve.schema import ServeStatus
from trioserve.store import EventLog

__all__ = [
    "Client",
    "ServeInstance",
    "http_options_from",
    "new_run_dir",
    "open_instance",
    "point_latest",
    "state_home",
]

log = logging.getLogger("trioserve")

PENDING_REPORT_S = 10.0
"""While ``run`` waits, how often it repeats why the application is not running yet."""


def state_home() -> Path:
    """The state dir, absolute: ``$TRIOSERVE_HOME`` (``~`` expanded, relative to the
    current directory) or ``~/.trioserve``."""
    home = os.environ.get("TRIOSERVE_HOME")
    return (Path(home) if home else Path.home() / ".trioserve").expanduser().resolve()


def http_options_from(value: Any = None, proxy_location: Any = None) -> HTTPOptions:
    """The ``HTTPOptions`` that ``serve.start(http_options=..., proxy_location=...)`` mean.

    ``value`` is an ``HTTPOptions``, a dict of its fields, or None (all
    defaults). A port not given is ``$TRIOSERVE_DEFAULT_HTTP_PORT``, else 8000.
    ``proxy_location`` overrides the options' location, except that options
    that turn the proxy off (``host=None``) keep it off.
    """
    if isinstance(value, HTTPOptions):
        options = value.to_dict()
    elif value is None:
        options = {"port": _default_port()}
    elif isinstance(value, Mapping):
        options = {"port": _default_port(), **value}
    else:
        raise TypeError(f"http_options must be an HTTPOptions or a dict, got {value!r}")
    given = HTTPOptions.from_dict(options)
    if proxy_location is not None and given.enabled:
        # A proxy turned off in the options (host=None, as in Ray) stays off.
        options["location"] = str(getattr(proxy_location, "value", proxy_location))
        return HTTPOptions.from_dict(options)
    return given


def _default_port() -> int:
    raw = os.environ.get("TRIOSERVE_DEFAULT_HTTP_PORT", "")
    try:
        return int(raw) if raw else DEFAULT_HTTP_PORT
    except ValueError:
        raise RayServeException(
            f"TRIOSERVE_DEFAULT_HTTP_PORT must be a port number, got {raw!r}"
        ) from None


def new_run_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Make a new run folder under ``home`` and point ``latest`` at it."""
    root = Path(home) if home is not None else state_home()
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs / f"{stamp}-{os.getpid()}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = runs / f"{stamp}-{os.getpid()}-{n}"
    run_dir.mkdir()
    point_latest(root, Path("runs") / run_dir.name)
    return run_dir


def point_latest(root: Path, target: Path) -> None:
    """Point ``root/latest`` at ``target`` (relative to ``root``), atomically: the
    folder the log tools read when given no ``--log``."""
    link = root / "latest"
    temp = root / f".latest-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    os.symlink(target, temp)
    os.replace(temp, link)


class Client:
    """The operations of ``serve.*`` as awaitables, against a controller over RPC."""

    def __init__(self, address: InstanceAddress) -> None:
        self.address = address

    @contextlib.asynccontextmanager
    async def _controller(self) -> AsyncIterator[rpc.Connection]:
        try:
            async with rpc.connect(self.address.controller, self.address.secret) as conn:
                yield conn
        except OSError as exc:
            raise RayServeException(
                f"The trioserve controller at {self.address.controller} is unreachable: {exc}"
            ) from exc

    async def deploy(
        self, app: Application | BuiltApp, *, name: str = "default", route_prefix: str | None = "/"
    ) -> None:
        """Start deploying ``app`` as ``name`` (replacing an app of that name); don't wait."""
        built = app if isinstance(app, BuiltApp) else build_app(app, name, route_prefix)
        async with self._controller() as conn:
            for digest, data in built.blobs.items():
                stored = await conn.call("put_blob", data)
                if stored != digest:
                    raise RayServeException(f"blob {digest} was stored as {stored}")
            await conn.call(
                "deploy",
                built.name,
                [spec.to_dict() for spec in built.deployments],
                ingress=built.ingress,
                route_prefix=built.route_prefix,
            )

    async def wait_running(self, name: str, timeout_s: float | None = None) -> None:
        """Wait until the application ``name`` is RUNNING.

        Raises :class:`~trioserve.exceptions.DeployFailedError` when it is
        ``DEPLOY_FAILED`` (the message holds the traceback), ``TimeoutError``
        after ``timeout_s``. While it waits it logs, every
        :data:`PENDING_REPORT_S`, what it waits for.
        """
        deadline = None if timeout_s is None else anyio.current_time() + timeout_s
        last_report = anyio.current_time()
        async with self._controller() as conn:
            while True:
                left = 30.0 if deadline is None else deadline - anyio.current_time()
                if left <= 0:
                    raise TimeoutError(f"application {name!r} was not RUNNING after {timeout_s} s")
                status = await conn.call("wait_app", name, min(left, PENDING_REPORT_S))
                if status is None:
                    raise RayServeException(
                        f"Application '{name}' does not exist (it was deleted while deploying)."
                    )
                if status["status"] == "RUNNING":
                    proxy = status.get("proxy")
                    if proxy is None or status["route_prefix"] is None:
                        log.info("Deployed app '%s' successfully.", name)
                        return
                    if proxy["status"] == "HEALTHY":
                        log.info("Deployed app '%s' successfully.", name)
                        log.info(
                            "Application '%s' is ready at %s%s.",
                            name,
                            proxy["url"],
                            status["route_prefix"],
                        )
                        return
                    if proxy.get("start_failed"):
                        raise RayServeException(
                            f"Application '{name}' is running, but the HTTP proxy is not "
                            f"serving: {proxy['message']}"
                        )
                if status["status"] == "DEPLOY_FAILED":
                    raise DeployFailedError(
                        f"Deploying application {name} failed: {status['message']}"
                    )
                if anyio.current_time() - last_report >= PENDING_REPORT_S:
                    last_report = anyio.current_time()
                    waiting = "; ".join(
                        f"{d}: {info['message']}"
                        for d, info in status["deployments"].items()
                        if info["message"]
                    )
                    log.warning(
                        "application %r is %s: %s",
                        name,
                        status["status"],
                        waiting or status["message"],
                    )

    async def run(
        self,
        app: Application,
        *,
        name: str = "default",
        route_prefix: str | None = "/",
        logging_config: Mapping[str, Any] | None = None,
    ) -> DeploymentHandle:
        """Deploy ``app`` as ``name``, wait until it is RUNNING, return its ingress handle."""
        built = build_app(app, name, route_prefix, logging_config=logging_config)
        await self.deploy(built)
        await self.wait_running(name)
        return DeploymentHandle(built.ingress, name)

    async def status(self) -> ServeStatus:
        async with self._controller() as conn:
            return ServeStatus.from_dict(await conn.call("status"))

    async def delete(self, name: str, *, wait: bool = True) -> None:
        """Delete the application ``name`` (nothing if there is none)."""
        async with self._controller() as conn:
            exists = await conn.call("delete", name)
            while wait and exists:
                exists = await conn.call("wait_app", name, 30.0) is not None

    async def get_app_handle(self, name: str) -> DeploymentHandle:
        """A handle to the ingress deployment of the application ``name``."""
        status = await self.status()
        app = status.applications.get(name)
        if app is None:
            raise RayServeException(f"Application '{name}' does not exist.")
        return DeploymentHandle(app.ingress, name)

    async def get_deployment_handle(
        self, deployment_name: str, app_name: str | None = None
    ) -> DeploymentHandle:
        """A handle to ``deployment_name`` of ``app_name`` (default: this replica's app)."""
        if app_name is None:
            from trioserve.replica.host import current_replica_app

            app_name = current_replica_app()
            if app_name is None:
                raise RayServeException(
                    "Please specify an application name when getting a deployment handle "
                    "outside of a Serve application."
                )
        status = await self.status()
        app = status.applications.get(app_name)
        if app is None:
            raise RayServeException(f"Application '{app_name}' does not exist.")
        if deployment_name not in app.deployments:
            raise RayServeException(
                f"Deployment '{deployment_name}' does not exist in application '{app_name}'."
            )
        return DeploymentHandle(deployment_name, app_name)


class ServeInstance(Client):
    """A running instance (what :func:`open_instance` yields): its controller and run folder."""

    def __init__(self, address: InstanceAddress, controller: Controller, run_dir: Path) -> None:
        super().__init__(address)
        self.controller = controller
        self.run_dir = run_dir
        self.http_options: HTTPOptions | None = None
        """The HTTP options the instance was started with; None: no proxy."""


@contextlib.asynccontextmanager
async def open_instance(
    home: str | os.PathLike[str] | None = None,
    *,
    resources: Mapping[str, float] | None = None,
    http_options: Any = None,
    proxy_location: Any = None,
    logging_config: Any = None,
    **controller_options: Any,
) -> AsyncIterator[ServeInstance]:
    """Run an instance in the caller's event loop (trio or asyncio) for the body's duration.

    ``home`` is the state dir (default :func:`state_home`); ``resources``
    declares what replicas may use (default: this machine's CPUs, GPUs and
    memory; given names replace the detected ones). ``http_options`` and
    ``proxy_location`` are those of ``serve.start``: by default an HTTP proxy
    serves at ``http://127.0.0.1:8000``. ``logging_config`` (Ray's fields, a
    dict or a ``LoggingConfig``) is the HTTP proxy's, as Ray's
    ``serve.start(logging_config=...)``; a bad one raises ValueError here.
    Handles made in this process talk to this instance while it runs. On
    leaving, every replica is stopped (drained, then SIGTERM; SIGKILL after
    the stop timeout).
    """
    checked_logging = None if logging_config is None else check_logging_config(logging_config)
    run_dir = new_run_dir(home)
    secret_file = run_dir / "secret"
    secret = rpc.load_secret(secret_file)
    declared = {**detect_resources(), **dict(resources or {})}
    event_log = await anyio.to_thread.run_sync(EventLog.open, run_dir / "events.db")
    launcher = LocalProcessLauncher(run_dir, secret_file, embedded=True)
    options = http_options_from(http_options, proxy_location)
    controller = Controller(
        event_log,
        launcher,
        secret,
        resources=declared,
        http_options=options if options.enabled else None,
        logging_config=checked_logging,
        **controller_options,
    )
    try:
        previous: InstanceAddress | None
        try:
            previous = current_instance()
        except RayServeException:
            previous = None
        async with anyio.create_task_group() as tg:
            address = await tg.start(controller.run)
            instance = ServeInstance(InstanceAddress(address, secret), controller, run_dir)
            instance.http_options = options if options.enabled else None
            set_current_instance(instance.address)
            try:
                yield instance
            finally:
                set_current_instance(previous)
                tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(event_log.close)
