"""Deployment handles: call a deployment from Python, as in Ray Serve.

``handle.remote(*args, **kwargs)`` sends the request at once and returns a
:class:`DeploymentResponse`; ``await`` it on asyncio or trio, or call
``.result(timeout_s=...)`` from synchronous code. With
``handle.options(stream=True)`` it returns a :class:`DeploymentResponseGenerator`
to iterate over with ``async for`` or ``for``.

Where a request runs
--------------------
Requests are routed by a :class:`~trioserve.core.routing.Routers` belonging to
the event loop that sent them: a handle used inside an asyncio or trio program
(or a replica) routes on that loop, straight to the replicas; a handle used
from synchronous code routes on the process's background loop
(:mod:`trioserve._loop`). Handles pickle: a handle passed to a replica (model
composition) routes from there, never through the controller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import sniffio

from trioserve import _loop
from trioserve.core.routing import InstanceAddress, Routers, current_instance
from trioserve.exceptions import RequestCancelledError

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]

log = logging.getLogger("trioserve.handle")

STREAM_BUFFER = 16
"""Items a streaming response buffers at the caller before the replica is paused."""

_SYNC_IN_LOOP = (
    "Sync methods should not be called from within an event loop (asyncio or trio). "
    "Use `await response` instead."
)


# ------------------------------------------------------------------------ runtimes


class _Runtime:
    """The handle machinery of one event loop: its routers and the tasks of its requests.

    All its tasks live in one task group, run by a root task spawned natively
    on the loop (a trio system task, or an asyncio task), so that a request can
    be started from synchronous code running on that loop (``.remote()``).
    """

    def __init__(
        self,
        key: tuple[Any, InstanceAddress],
        instance: InstanceAddress,
        thread: int,
        threadsafe: Callable[..., Any],
    ) -> None:
        self.key = key
        self.thread = thread
        self.routers = Routers(instance)
        self._threadsafe = threadsafe
        self._send, self._recv = anyio.create_memory_object_stream[
            tuple[Callable[..., Any], tuple[Any, ...]]
        ](math.inf)

    async def root(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.routers.run)
                async for fn, args in self._recv:
                    tg.start_soon(fn, *args)
                    del fn, args  # hold no reference to the last request between requests
        except Exception:
            # Never let a failure escape into the event loop (a trio system
            # task would crash the loop): the next call makes a new runtime.
            log.exception("the handle runtime failed")
        finally:
            with _runtimes_lock:
                if _runtimes.get(self.key) is self:
                    del _runtimes[self.key]

    def in_own_thread(self) -> bool:
        return threading.get_ident() == self.thread

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` as a task of this runtime (from any thread)."""
        if self.in_own_thread():
            self._send.send_nowait((fn, args))
        else:
            self._threadsafe(self._send.send_nowait, (fn, args))

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the sync ``fn(*args)`` in this runtime's thread (now, if this is it)."""
        if self.in_own_thread():
            fn(*args)
        else:
            self._threadsafe(fn, *args)


_runtimes: dict[tuple[Any, InstanceAddress], _Runtime] = {}
_runtimes_lock = threading.Lock()
_asyncio_roots: set[asyncio.Task[None]] = set()


def _current_runtime() -> _Runtime:
    """The runtime of the calling thread's event loop, or of the background loop."""
    instance = current_instance()
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return _runtime_for(
            (token, instance),
            instance,
            threading.get_ident(),
            token.run_sync_soon,
            lambda rt: trio.lowlevel.spawn_system_task(rt.root),
        )
    if library == "asyncio":
        loop = asyncio.get_running_loop()

        def spawn(rt: _Runtime) -> None:
            task = loop.create_task(rt.root())
            _asyncio_roots.add(task)
            task.add_done_callback(_asyncio_roots.discard)

        return _runtime_for(
            (loop, instance), instance, threading.get_ident(), loop.call_soon_threadsafe, spawn
        )
    if library is not None:
        raise RuntimeError(f"trioserve handles do not support the event loop {library!r}")
    token = _loop.token()
    thread = _loop.thread_ident()
    return _runtime_for(
        (token, instance),
        instance,
        thread,
        token.run_sync_soon,
        lambda rt: token.run_sync_soon(_spawn_trio_system_task, rt.root),
    )


def _spawn_trio_system_task(fn: Callable[[], Any]) -> None:
    import trio

    trio.lowlevel.spawn_system_task(fn)


def _runtime_for(
    key: tuple[Any, InstanceAddress],
    instance: InstanceAddress,
    thread: int,
    threadsafe: Callable[..., Any],
    spawn: Callable[[_Runtime], Any],
) -> _Runtime:
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            runtime = _Runtime(key, instance, thread, threadsafe)
            _runtimes[key] = runtime
            spawn(runtime)
        return runtime


# ------------------------------------------------------------------------ calls


@dataclasses.dataclass(frozen=True)
class _Options:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False


class _Call:
    """One request: sent by a task of ``runtime``, its outcome kept in ``future``."""

    def __init__(self, handle: DeploymentHandle, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.handle = handle
        self.args = args
        self.kwargs = kwargs
        self.request_id = uuid.uuid4().hex
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.runtime = _current_runtime()
        self.scope: anyio.CancelScope | None = None
        self.cancel_requested = False
        self._waiters: list[anyio.Event] = []
        self.runtime.start_soon(self.run)

    def meta(self) -> dict[str, Any]:
        options = self.handle._options
        return {
            "method": options.method_name,
            "request_id": self.request_id,
            "multiplexed_model_id": options.multiplexed_model_id,
        }

    async def run(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self.scope = scope
                if self.cancel_requested:
                    scope.cancel()
                try:
                    await self.send()
                except Exception as exc:
                    self.finish(error=exc)
        finally:
            if not self.future.done():
                self.finish(error=RequestCancelledError(self.request_id))

    async def send(self) -> None:
        args = tuple([await _resolved(a) for a in self.args])
        kwargs = {k: await _resolved(v) for k, v in self.kwargs.items()}
        handle = self.handle
        router = self.runtime.routers.get(handle.app_name, handle.deployment_name)
        self.finish(value=await router.call(self.meta(), args, kwargs))

    def finish(self, *, value: Any = None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)
        for event in self._waiters:
            event.set()
        self._waiters.clear()

    def cancel(self) -> None:
        if not self.future.done():
            self.runtime.call_soon(self._cancel_now)

    def _cancel_now(self) -> None:
        self.cancel_requested = True
        if self.scope is not None:
            self.scope.cancel()

    async def wait(self) -> None:
        """Wait for the outcome from any event loop; cancelling the waiter cancels the call."""
        if self.future.done():
            return
        try:
            if self.runtime.in_own_thread():
                event = anyio.Event()
                self._waiters.append(event)
                await event.wait()
            else:
                await anyio.to_thread.run_sync(
                    concurrent.futures.wait, [self.future], abandon_on_cancel=True
                )
        except BaseException:
            self.cancel()
            raise

    def result(self, timeout_s: float | None) -> Any:
        if _loop.in_async_context():
            raise RuntimeError(_SYNC_IN_LOOP)
        try:
            return self.future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"Timed out after {timeout_s} s waiting for the result of request "
                f"{self.request_id}."
            ) from None


async def _resolved(value: Any) -> Any:
    if isinstance(value, DeploymentResponse):
        return await value
    return value


class _StreamCall(_Call):
    """A streaming request: items go through a bounded buffer to the reader."""

    def __init__(self, handle: DeploymentHandle, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.items_in, self.items_out = anyio.create_memory_object_stream[Any](STREAM_BUFFER)
        self.error: BaseException | None = None
        super().__init__(handle, args, kwargs)

    async def send(self) -> None:
        args = tuple([await _resolved(a) for a in self.args])
        kwargs = {k: await _resolved(v) for k, v in self.kwargs.items()}
        handle = self.handle
        router = self.runtime.routers.get(handle.app_name, handle.deployment_name)
        try:
            async with router.stream(self.meta(), args, kwargs) as items:
                async for item in items:
                    await self.items_in.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the reader went away: leaving the stream cancels the generator
        self.finish(value=None)

    def finish(self, *, value: Any = None, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.items_in.close()
        super().finish(value=value, error=error)

    async def next_item(self) -> Any:
        try:
            return await self.items_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None

    def close_reader(self) -> None:
        self.runtime.call_soon(self.items_out.close)


# ------------------------------------------------------------------------ public


class DeploymentResponse:
    """The future result of ``handle.remote()``: the request is already on its way.

    ``await response`` on any event loop, or ``response.result(timeout_s=...)``
    from synchronous code. Passing it as an argument of another ``.remote()``
    call passes its result. ``cancel()`` cancels the request, in the replica too.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        await self._call.wait()
        return self._call.future.result()

    def result(self, *, timeout_s: float | None = None) -> Any:
        """Wait for the result (at most ``timeout_s``; then ``TimeoutError``).

        Raises the deployment's exception, or
        :class:`~trioserve.exceptions.RequestCancelledError` if the request was
        cancelled. Must not be called from inside an event loop: ``await`` there.
        """
        return self._call.result(timeout_s)

    def cancel(self) -> None:
        """Cancel the request (best effort: a finished request stays finished)."""
        self._call.cancel()

    @property
    def request_id(self) -> str:
        return self._call.request_id

    def __repr__(self) -> str:
        state = "done" if self._call.future.done() else "pending"
        return f"<DeploymentResponse {self._call.handle._describe()} {state}>"


class DeploymentResponseGenerator:
    """The items of a streaming call (``handle.options(stream=True).remote()``).

    Iterate with ``async for`` on any event loop, or ``for`` from synchronous
    code. ``cancel()``, or leaving the iteration early, stops the generator in
    the replica.
    """

    def __init__(self, call: _StreamCall) -> None:
        self._call = call

    def __aiter__(self) -> DeploymentResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        if call.runtime.in_own_thread():
            return await call.next_item()
        return await anyio.to_thread.run_sync(self._next_from_other_loop, abandon_on_cancel=True)

    def _next_from_other_loop(self) -> Any:
        future = concurrent.futures.Future[Any]()
        call = self._call  # not self: dropping the generator must stop the stream

        async def fetch() -> None:
            try:
                future.set_result(await call.next_item())
            except BaseException as exc:
                future.set_exception(exc)

        call.runtime.start_soon(fetch)
        return future.result()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if _loop.in_async_context():
            raise RuntimeError(
                "Sync methods should not be called from within an event loop (asyncio or "
                "trio). Use `async for` instead."
            )
        try:
            return self._next_from_other_loop()
        except StopAsyncIteration:
            raise StopIteration from None

    def cancel(self) -> None:
        """Stop the stream; the generator in the replica is cancelled."""
        self._call.cancel()
        self._call.close_reader()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.future.done():
            try:
                call.close_reader()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<DeploymentResponseGenerator {self._call.handle._describe()}>"


_UNSET: Any = object()


class DeploymentHandle:
    """Calls one deployment of one application: ``handle.remote(...)``.

    ``handle.other_method.remote(...)`` calls another method; ``options``
    returns a copy with other call options. Handles can be passed to
    deployments (bound applications in ``.bind()`` arguments become handles)
    and pickled.
    """

    def __init__(
        self, deployment_name: str, app_name: str = "default", *, _options: _Options | None = None
    ) -> None:
        self._deployment_name = deployment_name
        self._app_name = app_name
        self._options = _options or _Options()

    @property
    def deployment_name(self) -> str:
        return self._deployment_name

    @property
    def app_name(self) -> str:
        return self._app_name

    def options(
        self,
        *,
        method_name: str = _UNSET,
        multiplexed_model_id: str = _UNSET,
        stream: bool = _UNSET,
        use_new_handle_api: bool = _UNSET,
        _prefer_local_routing: bool = _UNSET,
    ) -> DeploymentHandle:
        """A copy of this handle with the given options changed.

        ``method_name``: the method ``remote()`` calls (default ``__call__``);
        ``multiplexed_model_id``: the model the request is for
        (``serve.get_multiplexed_model_id()`` in the replica); ``stream``:
        ``remote()`` returns a :class:`DeploymentResponseGenerator`.
        ``use_new_handle_api`` and ``_prefer_local_routing`` are accepted
        for compatibility and change nothing.
        """
        changes: dict[str, Any] = {}
        if method_name is not _UNSET:
            if not isinstance(method_name, str) or not method_name:
                raise TypeError(f"method_name must be a non-empty string, got {method_name!r}")
            changes["method_name"] = method_name
        if multiplexed_model_id is not _UNSET:
            if not isinstance(multiplexed_model_id, str):
                raise TypeError(
                    f"multiplexed_model_id must be a string, got {multiplexed_model_id!r}"
                )
            changes["multiplexed_model_id"] = multiplexed_model_id
        if stream is not _UNSET:
            changes["stream"] = bool(stream)
        return DeploymentHandle(
            self._deployment_name,
            self._app_name,
            _options=dataclasses.replace(self._options, **changes),
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Send a request; returns a :class:`DeploymentResponse` (or a generator with
        ``stream=True``) at once, while the request is routed to a replica."""
        if self._options.stream:
            return DeploymentResponseGenerator(_StreamCall(self, args, kwargs))
        return DeploymentResponse(_Call(self, args, kwargs))

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self._deployment_name, self._app_name, dataclasses.asdict(self._options)),
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DeploymentHandle)
            and self._deployment_name == other._deployment_name
            and self._app_name == other._app_name
            and self._options == other._options
        )

    def __hash__(self) -> int:
        return hash((self._deployment_name, self._app_name, self._options))

    def _describe(self) -> str:
        method = self._options.method_name
        suffix = "" if method == "__call__" else f".{method}"
        return f"{self._app_name}/{self._deployment_name}{suffix}"

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self._deployment_name}', app='{self._app_name}')"


def _rebuild(deployment: str, app: str, options: dict[str, Any]) -> DeploymentHandle:
    return DeploymentHandle(deployment, app, _options=_Options(**options))
