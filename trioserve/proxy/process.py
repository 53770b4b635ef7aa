"""The proxy process: ``python -m trioserve.proxy --controller ADDR --options JSON ...``.

Started by the controller through a launcher, never by hand. In order, it:

1. binds the HTTP socket itself (``host``/``port`` of ``HTTPOptions``; port 0
   picks a free one), so that a port already taken is reported as such:
   ``proxy_start_failed`` to the controller, then exit code 1;
2. subscribes to the controller's ``proxy_logging`` (the instance's
   ``logging_config``, applied live: see :func:`_apply_logging_config`) and
   ``routes`` by long-poll, and to the replica sets of the ingress
   deployments as requests need them (the same
   :class:`~trioserve.core.routing.Routers` handles use);
3. serves :class:`~trioserve.proxy.app.ProxyApp` with hypercorn on the
   ``event_loop`` of the options (asyncio with uvloop, or trio), and reports
   ``proxy_ready(pid, url, event_loop)``; after each new route table it
   reports ``proxy_seen(version)``, which is how ``serve.run`` knows the
   application is reachable;
4. on SIGTERM or SIGINT answers ``/-/healthz`` with 503, stops accepting
   connections and lets requests in flight finish (hypercorn's graceful
   timeout), then exits 0. With ``--lifeline-fd`` it also stops when the
   process that started it is gone.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import anyio

from trioserve.core import logs, rpc
from trioserve.core.config import HTTPOptions
from trioserve.core.launcher import asyncio_backend_options, watch_lifeline
from trioserve.core.routing import InstanceAddress, Routers, set_current_instance
from trioserve.proxy.app import ProxyApp
from trioserve.proxy.metrics import ProxyMetrics

__all__ = ["GC_THRESHOLDS", "GRACEFUL_TIMEOUT_S", "LOGGING_CONFIG_ENV", "main"]

log = logging.getLogger("trioserve.proxy")

LOGGING_CONFIG_ENV = "TRIOSERVE_PROXY_LOGGING_CONFIG"
"""The proxy's ``logging_config`` (Ray's fields, as JSON) when the instance has
none (no ``serve.start(logging_config=...)``, no top-level ``logging_config``
in the config file): read from the environment of the controller's process."""

GRACEFUL_TIMEOUT_S = 20.0
"""How long requests in flight may take to finish once the proxy is told to stop."""

GC_THRESHOLDS = (10_000, 10, 10)
"""The proxy's cycle collector runs after this many new objects, not Python's 700:
each request makes a few dozen, and a collection every ~25 requests cost about
4 % of the proxy's time (``docs/performance.md``). The objects of start-up are
frozen out of its sight (``gc.freeze``) as well. Replicas keep Python's
defaults: they run the user's code."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trioserve.proxy")
    p.add_argument("--controller", required=True, help="the controller's RPC address")
    p.add_argument("--secret-file", required=True, help="the instance secret")
    p.add_argument("--options", required=True, help="HTTPOptions as JSON")
    p.add_argument("--lifeline-fd", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the proxy until it is told to stop; exits the process."""
    args = _parse(argv)
    logs.setup("proxy", {}, file_name="proxy.log")
    env_logging = _env_logging_config(os.environ.get(LOGGING_CONFIG_ENV))
    _apply_logging_config(env_logging)
    options = HTTPOptions.from_dict(json.loads(args.options))
    if args.lifeline_fd is not None:
        threading.Thread(
            target=watch_lifeline, args=(args.lifeline_fd, "proxy"), daemon=True
        ).start()
    secret = rpc.load_secret(args.secret_file, create=False)
    code = 0
    try:
        sock = _bind(options)
    except OSError as exc:
        error = f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}"
        log.error("%s", error)
        anyio.run(_report_failure, args.controller, secret, error)
        code = 1
    else:
        try:
            if options.event_loop == "asyncio":
                anyio.run(
                    _run,
                    args.controller,
                    secret,
                    options,
                    sock,
                    env_logging,
                    backend_options=asyncio_backend_options(),
                )
            else:
                anyio.run(_run, args.controller, secret, options, sock, env_logging, backend="trio")
        except KeyboardInterrupt:
            pass
        except BaseException:
            log.exception("the proxy failed")
            code = 1
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _env_logging_config(value: str | None) -> dict[str, Any] | None:
    """The ``logging_config`` (JSON) of :data:`LOGGING_CONFIG_ENV`, if any and valid."""
    if not value:
        return None
    try:
        config = json.loads(value)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return logs.check_logging_config(config)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring %s: %s", LOGGING_CONFIG_ENV, exc)
        return None


def _apply_logging_config(config: Mapping[str, Any] | None) -> None:
    """Make ``config`` the proxy's whole logging config: the fields it leaves out
    go back to their defaults (INFO, TEXT, access lines on, no extra
    attributes, the run folder's file), so a config replacing another takes
    nothing from it."""
    full = dict(config or {})
    if full.get("log_level") is None:
        full["log_level"] = "INFO"
    logs.apply_logging_config(full)


def _bind(options: HTTPOptions) -> socket.socket:
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((options.host, options.port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _url(options: HTTPOptions, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    host = options.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _report_failure(controller: str, secret: bytes, error: str) -> None:
    try:
        with anyio.fail_after(10):
            async with rpc.connect(controller, secret) as ctl:
                await ctl.call("proxy_start_failed", os.getpid(), error)
    except (OSError, rpc.RpcError, TimeoutError) as exc:
        log.warning("cannot tell the controller: %s", exc)


async def _run(
    controller: str,
    secret: bytes,
    options: HTTPOptions,
    sock: socket.socket,
    env_config: dict[str, Any] | None = None,
) -> None:
    from hypercorn.config import Config

    instance = InstanceAddress(controller, secret)
    set_current_instance(instance)
    routers = Routers(instance)
    app = ProxyApp(routers.get, options, ProxyMetrics(routers))
    seen = anyio.Event()
    stop = anyio.Event()

    applied: list[Any] = [env_config]

    def on_logging(value: Any) -> None:
        # None: the instance has no logging_config (any more): the environment's.
        config = dict(value) if isinstance(value, Mapping) else env_config
        if config != applied[0]:
            applied[0] = config
            _apply_logging_config(config)
            log.info("logging_config: %s", json.dumps(config or {}, sort_keys=True))

    def on_routes(value: Any) -> None:
        nonlocal seen
        app.update_routes(value)
        seen.set()
        seen = anyio.Event()

    url = _url(options, sock)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
    config.keep_alive_timeout = options.keep_alive_timeout_s
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.accesslog = None
    config.errorlog = logging.getLogger("trioserve.proxy.hypercorn")
    config.root_path = ""
    # The proxy adds `date` itself, made once a second (ProxyApp); no `server` header.
    config.include_date_header = False
    config.include_server_header = False
    gc.collect()  # start-up's garbage goes; what stays is frozen
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

    async with anyio.create_task_group() as tg:
        await tg.start(routers.run)
        # Before routes: the proxy logs by the instance's config once it routes.
        routers.long_poll.subscribe("proxy_logging", on_logging)
        routers.long_poll.subscribe("routes", on_routes)
        tg.start_soon(_signals, stop, app)
        tg.start_soon(app.watch)
        served = anyio.Event()
        tg.start_soon(_serve, app, config, stop, options.event_loop, served)
        tg.start_soon(_report, controller, secret, url, options.event_loop, routers, lambda: seen)
        log.info("listening at %s (%s loop)", url, options.event_loop)
        await stop.wait()
        # hypercorn stops on `stop` too, and lets requests in flight finish
        # within its graceful timeout; leave once it has.
        with anyio.move_on_after(GRACEFUL_TIMEOUT_S + 5):
            await served.wait()
        tg.cancel_scope.cancel()


async def _serve(
    app: ProxyApp, config: Any, stop: anyio.Event, loop: str, served: anyio.Event
) -> None:
    try:
        if loop == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
    finally:
        served.set()


async def _report(
    controller: str,
    secret: bytes,
    url: str,
    loop: str,
    routers: Routers,
    changed: Any,
) -> None:
    """Tell the controller the proxy is ready, then which route table it routes by."""
    ready = False
    while True:
        try:
            async with rpc.connect(controller, secret) as ctl:
                if not ready:
                    await ctl.call("proxy_ready", os.getpid(), url, loop)
                    ready = True
                while True:
                    event = changed()
                    version = routers.long_poll.versions.get("routes", -1)
                    if version > 0:
                        await ctl.call("proxy_seen", version)
                    await event.wait()
        except (OSError, rpc.RpcError, TimeoutError) as exc:
            log.debug("cannot report to the controller: %s", exc)
        await anyio.sleep(0.5)


async def _signals(stop: anyio.Event, app: ProxyApp) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; draining", signal.Signals(signum).name)
            app.draining = True
            stop.set()
