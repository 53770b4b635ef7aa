"""The proxy's ASGI app: routes HTTP requests and WebSockets to ingress replicas.

:class:`ProxyApp` is an ASGI application that hypercorn serves (see
:mod:`trioserve.proxy.process`). It knows the route table the controller
publishes (``{route_prefix: {"app", "ingress"}}``) and, per request:

1. answers the proxy's own paths: ``/-/routes`` (JSON ``{prefix: app}``) and
   ``/-/healthz`` (``success``), both 503 until some application is exposed
   or while the proxy drains, as Ray Serve's proxy answers; and
   ``/-/metrics``, the Prometheus metrics of the proxy and of every replica
   (see :mod:`trioserve.proxy.metrics`);
2. picks the application by the longest ``route_prefix`` that matches the
   path (exactly, or followed by ``/``), else answers 404 naming
   ``/-/routes``;
3. sends the ASGI scope, with ``root_path`` extended by the prefix, to a
   replica of the ingress deployment through :meth:`Router.channel`, relays
   the client's ``receive`` messages to it as they arrive and its ``send``
   messages back, chunk by chunk;
4. maps failures to status codes while no response has started: back
   pressure and no running replica 503, ``request_timeout_s`` 408, a replica
   that died 500, a body over ``max_request_body_bytes`` 413. A client that
   disconnects cancels the request in the replica.

A request whose body came whole with its first message (a GET, a small POST)
takes the *whole-request path*: one cancel scope and no task of its own. The
proxy's watchdog (:meth:`ProxyApp.watch`, one task for all requests) enforces
``request_timeout_s`` on it, and starts watching its client for a disconnect
once it has been in flight for :data:`WATCH_TICK_S`: a request answered
sooner costs no watcher at all. Other requests (a body in pieces, WebSockets)
take the general path, with a task that relays the body as it arrives.

Every request carries an ``x-request-id``: the client's, or a new one; it is
returned in the response and is the request id the replica logs.

The app is written with anyio and runs under either of hypercorn's workers.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

import anyio
import anyio.abc

from trioserve.core import logs
from trioserve.core.config import HTTPOptions
from trioserve.core.eventloop import running_loop
from trioserve.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trioserve.core.routing import Channel, Router
from trioserve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
)
from trioserve.proxy.metrics import ProxyMetrics

__all__ = ["ProxyApp", "http_date", "match_route"]

log = logging.getLogger("trioserve.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CANCELLED = "cancelled"
"""What the access log says of a request whose client left before the response ended
(the replica's log line says the same)."""
NO_REPLICA_WAIT_S = 5.0
"""How long a request waits for the replica set of an ingress deployment the
proxy has not routed to before (it asks the controller on first use)."""
SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
    "subprotocols",
)
"""The parts of the ASGI scope a replica gets (the rest is the server's own)."""
MODEL_ID_HEADER = b"serve_multiplexed_model_id"
"""The request header that names the multiplexed model a request is for (Ray Serve's)."""
WANTED_HEADERS = frozenset({b"content-length", b"x-request-id", MODEL_ID_HEADER})
"""The request headers the proxy reads itself."""
WATCH_TICK_S = 0.05
"""How often the watchdog looks at the requests on the whole-request path: a
timeout is noticed at most this late, and a request still in flight after
this long gets a task that watches its client for a disconnect."""


def match_route(routes: Mapping[str, Any], path: str) -> str | None:
    """The longest ``route_prefix`` of ``routes`` that ``path`` falls under, if any.

    A prefix matches the path itself and anything below it (``/a`` matches
    ``/a`` and ``/a/b``, not ``/ab``); ``/`` matches every path.
    """
    best: str | None = None
    for prefix in routes:
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


class _TooLarge(Exception):
    pass


class ProxyApp:
    """The ASGI app; ``router_for(app, deployment)`` gives the router of a deployment."""

    def __init__(
        self,
        router_for: Callable[[str, str], Router],
        options: HTTPOptions,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.router_for = router_for
        self.options = options
        self.metrics = metrics or ProxyMetrics()
        self.routes: dict[str, Mapping[str, str]] = {}
        self.routes_known = False
        self.draining = False
        self._inflight: dict[int, _Whole] = {}
        """Requests on the whole-request path, by ``id()``."""
        self._watchdog: anyio.abc.TaskGroup | None = None
        self._wake: anyio.Event | None = None
        self._clock: Callable[[], float] = anyio.current_time
        """The event loop's clock: on asyncio its own (0.07 against 1.3 µs for anyio's)."""
        self._new_scope: Callable[[], _Scope] = anyio.CancelScope
        """Makes a whole-path request's cancel scope (:class:`_TaskScope` on asyncio)."""

    async def watch(self) -> None:
        """Run the watchdog of the whole-request path until cancelled.

        While it runs, requests whose body came whole take that path (see the
        module docstring); before, and in a bare ASGI server that does not run
        it, every request takes the general path.
        """
        async with anyio.create_task_group() as tg:
            library, loop = running_loop()
            if library == "asyncio":  # on trio, anyio's scope is trio's own
                self._clock = loop.time
                self._new_scope = _TaskScope
            self._watchdog = tg
            try:
                while True:
                    if not self._inflight:
                        self._wake = anyio.Event()
                        await self._wake.wait()
                        self._wake = None
                    await anyio.sleep(WATCH_TICK_S)
                    now = self._clock()
                    for entry in list(self._inflight.values()):
                        if entry.deadline <= now and not entry.timed_out:
                            entry.timed_out = True
                            entry.scope.cancel()
                        elif entry.watcher is None and now - entry.started >= WATCH_TICK_S:
                            entry.watcher = anyio.CancelScope()
                            tg.start_soon(_watch_client, entry)
            finally:
                self._watchdog = None
                tg.cancel_scope.cancel()

    def update_routes(self, value: Mapping[str, Any] | None) -> None:
        """Take the route table the controller published, and follow the replica
        sets of its ingress deployments from now on: if the controller goes away,
        the proxy still knows where every route's replicas are."""
        self.routes = dict(value or {})
        self.routes_known = True
        for route in self.routes.values():
            self.router_for(route["app"], route["ingress"])

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            return
        path = scope.get("path", "/")
        if kind == "http" and path in ("/-/routes", "/-/healthz"):
            # As Ray Serve's proxy: not ready until some application is exposed.
            if self.draining:
                await _respond(send, 503, b"This node is being drained.")
            elif not self.routes:
                await _respond(send, 503, b"Route table is not populated yet.")
            elif path == "/-/healthz":
                await _respond(send, 200, b"success")
            else:
                table = {prefix: r["app"] for prefix, r in sorted(self.routes.items())}
                await _respond(send, 200, json.dumps(table).encode(), "application/json")
            return
        if kind == "http" and path == "/-/metrics":
            scoped = b"scope=proxy" in bytes(scope.get("query_string") or b"")
            body = self.metrics.own() if scoped else await self.metrics.scrape()
            await _respond(send, 200, body, METRICS_CONTENT_TYPE)
            return
        found = _wanted_headers(scope)
        request_id = found.get(b"x-request-id") or os.urandom(16).hex()
        method = scope.get("method", "WEBSOCKET")
        started = time.monotonic()
        if not self.routes_known:
            await self._refuse(scope, send, 503, "Route table is not populated yet.", request_id)
            self.metrics.observe("", "", "", method, 503, time.monotonic() - started)
            return
        prefix = match_route(self.routes, path)
        if prefix is None:
            await self._refuse(
                scope,
                send,
                404,
                f"Path '{path}' not found. Ping http://.../-/routes for available routes.",
                request_id,
            )
            self.metrics.observe("", "", "", method, 404, time.monotonic() - started)
            return
        route = self.routes[prefix]
        status: int | str = 500  # if the response fails after it started
        self.metrics.ongoing += 1
        try:
            status = await self._forward(scope, receive, send, prefix, route, request_id, found)
        finally:
            self.metrics.ongoing -= 1
            self.metrics.observe(
                prefix, route["app"], route["ingress"], method, status, time.monotonic() - started
            )
        if logs.access_log_enabled():
            latency_ms = (time.monotonic() - started) * 1000
            logs.access_line(
                log,
                "%s %s %s -> %s/%s %s %.1fms",
                (request_id, method, path, route["app"], route["ingress"], status, latency_ms),
                {
                    "request_id": request_id,
                    "application": route["app"],
                    "deployment": route["ingress"],
                    "route": prefix,
                    "method": method,
                    "status": status,
                    "latency_ms": round(latency_ms, 3),
                },
            )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        prefix: str,
        route: Mapping[str, str],
        request_id: str,
        found: Mapping[bytes, str],
    ) -> int | str:
        """Relay one request to a replica; returns the status sent (0 if none), or
        :data:`CANCELLED`. ``found`` holds the request's :data:`WANTED_HEADERS`."""
        declared = found.get(b"content-length")
        limit = self.options.max_request_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(
                scope, send, 413, f"Request body over the limit of {limit} bytes.", request_id
            )
        router = self.router_for(route["app"], route["ingress"])
        if not router.known:
            with anyio.move_on_after(NO_REPLICA_WAIT_S):
                while not router.known:  # a route just added: its replica set is on its way
                    await anyio.sleep(0.01)
        if not router.known or (
            router.exists and not router.replicas and not router.failed and not router.autoscaling
        ):
            return await self._refuse(
                scope,
                send,
                503,
                f"No running replica of deployment '{route['ingress']}' in application "
                f"'{route['app']}'.",
                request_id,
            )
        out_scope = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        for key in ("client", "server"):  # lists, as ASGI allows: msgpack packs them natively
            if out_scope.get(key) is not None:
                out_scope[key] = list(out_scope[key])
        base = self.options.root_path + scope.get("root_path", "")
        if base:  # behind a reverse proxy that strips `base`: the app sees the full path
            path = scope.get("path", "/")
            out_scope["path"] = base + path
            out_scope["raw_path"] = base.encode() + bytes(scope.get("raw_path") or path.encode())
        out_scope["root_path"] = base + ("" if prefix == "/" else prefix)
        headers = [list(h) for h in scope.get("headers", ())]
        if b"x-request-id" not in found:
            headers.append([b"x-request-id", request_id.encode()])
        out_scope["headers"] = headers
        meta: dict[str, Any] = {"request_id": request_id, "method": "__call__", "route": prefix}
        model_id = found.get(MODEL_ID_HEADER)
        if model_id:  # routed to replicas that hold the model; serve.get_multiplexed_model_id()
            meta["multiplexed_model_id"] = model_id
        state = _Relay(send, request_id, scope["type"])
        timeout = self.options.request_timeout_s
        received = 0
        if scope["type"] == "http":
            # The first body message goes with the call; a whole body (a GET, a
            # small POST) lets the replica answer at once, in one round trip.
            try:
                if timeout is None:
                    first = await receive()
                else:
                    with anyio.fail_after(timeout):
                        first = await receive()
            except TimeoutError:
                text = f"Request {request_id} timed out after {timeout}s."
                return await self._refuse(scope, send, 408, text, request_id)
            if first["type"] != "http.request":
                log.info("%s: the client disconnected; the request was cancelled", request_id)
                return CANCELLED
            received = len(first.get("body", b""))
            if received > limit:
                return await self._refuse(
                    scope, send, 413, f"Request body over the limit of {limit} bytes.", request_id
                )
            meta["request"] = dict(first)
            meta["complete"] = not first.get("more_body", False)
        complete = bool(meta.get("complete"))
        if complete and self._watchdog is not None:
            return await self._forward_whole(router, meta, out_scope, receive, state, scope)
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:

                    async def pump(channel: Channel | None) -> None:
                        """Relay the rest of the body, and a disconnect, to the replica."""
                        nonlocal received
                        while True:
                            message = await receive()
                            if message["type"] == "http.request":
                                received += len(message.get("body", b""))
                                if received > limit:
                                    raise _TooLarge
                            if channel is not None:
                                await channel.send(dict(message))
                            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                                # After the whole response, a disconnect is the
                                # normal end: background tasks in the app go on.
                                if scope["type"] == "http" and not state.finished:
                                    state.client_gone = True
                                    tg.cancel_scope.cancel()
                                return

                    if complete:
                        # Only a disconnect can come now: watch for it while the
                        # replica works, so that leaving cancels the work.
                        tg.start_soon(pump, None)
                    async with router.channel(meta, out_scope) as channel:
                        if not complete:
                            tg.start_soon(pump, channel)
                        await state.relay(channel)
                    tg.cancel_scope.cancel()
        except Exception as raised:
            return await self._failed(raised, state, scope)
        if state.client_gone and not state.finished:
            log.info("%s: the client disconnected; the request was cancelled", request_id)
            return CANCELLED
        return state.status

    async def _forward_whole(
        self,
        router: Router,
        meta: Mapping[str, Any],
        out_scope: Scope,
        receive: Receive,
        state: _Relay,
        scope: Scope,
    ) -> int | str:
        """The whole-request path: the request is all in ``meta``; relay the answer."""
        timeout = self.options.request_timeout_s
        now = self._clock()
        entry = _Whole(
            receive,
            state,
            self._new_scope(),
            now,
            now + timeout if timeout is not None else _NEVER,
        )
        key = id(entry)
        self._inflight[key] = entry
        if self._wake is not None:
            self._wake.set()
        try:
            with entry.scope:
                async with router.channel(meta, out_scope) as channel:
                    await state.relay(channel)
        except Exception as raised:
            return await self._failed(raised, state, scope)
        finally:
            del self._inflight[key]
            if entry.watcher is not None:
                entry.watcher.cancel()
        if entry.timed_out and not state.finished:
            text = f"Request {state.request_id} timed out after {timeout}s."
            return await self._fail(state, scope, 408, text)
        if state.client_gone and not state.finished:
            log.info("%s: the client disconnected; the request was cancelled", state.request_id)
            return CANCELLED
        return state.status

    async def _failed(self, raised: BaseException, state: _Relay, scope: Scope) -> int | str:
        """Answer the error a request failed with (see :meth:`_fail`)."""
        request_id = state.request_id
        error = _unwrap(raised)
        if isinstance(error, TimeoutError):
            timeout = self.options.request_timeout_s
            status, text = 408, f"Request {request_id} timed out after {timeout}s."
        elif isinstance(error, _TooLarge):
            limit = self.options.max_request_body_bytes
            status, text = 413, f"Request body over the limit of {limit} bytes."
        elif isinstance(error, (BackPressureError, DeploymentUnavailableError)):
            status, text = 503, str(error)
        elif isinstance(error, ReplicaDiedError):
            log.warning("%s: %s", request_id, error)
            status, text = 500, str(error)
        else:
            log.error("%s: the request failed", request_id, exc_info=error)
            status, text = 500, f"Internal Server Error (request {request_id})."
        return await self._fail(state, scope, status, text)

    async def _refuse(
        self, scope: Scope, send: Send, status: int, text: str, request_id: str
    ) -> int:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})
            return status
        await _respond(send, status, text.encode(), request_id=request_id)
        return status

    async def _fail(self, state: _Relay, scope: Scope, status: int, text: str) -> int | str:
        """Answer ``status`` if nothing was sent yet; else end the response early."""
        if state.client_gone:
            return CANCELLED
        if not state.started:
            return await self._refuse(scope, state.raw_send, status, text, state.request_id)
        log.warning("%s: %s after the response started; closing it", state.request_id, text)
        raise _Abort(text)


class _Abort(Exception):
    """A response failed after it started: the server drops the connection."""


_NEVER = float("inf")


class _Whole:
    """A request on the whole-request path, as the watchdog sees it."""

    __slots__ = ("deadline", "receive", "relay", "scope", "started", "timed_out", "watcher")

    def __init__(
        self, receive: Receive, relay: _Relay, scope: _Scope, started: float, deadline: float
    ) -> None:
        self.receive = receive
        self.relay = relay
        self.started = started
        self.deadline = deadline
        self.scope = scope
        """Cancelled when the request times out or its client leaves."""
        self.timed_out = False
        self.watcher: anyio.CancelScope | None = None
        """The scope of the task that watches the client, once there is one."""


class _Scope(Protocol):
    """A cancel scope as the whole-request path uses it."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> bool | None: ...

    def cancel(self) -> Any: ...


class _TaskScope:
    """``anyio.CancelScope`` as the whole-request path needs it, on asyncio, at a
    sixth of the cost (about 0.9 against 5.2 µs to enter and leave).

    :meth:`cancel` cancels the task inside the block, which then ends
    quietly; a cancellation from elsewhere (the server stopping) still goes
    on. It must be called from another task (the watchdog, a client
    watcher), as here: then the cancellation lands inside the block, where
    the task waits.
    """

    __slots__ = ("_called", "_task")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._called = False

    def __enter__(self) -> _TaskScope:
        self._task = asyncio.current_task()
        if self._called and self._task is not None:
            self._task.cancel()
        return self

    def cancel(self) -> None:
        if not self._called:
            self._called = True
            if self._task is not None:
                self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        task, self._task = self._task, None
        if not self._called or task is None:
            return False
        # Ours was the task's one cancellation: it ends here, quietly.
        ours_only = task.uncancel() == 0
        return ours_only and exc_type is not None and issubclass(exc_type, asyncio.CancelledError)


async def _watch_client(entry: _Whole) -> None:
    """Cancel ``entry`` when its client disconnects before the response ended."""
    assert entry.watcher is not None
    with entry.watcher:
        while True:
            message = await entry.receive()
            if message.get("type") == "http.disconnect":
                if not entry.relay.finished:
                    entry.relay.client_gone = True
                    entry.scope.cancel()
                return


class _Relay:
    """The replica's messages on their way to the client, and what was seen of them."""

    def __init__(self, send: Send, request_id: str, kind: str) -> None:
        self.raw_send = send
        self.request_id = request_id
        self.kind = kind
        self.started = False
        self.finished = False
        self.client_gone = False
        self.status = 0

    async def relay(self, channel: Channel) -> None:
        """Send on every reply of ``channel``, in order (a list: start and body, in one frame)."""
        async for item in channel:
            if isinstance(item, list):
                for message in item:
                    await self.send(message)
            else:
                await self.send(item)

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            # The message came off the wire: this relay owns it and its headers.
            headers = message.get("headers")
            if not isinstance(headers, list):
                headers = message["headers"] = [list(h) for h in headers or ()]
            names = {bytes(k).lower() for k, _ in headers}
            if b"x-request-id" not in names:
                headers.append([b"x-request-id", self.request_id.encode()])
            if b"date" not in names:
                headers.append([b"date", http_date()])
            self.status = int(message.get("status", 200))
            self.started = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        elif kind == "websocket.accept":
            self.started = True
            self.status = 101
        elif kind == "websocket.close":
            self.finished = True
            if not self.started:
                self.status = 403
        await self.raw_send(message)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    request_id: str | None = None,
) -> None:
    headers = [
        [b"content-type", content_type.encode()],
        [b"content-length", str(len(body)).encode()],
    ]
    if request_id is not None:
        headers.append([b"x-request-id", request_id.encode()])
    headers.append([b"date", http_date()])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The ``date`` header's value now (RFC 9110, ``Thu, 03 Dec 2026 06:20:00 GMT``),
    formatted once a second: hypercorn's own formats it for every response."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
    return _date[1]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _unwrap(error: BaseException) -> BaseException:
    """The exception inside (nested) groups when they hold one kind only, else the group."""
    leaves: list[BaseException] = []
    pending = [error]
    while pending:
        e = pending.pop()
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        else:
            leaves.append(e)
    if leaves and all(type(e) is type(leaves[0]) for e in leaves):
        return leaves[0]
    return error


def _wanted_headers(scope: Scope) -> dict[bytes, str]:
    """The request's :data:`WANTED_HEADERS` that it has (the first of each), in one pass."""
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):  # names are lowercase bytes in ASGI
        if name in WANTED_HEADERS and name not in found:
            found[bytes(name)] = bytes(value).decode("latin-1")
    return found
