"""Ray Serve's synchronous API: ``serve.run``, ``serve.status``, ``serve.delete``, ...

These functions work from a plain script. The first ``serve.run`` (or
``serve.start``) starts an *embedded* instance: its controller runs on the
process's background loop (:mod:`trioserve._loop`) and every replica stops
with the process. Inside a replica they talk to the replica's own instance.
Each is a thin wrapper around the :class:`~trioserve.instance.Client`
operation of the same name.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import trio

from trioserve import _loop
from trioserve.core.deployment import Application, build_app
from trioserve.core.logs import check_logging_config
from trioserve.core.routing import current_instance
from trioserve.exceptions import RayServeException, warn_deprecated
from trioserve.handle import DeploymentHandle
from trioserve.instance import Client, ServeInstance, http_options_from, open_instance
from trioserve.schema import ServeStatus

__all__ = [
    "delete",
    "get_app_handle",
    "get_deployment_handle",
    "run",
    "shutdown",
    "start",
    "status",
]

log = logging.getLogger("trioserve")

_lock = threading.RLock()


class _Embedded:
    """The embedded instance: a task on the background loop holding ``open_instance``."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.instance: ServeInstance | None = None
        self._stop: trio.Event | None = None
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done = _loop.submit(self._serve, ready)
        try:
            ready.result()
        except BaseException:
            self.done.result()  # surfaces the real error if the task failed first
            raise

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._stop = trio.Event()
        try:
            async with open_instance(**self.options) as instance:
                self.instance = instance
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def stop(self) -> None:
        stop = self._stop
        if stop is not None:
            _loop.token().run_sync_soon(stop.set)
        concurrent.futures.wait([self.done])


_embedded: _Embedded | None = None


def _client(*, start_if_missing: bool) -> Client:
    if _embedded is not None and _embedded.instance is not None:
        return _embedded.instance
    try:
        return Client(current_instance())
    except RayServeException:
        if not start_if_missing:
            raise
    start()
    assert _embedded is not None and _embedded.instance is not None
    return _embedded.instance


def start(
    proxy_location: Any = None,
    http_options: Any = None,
    grpc_options: Any = None,
    logging_config: Any = None,
    *,
    resources: Mapping[str, float] | None = None,
    home: str | None = None,
    **kwargs: Any,
) -> None:
    """Start the embedded instance of this process (nothing if one runs already).

    ``resources`` declares what replicas may use (``{"CPU": 8, "GPU": 1,
    "memory": ..., "my_resource": 2}``); by default the machine's CPUs, GPUs
    and memory. ``home`` is the state dir (default ``$TRIOSERVE_HOME`` or
    ``~/.trioserve``). ``http_options`` (an ``HTTPOptions`` or a dict of its
    fields) says where the HTTP proxy listens, by default
    ``http://127.0.0.1:8000`` (``$TRIOSERVE_DEFAULT_HTTP_PORT`` changes the
    default port); ``proxy_location="Disabled"`` runs no proxy.
    ``logging_config`` (Ray's fields, a dict or a ``LoggingConfig``) is the
    HTTP proxy's, as in Ray Serve (an application's own ``logging_config``
    goes to ``serve.run`` or ``@serve.deployment``); a bad one raises
    ValueError. The Ray Serve argument ``grpc_options`` is accepted for
    compatibility.
    """
    global _embedded
    if kwargs:
        raise TypeError(f"serve.start() got unexpected argument(s): {', '.join(sorted(kwargs))}")
    with _lock:
        if _embedded is not None:
            if (
                resources is not None
                or http_options is not None
                or proxy_location is not None
                or logging_config is not None
            ):
                log.warning(
                    "trioserve is already running in this process; the new options are "
                    "ignored. Call serve.shutdown() first to change them."
                )
            return
        options = http_options_from(http_options, proxy_location)
        checked = None if logging_config is None else check_logging_config(logging_config)
        _embedded = _Embedded(
            {
                "home": home,
                "resources": resources,
                "http_options": options,
                "logging_config": checked,
            }
        )
        atexit.register(shutdown)


def run(
    target: Application,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: Mapping[str, Any] | None = None,
    _local_testing_mode: bool = False,
) -> DeploymentHandle:
    """Run an application and return a handle to its ingress deployment.

    Starts the embedded instance if none runs, deploys ``target`` as the
    application ``name`` (replacing one of that name in place), waits until
    it is RUNNING and returns the handle. Raises
    :class:`~trioserve.exceptions.DeployFailedError` with the constructor's
    traceback when it cannot start. With ``blocking=True`` it then serves until
    Ctrl-C and shuts down.
    """
    if _local_testing_mode:
        warn_deprecated(
            "serve.run(_local_testing_mode=True)",
            "serve.run(...): trioserve always runs real replicas, and starts them fast",
        )
    built = build_app(target, name, route_prefix, logging_config=logging_config)
    client = _client(start_if_missing=True)
    _loop.run(client.deploy, built)
    _loop.run(client.wait_running, name)
    handle = DeploymentHandle(built.ingress, name)
    if blocking:
        try:
            sys.stderr.write(f"trioserve: application '{name}' is running; press Ctrl-C to stop.\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("received Ctrl-C; shutting down")
            shutdown()
    return handle


def status() -> ServeStatus:
    """The applications, deployments and replicas of the instance, with statuses and messages.

    An empty :class:`~trioserve.schema.ServeStatus` when nothing runs.
    """
    try:
        client = _client(start_if_missing=False)
    except RayServeException:
        return ServeStatus()
    return _loop.run(client.status)


def delete(name: str, _blocking: bool = True) -> None:
    """Delete the application ``name`` and all its deployments (waits until it is gone)."""
    client = _client(start_if_missing=False)
    _loop.run(functools.partial(client.delete, name, wait=_blocking))


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of the application ``name``.

    Raises :class:`~trioserve.exceptions.RayServeException` if it does not exist.
    """
    client = _client(start_if_missing=False)
    return _loop.run(client.get_app_handle, name)


def get_deployment_handle(
    deployment_name: str, app_name: str | None = None, _check_exists: bool = True
) -> DeploymentHandle:
    """A handle to a deployment by name; ``app_name`` defaults to the calling replica's app."""
    client = _client(start_if_missing=False)
    if not _check_exists and app_name is not None:
        return DeploymentHandle(deployment_name, app_name)
    return _loop.run(client.get_deployment_handle, deployment_name, app_name)


def shutdown() -> None:
    """Stop the embedded instance: every replica is drained and stopped.

    Nothing happens when no instance runs in this process.
    """
    global _embedded
    with _lock:
        embedded, _embedded = _embedded, None
    if embedded is None:
        log.info("Nothing to shut down: no trioserve instance runs in this process.")
        return
    atexit.unregister(shutdown)
    embedded.stop()
