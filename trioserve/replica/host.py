"""The user object inside a replica, and the RPC methods that reach it.

A :class:`ReplicaHost` constructs the user's class (or wraps the user's
function), admits at most ``max_ongoing_requests`` calls at once and rejects
the rest with :class:`~trioserve.exceptions.ReplicaRejected` so that the caller
can go elsewhere, runs coroutines on the replica's event loop and sync methods
in worker threads, and knows how to check health, reconfigure and drain.

Its :meth:`~ReplicaHost.rpc_methods` are what the replica's RPC server serves:

``handle_request(meta, args, kwargs)``
    call ``meta["method"]`` of the user object; with ``stream`` RPC, iterate
    over the generator it returns
``check_health()``
    the user's ``check_health`` if defined; returns the replica's stats
``reconfigure(config)``
    apply a new :class:`~trioserve.core.config.DeploymentConfig` in place and
    call the user's ``reconfigure(user_config)`` when ``user_config`` changed
``drain()``
    stop admitting calls, wait for those in flight (at most
    ``graceful_shutdown_timeout_s``), then call the user's ``__del__``
``handle_asgi(inbox, meta, scope)``
    one HTTP request or WebSocket from the proxy: the ASGI app of the
    deployment (its ``@serve.ingress`` app, or :func:`~trioserve.replica.asgi.plain_app`
    around ``__call__``) runs on ``scope``, in the call's own task; the inbox
    carries the ASGI ``receive`` messages, and each ``send`` message goes
    back as an item of the stream (after a first ``{"type":
    "trioserve.admitted"}`` when the body is still to come); the final body
    ends the stream in the same frame
``stats()``
    ``{"replica", "ongoing", "accepting", "processed"}``
``metrics()``
    the replica's Prometheus metrics, as exposition text (see
    :mod:`trioserve.replica.metrics`)

When the response start goes out
--------------------------------
``http.response.start`` waits for the first body message, and goes out with
it in one frame, only when the response declares its length
(``content-length``, or a 204 or 304 status, which have no body): such an app
has its body at hand and sends it right away. Any other start (a streaming
response: chunked, server-sent events) goes out at once, on its own, as a
production HTTP server sends its headers: the client of a stream whose first
chunk is slow gets the status and headers without waiting for that chunk.
An app that ends or fails before its body still gets its start sent first.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from trioserve.core import logs, rpc
from trioserve.core.config import DeploymentConfig
from trioserve.core.routing import ADMITTED
from trioserve.exceptions import RayServeException, ReplicaRejected
from trioserve.replica import metrics

__all__ = [
    "ReplicaContext",
    "ReplicaHost",
    "RequestContext",
    "current_replica_app",
    "get_multiplexed_model_id",
    "get_replica_context",
    "load_source",
]

log = logging.getLogger("trioserve.replica")


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What a replica knows about itself (Ray Serve's ``ReplicaContext``)."""

    app_name: str
    deployment: str
    replica_id: str
    servable_object: Any = None

    @property
    def replica_tag(self) -> str:
        """The replica's id (the name older Ray Serve versions used)."""
        return self.replica_id


_context: ReplicaContext | None = None


def get_replica_context() -> ReplicaContext:
    """The context of the replica this code runs in.

    Raises :class:`~trioserve.exceptions.RayServeException` outside a replica,
    as Ray Serve does.
    """
    if _context is None:
        raise RayServeException(
            "`serve.get_replica_context()` may only be called from within a trioserve deployment."
        )
    return _context


def current_replica_app() -> str | None:
    """The application of the replica this code runs in; None outside a replica."""
    return None if _context is None else _context.app_name


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What the replica knows about the request being handled."""

    request_id: str = ""
    multiplexed_model_id: str = ""
    route: str = ""


_NO_REQUEST = RequestContext()
_request: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "trioserve_request",
    default=_NO_REQUEST,
)


def current_request() -> RequestContext:
    """The request being handled (its ``request_id`` is ``""`` outside one)."""
    return _request.get()


def get_multiplexed_model_id() -> str:
    """The model id of the request being handled (``""`` when it names none).

    Set by ``handle.options(multiplexed_model_id=...)``.
    """
    return _request.get().multiplexed_model_id


def load_source(source: str, blob: bytes | None = None) -> Any:
    """The user's class or function named by a deployment's ``source``.

    ``import:module:attr.path`` imports it; ``blob:<digest>`` unpickles
    ``blob`` (shipped with cloudpickle for code defined in ``__main__``). An
    object that wraps the user's code (a ``Deployment``) gives the code it wraps.
    """
    if source.startswith("import:"):
        module_name, _, attr = source[len("import:") :].partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    elif source.startswith("blob:"):
        if blob is None:
            raise ValueError(f"the code blob of {source} is missing from the event log")
        import cloudpickle

        target = cloudpickle.loads(blob)
    else:
        raise ValueError(f"unknown deployment source {source!r}")
    return getattr(target, "func_or_class", target)


class ReplicaHost:
    """Hosts one user object; see the module docstring for its RPC methods."""

    def __init__(
        self,
        replica_id: str,
        app: str,
        deployment: str,
        config: DeploymentConfig,
    ) -> None:
        self.replica_id = replica_id
        self.app = app
        self.deployment = deployment
        self.config = config
        self.obj: Any = None
        self.is_function = False
        self.ongoing = 0
        self.processed = 0
        self.accepting = True
        self.deleted = False
        self._idle: anyio.Event | None = None
        """Set when ``ongoing`` drops to 0, while :meth:`drain` waits for that."""
        self._threads = anyio.CapacityLimiter(config.max_ongoing_requests)
        self._asgi_app: Any = None
        self._lifespan: Any = None
        self.task_group: anyio.abc.TaskGroup | None = None
        """The replica process's task group (set by the process)."""
        metrics.set_identity(app, deployment, replica_id)
        metrics.set_ongoing(lambda: self.ongoing)

    # ------------------------------------------------------------------ lifecycle

    async def construct(
        self, target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        """Build the user object: instantiate a class (sync constructors in a
        thread, ``async def __init__`` awaited), or wrap a function. Then call
        ``reconfigure(user_config)`` when the deployment has a ``user_config``."""
        global _context
        if inspect.isclass(target):
            init = getattr(target, "__init__", None)
            if inspect.iscoroutinefunction(init):
                obj = target.__new__(target)
                await init(obj, *args, **kwargs)
            else:
                obj = await anyio.to_thread.run_sync(lambda: target(*args, **kwargs))
            self.obj = obj
        elif callable(target):
            self.obj = target
            self.is_function = True
        else:
            raise TypeError(f"a deployment must be a class or a function, got {target!r}")
        _context = ReplicaContext(self.app, self.deployment, self.replica_id, self.obj)
        from trioserve.replica import asgi

        asgi.set_servable(self.obj)
        if self.config.user_config is not None:
            await self._call_user_reconfigure(self.config.user_config)

    @property
    def asgi_app(self) -> Any:
        """The ASGI app HTTP requests run: the ``@serve.ingress`` app (with its
        lifespan state), or one around ``__call__``."""
        if self._asgi_app is None:
            from trioserve.replica import asgi

            ingress = getattr(type(self.obj), "__trioserve_asgi_app__", None)
            if ingress is not None and not self.is_function:
                self._asgi_app = ingress
            else:
                fn = self._method("__call__")
                call: Callable[[tuple[Any, ...]], Awaitable[Any]]
                if inspect.iscoroutinefunction(fn):

                    async def call(args: tuple[Any, ...]) -> Any:
                        return await fn(*args)  # what _invoke does, decided once
                else:

                    async def call(args: tuple[Any, ...]) -> Any:
                        return await self._invoke(fn, args, {})

                self._asgi_app = asgi.plain_app(
                    call, takes_request=_takes_argument(fn), deployment=self.deployment
                )
        return self._asgi_app

    async def start_lifespan(self, task_group: anyio.abc.TaskGroup) -> None:
        """Run the ``@serve.ingress`` app's ASGI lifespan startup (its task in ``task_group``).

        A deployment without ``@serve.ingress`` has no lifespan. A startup
        that fails raises, as a failing constructor does; the shutdown runs
        when the replica drains, before the user's ``__del__``.
        """
        from trioserve.replica import asgi

        ingress = getattr(type(self.obj), "__trioserve_asgi_app__", None)
        if ingress is None or self.is_function:
            return
        lifespan = asgi.Lifespan(ingress)
        await lifespan.startup(task_group)
        self._lifespan = lifespan
        self._asgi_app = lifespan.app_with_state()

    async def _call_user_reconfigure(self, user_config: Any) -> None:
        fn = None if self.is_function else getattr(self.obj, "reconfigure", None)
        if fn is None:
            raise TypeError(
                f"deployment {self.deployment!r} has a user_config, so it must be a class "
                "that defines reconfigure(self, user_config)"
            )
        await self._invoke(fn, (user_config,), {}, control=True)

    async def _invoke(
        self, fn: Callable[..., Any], args: Any, kwargs: Any, *, control: bool = False
    ) -> Any:
        """Await a coroutine function, run a sync one in a worker thread.

        Requests share ``max_ongoing_requests`` threads; ``control`` calls (the
        user's ``check_health``, ``reconfigure``, ``__del__``) do not, so that
        they never wait for busy requests to finish.
        """
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        limiter = None if control else self._threads
        result = await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=limiter)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _method(self, name: str) -> Callable[..., Any]:
        if self.is_function:
            if name != "__call__":
                raise AttributeError(
                    f"deployment {self.deployment!r} is a function; it has no method {name!r}"
                )
            return self.obj  # type: ignore[no-any-return]
        fn = getattr(self.obj, name, None)
        if not callable(fn) or (name.startswith("_") and name != "__call__"):
            raise AttributeError(f"deployment {self.deployment!r} has no method {name!r}")
        return fn  # type: ignore[no-any-return]

    def _admit(self, meta: Mapping[str, Any]) -> _Admission:
        """Count one request in (``with``), or raise :class:`ReplicaRejected`."""
        if not self.accepting:
            raise ReplicaRejected(f"replica {self.replica_id} is draining")
        if self.ongoing >= self.config.max_ongoing_requests:
            raise ReplicaRejected(
                f"replica {self.replica_id} is at max_ongoing_requests="
                f"{self.config.max_ongoing_requests}"
            )
        return _Admission(self, meta)

    # ------------------------------------------------------------------ RPC methods

    def rpc_methods(self) -> dict[str, Callable[..., Any]]:
        return {
            "handle_request": self._logged_request,
            "handle_request_streaming": self._logged_streaming,
            "handle_asgi": self.handle_asgi,
            "check_health": self.check_health,
            "reconfigure": self.reconfigure,
            "drain": self.drain,
            "stats": self.stats,
            "metrics": self.metrics,
        }

    async def _logged_request(
        self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None
    ) -> Any:
        """:meth:`handle_request` with its access line (``CALL method OK 1.0ms``)."""
        if not logs.access_log_enabled():
            return await self.handle_request(meta, args, kwargs)
        started, outcome = time.monotonic(), "ERROR"
        try:
            result = await self.handle_request(meta, args, kwargs)
            outcome = "OK"
            return result
        except ReplicaRejected:
            outcome = ""  # not taken: the caller tries another replica
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "CANCELLED"
            raise
        finally:
            self._access_line(meta, outcome, started)

    async def _logged_streaming(
        self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None
    ) -> AsyncIterator[Any]:
        """:meth:`handle_request_streaming` with its access line."""
        if not logs.access_log_enabled():
            async for item in self.handle_request_streaming(meta, args, kwargs):
                yield item
            return
        started, outcome = time.monotonic(), "ERROR"
        try:
            async for item in self.handle_request_streaming(meta, args, kwargs):
                yield item
            outcome = "OK"
        except ReplicaRejected:
            outcome = ""
            raise
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            outcome = "CANCELLED"
            raise
        finally:
            self._access_line(meta, outcome, started)

    def _access_line(self, meta: Mapping[str, Any], outcome: str, started: float) -> None:
        if not outcome:
            return
        logs.access(
            log,
            "CALL",
            str(meta.get("method", "__call__")),
            outcome,
            (time.monotonic() - started) * 1000,
            request_id=str(meta.get("request_id", "")),
            route=str(meta.get("route") or ""),
        )

    async def handle_request(
        self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None
    ) -> Any:
        """Run one call of the user object; rejected when full or draining."""
        with self._admit(meta):
            fn = self._method(str(meta.get("method", "__call__")))
            _request.set(_request_context(meta))
            result = await self._invoke(fn, args, kwargs or {})
            if inspect.isasyncgen(result) or inspect.isgenerator(result):
                raise TypeError(
                    f"method {meta.get('method', '__call__')!r} of deployment "
                    f"{self.deployment!r} returned a generator, but the call was not made "
                    "with stream=True. Use handle.options(stream=True)."
                )
            return result

    async def handle_request_streaming(
        self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None
    ) -> AsyncIterator[Any]:
        """Iterate over what a generator method yields, one chunk per item."""
        with self._admit(meta):
            fn = self._method(str(meta.get("method", "__call__")))
            _request.set(_request_context(meta))
            if inspect.isasyncgenfunction(fn):
                agen = fn(*args, **(kwargs or {}))
                try:
                    async for item in agen:
                        yield item
                finally:
                    with anyio.CancelScope(shield=True):
                        await agen.aclose()
                return
            result = await self._invoke(fn, args, kwargs or {})
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isgenerator(result):
                done = object()
                while True:
                    item = await anyio.to_thread.run_sync(next, result, done)
                    if item is done:
                        break
                    yield item
            else:
                raise TypeError(
                    f"method {meta.get('method', '__call__')!r} of deployment "
                    f"{self.deployment!r} did not return a generator, but the call was made "
                    "with stream=True."
                )

    @rpc.takes_inbox
    async def handle_asgi(
        self, inbox: rpc.Inbox, meta: Mapping[str, Any], scope: Mapping[str, Any]
    ) -> None:
        """Run the deployment's ASGI app on one request from the proxy (see the module doc).

        ``meta["request"]``, when given, is the request's first ASGI message,
        sent with the call; with ``meta["complete"]`` it holds the whole body,
        and the replica starts with the app's answer instead of
        :data:`~trioserve.core.routing.ADMITTED`.

        The app runs in this call's task and its ``send`` messages go to the
        proxy as it sends them (see :class:`_Exchange`): the final body ends
        the stream in the same frame (``LAST``). Cancelling the call (the
        client left) cancels the app. An app that fails before its response
        is complete fails the call: the proxy answers 500, or cuts a response
        already started. Once the response is complete the app may go on
        (background tasks): the request counts as ongoing until it returns,
        and an error it raises then is logged.
        """
        with self._admit(meta) as admission:
            _request.set(_request_context(meta))
            if not meta.get("complete"):
                await inbox.send(ADMITTED)
            exchange = _Exchange(inbox, meta.get("request"), scope.get("type"))
            started = time.monotonic()
            try:
                await self.asgi_app(dict(scope), exchange.receive, exchange.send)
                if not exchange.answered:
                    await exchange.flush()  # an app that ended without a whole response
            except Exception as exc:
                if not exchange.answered:
                    await exchange.flush()
                    raise
                log.error("the app failed after its response was sent", exc_info=exc)
            finally:
                admission.failed = exchange.status >= 500
                if logs.access_log_enabled():
                    logs.access(
                        log,
                        str(scope.get("method", "WEBSOCKET")),
                        str(scope.get("path", "")),
                        exchange.status or "cancelled",
                        (time.monotonic() - started) * 1000,
                        request_id=str(meta.get("request_id", "")),
                        route=str(meta.get("route") or ""),
                    )

    async def check_health(self) -> dict[str, Any]:
        """Call the user's ``check_health``; an exception means unhealthy."""
        fn = None if self.is_function else getattr(self.obj, "check_health", None)
        if fn is not None:
            await self._invoke(fn, (), {}, control=True)
        return self.stats()

    async def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply a config that differs only in the in-place fields."""
        new = DeploymentConfig.from_dict(config)
        old = self.config
        if new.user_config != old.user_config and new.user_config is not None:
            # The user's reconfigure first: if it raises, the old config stays.
            await self._call_user_reconfigure(new.user_config)
        self.config = new
        self._threads.total_tokens = new.max_ongoing_requests
        if new.logging_config != old.logging_config:
            logs.apply_logging_config(new.logging_config)
        log.info("reconfigured: %s", _changed(old, new))

    async def drain(self) -> dict[str, Any]:
        """Stop admitting calls, wait for in-flight ones, then delete the user object.

        Waits at most ``graceful_shutdown_timeout_s``; new calls are rejected
        from the start, so callers retry them on other replicas at once.
        Returns the stats at the end, with ``timed_out`` telling whether calls
        were still in flight.
        """
        self.accepting = False
        started = time.monotonic()
        log.info("draining: %d call(s) in flight", self.ongoing)
        with anyio.move_on_after(self.config.graceful_shutdown_timeout_s):
            while self.ongoing:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()
        timed_out = self.ongoing > 0
        if timed_out:
            log.warning(
                "drain timed out after %.1f s with %d call(s) in flight",
                time.monotonic() - started,
                self.ongoing,
            )
        await self.delete()
        return {**self.stats(), "timed_out": timed_out}

    async def delete(self) -> None:
        """Call the user's ``__del__`` once (errors are logged, not raised)."""
        if self.deleted or self.obj is None or self.is_function:
            self.deleted = True
            return
        self.deleted = True
        if self._lifespan is not None:
            try:
                with anyio.move_on_after(self.config.graceful_shutdown_timeout_s) as timer:
                    await self._lifespan.shutdown()
                if timer.cancelled_caught:
                    log.warning(
                        "the ASGI lifespan shutdown of the ingress app did not finish within "
                        "graceful_shutdown_timeout_s=%s",
                        self.config.graceful_shutdown_timeout_s,
                    )
            except Exception:
                log.exception("the ASGI lifespan shutdown of the ingress app failed")
        fn = getattr(type(self.obj), "__del__", None)
        if fn is None:
            return
        try:
            await self._invoke(fn.__get__(self.obj), (), {}, control=True)
        except Exception:
            log.exception("the deployment's __del__ raised")

    async def metrics(self) -> str:
        """This replica's metrics, in the Prometheus text format (see
        :mod:`trioserve.replica.metrics`)."""
        return metrics.exposition()

    def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "ongoing": self.ongoing,
            "accepting": self.accepting,
            "processed": self.processed,
        }


class _Exchange:
    """The ASGI ``receive`` and ``send`` of one request run by :meth:`ReplicaHost.handle_asgi`.

    ``receive`` gives the request's first message (sent with the call), then
    what comes through the inbox, then a disconnect once the call is over
    or the response is complete (as ASGI servers do).

    ``send`` pushes each message to the proxy as one item of the stream,
    waiting for the stream's credit; response headers go as lists, which
    msgpack packs natively (a tuple costs a nested pack). A response start
    is held for its first body only when the response declares its length
    (see the module docstring).
    """

    __slots__ = ("answered", "closed", "held", "inbox", "kind", "pending", "status")

    def __init__(self, inbox: rpc.Inbox, first: Any, kind: Any) -> None:
        self.inbox = inbox
        self.kind = kind
        self.pending = first
        """The request's first message, until the app receives it."""
        self.closed = False
        self.held: dict[str, Any] | None = None
        """A response start waiting for its first body message."""
        self.status = 0
        """The response's status (101 for an accepted WebSocket); 0 before it starts."""
        self.answered = False
        """The whole response went out (the stream has ended)."""

    async def receive(self) -> Any:
        first = self.pending
        if first is not None:
            self.pending = None
            return first
        if not self.closed:
            try:
                return await self.inbox.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self.closed = True
        return {
            "type": "websocket.disconnect" if self.kind == "websocket" else "http.disconnect",
            "code": 1006,
        }

    async def send(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        held = self.held
        if held is not None:
            self.held = None
            if kind == "http.response.body":
                await self._body([held, message], message)
                return
            await self.inbox.send(held)
        if self.answered:
            raise RuntimeError(f"the app sent {kind!r} after its response was complete")
        if kind == "http.response.start":
            start, hold = _response_start(message)
            self.status = int(start.get("status", 200))
            if hold:
                self.held = start
                return
            await self.inbox.send(start)
        elif kind == "http.response.body":
            await self._body(message, message)
        else:
            if kind == "websocket.accept":
                self.status = 101
            await self.inbox.send(message)

    async def _body(self, item: Any, body: Mapping[str, Any]) -> None:
        if body.get("more_body", False):
            await self.inbox.send(item)
        else:
            self.answered = True
            await self.inbox.send_last(item)  # the body and the end of the stream, in one frame

    async def flush(self) -> None:
        """Send a response start still held (the app ended or failed before its body)."""
        held = self.held
        if held is not None:
            self.held = None
            await self.inbox.send(held)


def _response_start(message: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``http.response.start`` with its headers as lists, and whether to hold it for its body."""
    headers = []
    hold = message.get("status", 200) in (204, 304)
    for name, value in message.get("headers") or ():
        headers.append([name, value])
        if not hold and name.lower() == b"content-length":
            hold = True
    return {**message, "headers": headers}, hold


class _Admission:
    """One admitted request, counted in ``ongoing`` while its ``with`` block runs.

    ``failed`` tells the replica's metrics whether it failed: set when the
    block raises, or by the block itself.
    """

    __slots__ = ("failed", "host", "meta", "started")

    def __init__(self, host: ReplicaHost, meta: Mapping[str, Any]) -> None:
        self.host = host
        self.meta = meta
        self.failed = False
        self.started = 0.0

    def __enter__(self) -> _Admission:
        self.host.ongoing += 1
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, Exception):
            self.failed = True
        host = self.host
        host.ongoing -= 1
        host.processed += 1
        if host.ongoing == 0 and host._idle is not None:
            host._idle.set()
            host._idle = None
        meta = self.meta
        metrics.request_done(
            str(meta.get("route") or ""),
            str(meta.get("method") or "__call__"),
            self.failed,
            time.monotonic() - self.started,
        )


def _takes_argument(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (a bound ``__call__``, or a function) takes a positional argument."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


def _request_context(meta: Mapping[str, Any]) -> RequestContext:
    return RequestContext(
        request_id=str(meta.get("request_id", "")),
        multiplexed_model_id=str(meta.get("multiplexed_model_id", "")),
        route=str(meta.get("route") or ""),
    )


def _changed(old: DeploymentConfig, new: DeploymentConfig) -> str:
    a, b = old.to_dict(), new.to_dict()
    names = [k for k in b if a.get(k) != b[k]]
    return ", ".join(names) or "nothing"
