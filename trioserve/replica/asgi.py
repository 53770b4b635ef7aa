"""HTTP inside a replica: the ASGI app a replica serves, and ``@serve.ingress``.

The proxy forwards each HTTP request (or WebSocket) to a replica as an ASGI
scope and ``receive`` messages, and relays the ``send`` messages back. This
module makes the ASGI app the replica runs for them:

:func:`ingress`
    Ray Serve's ``@serve.ingress(app)`` class decorator. It stores the ASGI app
    on the class as ``__trioserve_asgi_app__`` and returns the class itself.
    For a FastAPI app (or ``APIRouter``), the methods of the class registered
    as routes in the class body (``@app.get("/x")`` over ``def f(self, ...)``)
    get ``self`` from a FastAPI dependency that returns the replica's user
    object (:func:`current_servable`, set by the replica with
    :func:`set_servable`). Path, query, body and ``Depends`` parameters,
    ``response_model``, ``status_code``, response classes and WebSocket routes
    work on such methods as on plain functions; so do the app's other routes.
:func:`plain_app`
    The ASGI app of a deployment without ``@serve.ingress``: each HTTP
    request goes to the user's ``__call__`` (with a Starlette ``Request``, or
    with no argument when ``__call__`` takes none) and what it returns goes
    through :func:`to_response`.
:func:`to_response`
    What a ``__call__`` returns, as a Starlette ``Response``, the way Ray Serve
    converts it.
:class:`Lifespan`
    The ASGI lifespan protocol (startup, shutdown) run against an app, as
    uvicorn and hypercorn run it, plus the lifespan state in request scopes.

Promises:

* An exception in a plain deployment's ``__call__`` never reaches the client
  as a traceback: the client gets HTTP 500 with a one-line ``text/plain``
  body naming the exception type and the deployment, and the replica's log
  (``trioserve.replica``) gets the traceback and the request id (the
  ``x-request-id`` header). An ingress app answers errors its own way
  (FastAPI: a bare 500 unless ``debug=True``).
* User code that blocks never runs on the event loop here: a sync generator
  (or other iterator) returned by ``__call__`` is iterated in worker threads.
  (Running ``__call__`` itself is the replica's business, through ``call``.)
* FastAPI is imported only when the app handed to :func:`ingress` is one, or
  when a value needs FastAPI's ``jsonable_encoder``; a Starlette app or a bare
  ASGI callable works without FastAPI installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trioserve.exceptions import RayServeException

__all__ = [
    "ASGI_APP_ATTR",
    "Lifespan",
    "current_servable",
    "ingress",
    "plain_app",
    "set_servable",
    "to_response",
]

log = logging.getLogger("trioserve.replica")

ASGI_APP_ATTR: Final = "__trioserve_asgi_app__"
"""The class attribute where :func:`ingress` stores the ASGI app."""

WEBSOCKET_POLICY_VIOLATION: Final = 1008
"""The close code a plain deployment answers a WebSocket with."""

_C = TypeVar("_C", bound=type)

_NO_SERVABLE: Final = object()
_servable: object = _NO_SERVABLE


# --------------------------------------------------------------------------- the user object


def set_servable(obj: object) -> None:
    """Register ``obj``, the replica's user object, as the ``self`` of FastAPI class routes.

    The replica calls this once, after constructing the user's class. If the
    class has a FastAPI ``@serve.ingress`` app, its class routes are bound
    again, so that routes added to the app after the decorator ran (an
    ``APIRouter`` included at the end of the module) get ``self`` too.
    """
    global _servable
    _servable = obj
    app = getattr(type(obj), ASGI_APP_ATTR, None)
    router = None if app is None else _fastapi_router(app)
    if router is not None:
        _bind_class_routes(router, type(obj))


def current_servable() -> Any:
    """The user object registered with :func:`set_servable`.

    Raises :class:`RuntimeError` when none was registered in this process
    (a class route served outside a replica).
    """
    if _servable is _NO_SERVABLE:
        raise RuntimeError(
            "no user object is registered in this process: a route of an @serve.ingress "
            "class can only be served by a replica (set_servable() was not called)"
        )
    return _servable


async def _servable_dependency() -> Any:
    # Async, so that FastAPI resolves ``self`` on the event loop instead of
    # hopping to a worker thread as it does for sync dependencies.
    return current_servable()


# --------------------------------------------------------------------------- @serve.ingress


def ingress(app: ASGIApp) -> Callable[[_C], _C]:
    """Ray Serve's ``@serve.ingress(app)``: serve HTTP for a class with an ASGI app.

    ``app`` is a FastAPI app, a FastAPI ``APIRouter``, a Starlette app or any
    ASGI callable. The decorator returns the class itself (so that it still
    pickles by name) with ``app`` stored as ``__trioserve_asgi_app__``.

    For a FastAPI app or router, every route whose endpoint is a function of
    the class (or of one of its bases) gets ``self`` injected: its first
    parameter becomes a dependency on :func:`current_servable`, and the route
    is rebuilt so that FastAPI analyses the new signature. Routes of
    ``APIRouter`` objects included in the app are rewritten too.

    Raises :class:`ValueError` when applied to something that is not a class,
    or, as Ray Serve does, to a class with a ``__call__`` method (the app
    answers HTTP; ``__call__`` would never be reached).
    """
    if not callable(app):
        raise TypeError(f"@serve.ingress needs an ASGI app, got {type(app).__name__}")

    def decorator(cls: _C) -> _C:
        if not inspect.isclass(cls):
            raise ValueError("@serve.ingress must be used with a class")
        if "__call__" in _class_attributes(cls):
            raise ValueError("classes passed to @serve.ingress may not have a __call__ method")
        router = _fastapi_router(app)
        if router is not None:
            _bind_class_routes(router, cls)
        setattr(cls, ASGI_APP_ATTR, app)
        return cls

    return decorator


def _class_attributes(cls: type) -> set[str]:
    """Names defined in the class bodies of ``cls`` and its bases, ``object`` left out."""
    return {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}


def _fastapi_router(app: object) -> Any:
    """The ``APIRouter`` of a FastAPI app, the router itself, or None for other apps.

    FastAPI is looked up in ``sys.modules``: an app built with FastAPI has
    imported it, and any other app does not need it imported.
    """
    if "fastapi" not in sys.modules:
        return None
    from fastapi import APIRouter, FastAPI

    if isinstance(app, FastAPI):
        return app.router
    if isinstance(app, APIRouter):
        return app
    return None


def _bind_class_routes(router: Any, cls: type) -> None:
    functions = {
        id(value): value
        for klass in cls.__mro__
        if klass is not object
        for value in vars(klass).values()
        if inspect.isfunction(value)
    }
    _rebuild_routes(router, functions, seen=set())


def _rebuild_routes(router: Any, functions: dict[int, Any], seen: set[int]) -> None:
    """Rebuild the routes of ``router`` (and of routers it includes) that are class methods."""
    from fastapi.routing import APIRoute, APIWebSocketRoute

    if id(router) in seen:
        return
    seen.add(id(router))
    changed = False
    for index, route in enumerate(router.routes):
        if isinstance(route, (APIRoute, APIWebSocketRoute)):
            if id(route.endpoint) in functions:
                _inject_self(route.endpoint)
                router.routes[index] = _rebuilt_route(route, router)
                changed = True
        elif hasattr(route, "original_router"):
            # FastAPI >= 0.160 keeps an included APIRouter as one node that
            # refers to the router instead of copying its routes into the app.
            _rebuild_routes(route.original_router, functions, seen)
    mark_changed = getattr(router, "_mark_routes_changed", None)
    if changed and callable(mark_changed):
        # Those FastAPI versions cache the routes derived from an included
        # router until the router's routes version changes.
        mark_changed()


def _inject_self(endpoint: Callable[..., Any]) -> None:
    """Give ``endpoint``'s first parameter (``self``) a dependency on the user object.

    Before: ``def f(self, i: int)``; after: ``def f(self=Depends(...), *, i: int)``.
    Idempotent.
    """
    from fastapi import Depends
    from fastapi.params import Depends as DependsParam

    signature = inspect.signature(endpoint)
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional:
        raise RayServeException(
            f"Methods in FastAPI class-based view must have ``self`` as their first "
            f"argument: {endpoint.__qualname__} has none"
        )
    first = parameters[0]
    if isinstance(first.default, DependsParam) and first.default.dependency is _servable_dependency:
        return
    new_parameters = [
        first.replace(
            kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, default=Depends(_servable_dependency)
        )
    ]
    for parameter in parameters[1:]:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            raise RayServeException(
                f"{endpoint.__qualname__} takes *{parameter.name}: a FastAPI route method "
                f"cannot take variable positional arguments"
            )
        if parameter.kind in positional:
            # ``self`` now has a default: the rest cannot stay positional.
            parameter = parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        new_parameters.append(parameter)
    endpoint.__signature__ = signature.replace(parameters=new_parameters)  # type: ignore[attr-defined]


def _rebuilt_route(route: Any, router: Any) -> Any:
    """A new route of ``route``'s type, made from its attributes, analysing the new signature.

    Each parameter of the route class's ``__init__`` is read back from the
    attribute of the same name. Two exceptions:

    * ``response_model`` of a generator endpoint: FastAPI stores None after
      deriving the streamed item type from the return annotation, and derives
      it only when the argument is left at its default, so it is left so;
    * ``dependency_overrides_provider``, which ``APIWebSocketRoute`` does not
      keep: the router's own is used (the app, for routes made with
      ``@app.websocket``), so that ``app.dependency_overrides`` keeps working.
    """
    route_class = type(route)
    kwargs: dict[str, Any] = {}
    init_parameters = list(inspect.signature(route_class.__init__).parameters.values())[1:]
    for parameter in init_parameters:
        name = parameter.name
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if hasattr(route, name):
            value = getattr(route, name)
            if (
                name == "response_model"
                and value is None
                and parameter.default is not inspect.Parameter.empty
                and (
                    inspect.isgeneratorfunction(route.endpoint)
                    or inspect.isasyncgenfunction(route.endpoint)
                )
            ):
                continue
            kwargs[name] = value
        elif name == "dependency_overrides_provider":
            kwargs[name] = getattr(router, name, None)
    return route_class(**kwargs)


# --------------------------------------------------------------------------- responses


def to_response(result: Any) -> Response:
    """What a plain deployment's ``__call__`` returned, as the HTTP response Ray Serve sends.

    ======================================  =============================================
    ``result``                              response (status 200 unless the result says)
    ======================================  =============================================
    a Starlette ``Response`` (any kind)     ``result`` itself
    ``str``                                 the text, ``text/plain; charset=utf-8``
    ``bytes`` (``bytearray``,               the bytes, ``text/plain`` (as Ray Serve; no
    ``memoryview``)                         charset, since the bytes may be any encoding)
    ``None``                                empty body, ``text/plain`` (as Ray Serve)
    a sync or async generator (or other     ``StreamingResponse``, ``text/plain;
    iterator, which JSON could not encode)  charset=utf-8``: ``str`` items as UTF-8,
                                            bytes as they are, anything else as one line
                                            of JSON (JSON Lines)
    anything else                           compact JSON, ``application/json``
    ======================================  =============================================

    JSON is written with the standard ``json`` module. Values it cannot encode
    go through ``.tolist()`` when they have one (NumPy arrays and scalars, as
    Ray Serve's encoders) or else FastAPI's ``jsonable_encoder`` (pydantic
    models, dataclasses, datetimes, UUIDs, enums...) when FastAPI is
    installed; a value neither handles raises :class:`TypeError` naming its
    type. ``NaN`` and infinities are written as ``NaN``/``Infinity`` as Ray
    Serve does, not refused as Starlette's ``JSONResponse`` would.

    A sync iterator is advanced in a worker thread, never on the event loop;
    either kind is closed (if it has ``close``/``aclose``) when the response
    ends, early or not.
    """
    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Response(bytes(result), headers={"content-type": "text/plain"})
    if result is None:
        return Response(b"", headers={"content-type": "text/plain"})
    if isinstance(result, Iterator):
        return _GeneratorResponse(_iterate_in_thread(result), media_type="text/plain")
    if isinstance(result, AsyncIterator):
        return _GeneratorResponse(_iterate_async(result), media_type="text/plain")
    return _ServeJSONResponse(result)


class _ServeJSONResponse(JSONResponse):
    """Starlette's ``JSONResponse`` with :func:`to_response`'s encoding rules."""

    def render(self, content: Any) -> bytes:
        return _dumps(content).encode("utf-8")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    """What ``json`` cannot encode: ``.tolist()``, else FastAPI's ``jsonable_encoder``."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    try:
        from fastapi.encoders import jsonable_encoder
    except ImportError:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(
            f"cannot return a {type(value).__qualname__} over HTTP: it is not "
            "JSON-serialisable (install fastapi for pydantic models and other types)"
        ) from None
    try:
        return jsonable_encoder(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot return a {type(value).__qualname__} over HTTP: it is not JSON-serialisable"
        ) from exc


def _encode_item(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    return (_dumps(item) + "\n").encode("utf-8")


_EXHAUSTED: Final = object()


async def _iterate_in_thread(generator: Iterator[Any]) -> AsyncIterator[bytes]:
    """The items of a sync iterator, each ``next`` in a worker thread."""
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, generator, _EXHAUSTED)
            if item is _EXHAUSTED:
                return
            yield _encode_item(item)
    finally:
        close = getattr(generator, "close", None)
        if callable(close):
            # Runs the generator's ``finally`` blocks: user code, so in a
            # thread; shielded, so that a cancelled stream still closes it.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


async def _iterate_async(generator: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for item in generator:
            yield _encode_item(item)
    finally:
        aclose = getattr(generator, "aclose", None)
        if callable(aclose):
            await aclose()


class _GeneratorResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its generator however the response ends.

    Starlette stops iterating when the client goes away or the task is
    cancelled but leaves the generator to the garbage collector; this closes
    it on the spot, so that the user's ``finally`` blocks run in order.
    """

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if callable(aclose):
                await aclose()


# --------------------------------------------------------------------------- plain deployments


def plain_app(
    call: Callable[[tuple[Any, ...]], Awaitable[Any]],
    *,
    takes_request: bool,
    deployment: str,
) -> ASGIApp:
    """The ASGI app of a deployment without ``@serve.ingress``.

    ``call(args)`` runs the user's ``__call__(*args)`` and returns its result
    (the replica decides threads and event loops). ``takes_request`` says
    whether ``__call__`` takes the request: it then gets a Starlette
    ``Request`` (its body is read through ``receive``), else no argument.

    ``http``
        The result goes through :func:`to_response`. If ``__call__`` (or
        the conversion) raises, the client gets HTTP 500 with the
        ``text/plain`` body ``Internal Server Error: <ExceptionType> in
        deployment '<deployment>'; see the replica's log.`` and no traceback;
        the log ``trioserve.replica`` gets the traceback and the request id.
        If a streamed body fails after its first bytes went out, the status
        can no longer change: the error is logged the same way and raised,
        so that whoever relays the response aborts it rather than end it as
        if it were complete.
    ``websocket``
        Ray Serve serves WebSockets only through ``@serve.ingress``: the
        connection is refused (``websocket.close`` before ``accept``, which
        HTTP servers answer with 403) with code 1008, policy violation, and
        a reason naming the deployment; the log says why. 1003 (unsupported
        data) would describe a message, not a connection.
    ``lifespan``
        Startup and shutdown complete at once: the user's constructor is the
        startup of a plain deployment.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _serve_http(scope, receive, send)
        elif kind == "websocket":
            await _refuse_websocket(scope, receive, send)
        elif kind == "lifespan":
            await _answer_lifespan(receive, send)
        else:
            log.warning("deployment %r ignores an ASGI scope of type %r", deployment, kind)

    async def _serve_http(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            args: tuple[Any, ...] = (Request(scope, receive, send),) if takes_request else ()
            response = to_response(await call(args))
        except ClientDisconnect:
            # The client left before its body arrived: nobody to answer.
            log.info("request %s: the client disconnected", _request_id(scope) or "-")
            return
        except Exception as exc:
            _log_failure(scope, deployment, "raised")
            response = PlainTextResponse(
                f"Internal Server Error: {type(exc).__name__} in deployment {deployment!r}; "
                "see the replica's log.",
                status_code=500,
            )
        if isinstance(response, StreamingResponse):
            try:
                await response(scope, receive, send)
            except Exception:
                _log_failure(scope, deployment, "failed while streaming its response")
                raise
        else:
            await response(scope, receive, send)

    async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        log.warning(
            "request %s: deployment %r refused a WebSocket to %s: a deployment serves "
            "WebSockets only with @serve.ingress",
            _request_id(scope) or "-",
            deployment,
            scope.get("path", "?"),
        )
        await send(
            {
                "type": "websocket.close",
                "code": WEBSOCKET_POLICY_VIOLATION,
                "reason": f"deployment {deployment!r} does not accept WebSocket connections",
            }
        )

    return app


async def _answer_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == b"x-request-id":
            return bytes(value).decode("latin-1")
    return None


def _log_failure(scope: Scope, deployment: str, what: str) -> None:
    log.exception(
        "request %s: %s %s of deployment %r %s",
        _request_id(scope) or "-",
        scope.get("method", "?"),
        scope.get("path", "?"),
        deployment,
        what,
    )


# --------------------------------------------------------------------------- lifespan


class Lifespan:
    """The ASGI lifespan protocol run against ``app``, as an ASGI server runs it.

    As an async context manager, which runs the app's lifespan coroutine in
    a task group of its own::

        async with Lifespan(app) as lifespan:  # the app's startup, or RuntimeError
            serve(lifespan.app_with_state())   # requests see the lifespan state
        # the app's shutdown, also when the block is cancelled

    or step by step, in the caller's task group (cancelling that task group
    ends the app's lifespan coroutine without a shutdown)::

        lifespan = Lifespan(app)
        await lifespan.startup(task_group)
        serve(lifespan.app_with_state())
        await lifespan.shutdown()

    The app's lifespan coroutine runs for the life of the replica;
    :meth:`shutdown` ends it once the app has answered. An app that does not
    speak the protocol (it raises on the ``lifespan`` scope, or returns
    without answering ``lifespan.startup``) starts as if it succeeded, as
    under uvicorn and hypercorn; :attr:`supported` is then False and
    shutdown does nothing.

    Leaving the ``async with`` block runs the shutdown shielded from
    cancellation for at most ``shutdown_timeout_s`` (hypercorn's default
    wait). A shutdown that fails raises :class:`RuntimeError` when the block
    ends normally; when the block ends with an exception (a cancellation,
    typically), the failure is logged instead, so that the exception goes on.
    """

    def __init__(self, app: ASGIApp, *, shutdown_timeout_s: float = 60.0) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self.app = app
        self.state: dict[str, Any] = {}
        """The lifespan state (ASGI ``scope["state"]``): what a Starlette or
        FastAPI ``lifespan`` context manager yields."""
        self.supported: bool | None = None
        """Whether the app speaks the lifespan protocol; None before :meth:`startup`."""
        self._phase = "new"
        self._error: Exception | None = None
        self._cancel_scope: anyio.CancelScope | None = None
        self._shield = False
        self._to_app: MemoryObjectSendStream[Message] | None = None
        self._to_app_receive: MemoryObjectReceiveStream[Message] | None = None
        self._from_app: MemoryObjectSendStream[Message] | None = None
        self._from_app_receive: MemoryObjectReceiveStream[Message] | None = None
        self._context: contextlib.AbstractAsyncContextManager[Lifespan] | None = None

    async def __aenter__(self) -> Lifespan:
        if self._context is not None:
            raise RuntimeError("a Lifespan can be entered only once")
        self._context = self._running()
        return await self._context.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._context is not None
        return await self._context.__aexit__(exc_type, exc, traceback)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[Lifespan]:
        # Exceptions are raised after the task group ends, so that they come out
        # as they are rather than wrapped in an ExceptionGroup.
        error: BaseException | None = None
        # The app's task is shielded, so that cancelling the block leaves the app
        # running until it has answered the shutdown; _finish() always ends it.
        self._shield = True
        async with anyio.create_task_group() as task_group:
            try:
                await self.startup(task_group)
            except BaseException as exc:
                self._finish()
                error = exc
            else:
                try:
                    yield self
                except BaseException as exc:
                    error = exc
                    try:
                        await self._bounded_shutdown()
                    except Exception:
                        log.exception("the ASGI lifespan shutdown of %r failed", self.app)
                else:
                    try:
                        await self._bounded_shutdown()
                    except Exception as exc:
                        error = exc
        if error is not None:
            raise error

    async def _bounded_shutdown(self) -> None:
        with anyio.move_on_after(self.shutdown_timeout_s, shield=True) as scope:
            await self.shutdown()
        if scope.cancelled_caught:
            self._finish()
            raise RuntimeError(
                f"the ASGI lifespan shutdown of {self.app!r} did not finish within "
                f"{self.shutdown_timeout_s} s"
            )

    async def startup(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the app's lifespan task in ``task_group`` and run its startup.

        Raises :class:`RuntimeError` with the app's message when the app
        answers ``lifespan.startup.failed`` (FastAPI and Starlette put the
        traceback of the failed startup there) or answers out of protocol.
        """
        if self._phase != "new":
            raise RuntimeError("Lifespan.startup() may be called only once")
        self._phase = "starting"
        self._cancel_scope = anyio.CancelScope(shield=self._shield)
        self._to_app, self._to_app_receive = anyio.create_memory_object_stream[Message](math.inf)
        self._from_app, self._from_app_receive = anyio.create_memory_object_stream[Message](
            math.inf
        )
        # Queued before the task starts: on asyncio it may run (and end) at once.
        self._to_app.send_nowait({"type": "lifespan.startup"})
        task_group.start_soon(self._run, name=f"ASGI lifespan of {self.app!r}")
        message = await self._next_message()
        if message is None:
            self._finish()
            self.supported = False
            log.debug(
                "the ASGI app %r does not support the lifespan protocol; starting without it",
                self.app,
                exc_info=self._error,
            )
            return
        self.supported = True
        if message["type"] == "lifespan.startup.complete":
            self._phase = "running"
            return
        self._finish()
        if message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message.get("message") or "ASGI lifespan startup failed")
        raise RuntimeError(f"ASGI lifespan startup: unexpected message {message['type']!r}")

    async def shutdown(self) -> None:
        """Run the app's shutdown and end its lifespan task.

        Does nothing if the app was not started or does not speak the
        protocol. Raises :class:`RuntimeError` when the app answers
        ``lifespan.shutdown.failed`` or raises instead of answering.
        """
        if self._phase != "running":
            return
        assert self._to_app is not None
        try:
            message: Message | None = None
            # The stream is closed or broken if the app's lifespan coroutine has ended.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._to_app.send_nowait({"type": "lifespan.shutdown"})
            message = await self._next_message()
        finally:
            # The app has answered (or ended): per the ASGI spec it has nothing left to do.
            self._finish()
        if message is None:
            if self._error is not None:
                raise RuntimeError(
                    f"the ASGI app's lifespan raised instead of shutting down: {self._error!r}"
                ) from self._error
            return
        if message["type"] == "lifespan.shutdown.failed":
            raise RuntimeError(message.get("message") or "ASGI lifespan shutdown failed")
        if message["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"ASGI lifespan shutdown: unexpected message {message['type']!r}")

    def app_with_state(self) -> ASGIApp:
        """The app, with a shallow copy of :attr:`state` as ``scope["state"]`` of each request.

        ASGI servers do this for the apps they serve; without it, the state a
        ``lifespan`` yields is not on ``request.state``. The proxy does not
        know the replica's state, so the replica serves this app.
        """
        inner = self.app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "state": dict(self.state)}
            await inner(scope, receive, send)

        return app

    def _finish(self) -> None:
        """End the protocol: stop the app's lifespan task and close the streams."""
        self._phase = "done"
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        for stream in (self._to_app, self._from_app_receive):
            if stream is not None:
                stream.close()

    async def _run(self) -> None:
        assert self._cancel_scope is not None
        assert self._from_app is not None
        assert self._to_app_receive is not None
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        assert self._to_app is not None
        assert self._from_app_receive is not None
        with self._cancel_scope, self._from_app, self._to_app_receive, self._to_app:
            try:
                await self.app(scope, self._receive, self._send)
            except Exception as exc:
                self._error = exc
            except BaseException:
                # Cancelled: by _finish(), or with the caller's task group, in
                # which case no one will read the app's answers.
                self._from_app_receive.close()
                raise

    async def _receive(self) -> Message:
        assert self._to_app_receive is not None
        return await self._to_app_receive.receive()

    async def _send(self, message: Message) -> None:
        assert self._from_app is not None
        self._from_app.send_nowait(message)

    async def _next_message(self) -> Message | None:
        """The app's next message; None once its lifespan coroutine has ended."""
        assert self._from_app_receive is not None
        try:
            return await self._from_app_receive.receive()
        except anyio.EndOfStream:
            return None
