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
from synchronous code routes on the process's background handle loop
(:func:`trioserve._loop.handle_loop`). Handles pickle: a handle passed to a
replica (model composition) routes from there, never through the controller.
"""

from __future__ import annotations

import _thread
import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import trio

from trioserve import _loop
from trioserve.core.eventloop import running_loop
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
#
# A request is a task of the runtime of the event loop that sent it. On that
# loop's own thread ``.remote()`` starts the task at once (a native asyncio task,
# or a task of the runtime's trio nursery); from any other thread (synchronous
# code, whose runtime is the background handle loop's) it hands the start over
# with one ``call_soon_threadsafe``. Everything a call does after that runs on
# the runtime's thread; only the outcome is read from others.


class _Job(abc.ABC):
    """What a runtime runs as a task: :meth:`run`, or :meth:`abort` if it never can."""

    __slots__ = ("_started", "_task")

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        """Its task, on asyncio."""
        self._started = False
        """Whether :meth:`run` began (an asyncio task cancelled before that never runs)."""

    @abc.abstractmethod
    async def run(self) -> None:
        """What the job does."""

    @abc.abstractmethod
    def abort(self, error: BaseException | None) -> None:
        """The job will never run: ``error`` prevented it, or (None) its loop shut down."""


class _Runtime(abc.ABC):
    """The handle machinery of one event loop: its routers and the tasks of its requests.

    A root task spawned natively on the loop (a trio system task, or an asyncio
    task) runs the routers; requests started before they run wait in a backlog.
    """

    def __init__(self, key: tuple[Any, InstanceAddress], instance: InstanceAddress, thread: int):
        self.key = key
        self.loop_key = key[0]
        self.instance = instance
        self.thread = thread
        self.routers = Routers(instance)
        self.alive = True
        self._ready = False
        self._backlog: list[_Job] = []

    # -- to be provided by each kind of loop

    @abc.abstractmethod
    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the sync ``fn(*args)`` soon in this runtime's thread (from another thread)."""

    @abc.abstractmethod
    def _spawn(self, job: _Job) -> None:
        """Start ``job.run()`` as a task (in this runtime's thread, once ready)."""

    @abc.abstractmethod
    def is_current(self) -> bool:
        """Whether the calling code runs on this runtime's event loop."""

    @abc.abstractmethod
    async def park(self, call: _Call) -> None:
        """Wait on this runtime's loop until ``call`` finishes; cancelling cancels it."""

    # -- shared

    def in_own_thread(self) -> bool:
        return threading.get_ident() == self.thread

    def start(self, job: _Job) -> None:
        """Start ``job`` as a task of this runtime (from any thread)."""
        if self.in_own_thread():
            self._start_here(job)
        else:
            self._threadsafe(self._start_here, job)

    def _start_here(self, job: _Job) -> None:
        if self._ready:
            try:
                self._spawn(job)
            except Exception as exc:  # the loop is shutting down
                job.abort(exc)
        elif self.alive:
            self._backlog.append(job)
        else:
            job.abort(None)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the sync ``fn(*args)`` in this runtime's thread (now, if this is it)."""
        if self.in_own_thread():
            fn(*args)
        else:
            self._threadsafe(fn, *args)

    def _set_ready(self) -> None:
        self._ready = True
        backlog, self._backlog = self._backlog, []
        for job in backlog:
            self._start_here(job)

    def _close(self) -> None:
        self.alive = False
        self._ready = False
        backlog, self._backlog = self._backlog, []
        for job in backlog:  # never started: the loop shuts down
            job.abort(None)
        with _runtimes_lock:
            if _runtimes.get(self.key) is self:
                del _runtimes[self.key]


class _TrioRuntime(_Runtime):
    """The runtime of a trio program's loop."""

    def __init__(
        self,
        key: tuple[Any, InstanceAddress],
        instance: InstanceAddress,
        thread: int,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        super().__init__(key, instance, thread)
        self.token = token
        self._nursery: trio.Nursery | None = None

    async def root(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.routers.run)
                self._nursery = nursery
                self._set_ready()
                await trio.sleep_forever()
        except Exception:
            # Never let a failure escape into the event loop (a trio system
            # task would crash the loop): the next call makes a new runtime.
            log.exception("the handle runtime failed")
        finally:
            self._nursery = None
            self._close()

    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self.token.run_sync_soon(_guarded, fn, args)

    def _spawn(self, job: _Job) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(job.run, name="trioserve request")

    def is_current(self) -> bool:
        # While a call of this runtime is pending its trio loop runs, in this thread.
        return threading.get_ident() == self.thread

    async def park(self, call: _Call) -> None:
        waker = functools.partial(trio.lowlevel.reschedule, trio.lowlevel.current_task())
        call.add_waiter(waker)

        def abort(_: Any) -> trio.lowlevel.Abort:
            call.remove_waiter(waker)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            call.cancel()
            raise


class _AsyncioRuntime(_Runtime):
    """The runtime of an asyncio loop: requests are native tasks, cancelled natively."""

    def __init__(
        self,
        key: tuple[Any, InstanceAddress],
        instance: InstanceAddress,
        thread: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(key, instance, thread)
        self.loop = loop
        self.active: set[_Job] = set()
        """The jobs running (the loop itself holds its tasks only weakly)."""

    async def root(self) -> None:
        try:
            # The routers run in this task; requests start once they run. (Not
            # in a task group's tg.start(): that hangs when the loop cancels
            # both tasks before the second ever ran, as when asyncio.run()
            # ends right after a first .remote().)
            await self.routers.run(task_status=_Started(self._set_ready))
        except Exception:
            log.exception("the handle runtime failed")
        finally:
            self._close()
            for job in list(self.active):  # the routers are gone: end the requests
                task = job._task
                if not job._started:  # (a task cancelled before it starts never runs)
                    self.active.discard(job)
                    job.abort(None)
                elif task is not None and not task.done() and not task.cancelling():
                    task.cancel()

    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def _spawn(self, job: _Job) -> None:
        job._task = self.loop.create_task(job.run())
        self.active.add(job)

    def is_current(self) -> bool:
        return asyncio._get_running_loop() is self.loop

    async def park(self, call: _Call) -> None:
        future = self.loop.create_future()
        call.add_waiter(future)
        try:
            await future
        except BaseException:
            call.cancel()
            raise


class _Started:
    """A task status that calls ``callback`` (see :meth:`_AsyncioRuntime.root`)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def started(self, value: Any = None) -> None:
        self.callback()


def _guarded(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """``fn(*args)`` as a trio ``run_sync_soon`` callback, which must never raise."""
    try:
        fn(*args)
    except Exception:
        log.exception("a handle callback failed")


_runtimes: dict[tuple[Any, InstanceAddress], _Runtime] = {}
_runtimes_lock = threading.Lock()
_asyncio_roots: set[asyncio.Task[None]] = set()


class _ThreadState(threading.local):
    runtime: _Runtime | None = None
    """The runtime this thread used last (a thread runs one loop at a time)."""


_thread_state = _ThreadState()


def _current_runtime() -> _Runtime:
    """The runtime of the calling thread's event loop, or of the background loop."""
    instance = current_instance()
    library, loop = running_loop()
    if library is None:
        loop, _ = _loop.handle_loop()
    elif loop is None:
        raise RuntimeError(f"trioserve handles do not support the event loop {library!r}")
    runtime = _thread_state.runtime
    if (
        runtime is not None
        and runtime.loop_key is loop
        and runtime.instance is instance
        and runtime.alive
    ):
        return runtime
    runtime = _runtime_for(library, loop, instance)
    _thread_state.runtime = runtime
    return runtime


def _runtime_for(library: str | None, loop: Any, instance: InstanceAddress) -> _Runtime:
    key = (loop, instance)
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is not None:
            return runtime
        if library == "trio":
            trio_runtime = _TrioRuntime(key, instance, threading.get_ident(), loop)
            trio.lowlevel.spawn_system_task(trio_runtime.root)
            runtime = trio_runtime
        elif library == "asyncio":
            runtime = _AsyncioRuntime(key, instance, threading.get_ident(), loop)
            _spawn_asyncio_root(runtime)
        else:  # synchronous code: the background handle loop
            _, thread = _loop.handle_loop()
            runtime = _AsyncioRuntime(key, instance, thread, loop)
            loop.call_soon_threadsafe(_spawn_asyncio_root, runtime)
        _runtimes[key] = runtime
        return runtime


def _spawn_asyncio_root(runtime: _AsyncioRuntime) -> None:
    task = runtime.loop.create_task(runtime.root())
    _asyncio_roots.add(task)
    task.add_done_callback(_asyncio_roots.discard)


# ------------------------------------------------------------------------ calls


@dataclasses.dataclass(frozen=True)
class _Options:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False


class _Call(_Job):
    """One request, sent by a task of ``runtime``; its outcome is ``value`` or ``error``
    once ``done``.

    Only the runtime's thread changes a call. Others read the outcome once
    ``done`` is set: the synchronous caller that made it waits on ``_lock``
    (taken at creation, released when done); any other waiter is added
    through :meth:`_Runtime.call_soon`.
    """

    __slots__ = (
        "_cancel_sent",
        "_lock",
        "_scope",
        "_waiters",
        "args",
        "done",
        "error",
        "handle",
        "kwargs",
        "request_id",
        "runtime",
        "value",
    )

    def __init__(self, handle: DeploymentHandle, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self.handle = handle
        self.args = args
        self.kwargs = kwargs
        self.request_id = os.urandom(16).hex()
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._cancel_sent = False
        self._scope: trio.CancelScope | None = None
        self._waiters: list[Any] | None = None
        runtime = self.runtime = _current_runtime()
        if runtime.in_own_thread():
            self._lock: Any = None
        else:  # a synchronous caller: it is likely to call result()
            self._lock = _thread.allocate_lock()
            self._lock.acquire()
        runtime.start(self)

    def meta(self) -> dict[str, Any]:
        options = self.handle._options
        return {
            "method": options.method_name,
            "request_id": self.request_id,
            "multiplexed_model_id": options.multiplexed_model_id,
        }

    async def run(self) -> None:
        if self.done:
            return  # cancelled before it started: nothing was sent
        self._started = True
        try:
            if isinstance(self.runtime, _TrioRuntime):
                with trio.CancelScope() as scope:
                    self._scope = scope
                    try:
                        await self.send()
                    except Exception as exc:
                        self.finish(error=exc)
            else:  # asyncio: cancelled with Task.cancel()
                try:
                    await self.send()
                except Exception as exc:
                    self.finish(error=exc)
        finally:
            self._scope = None
            if not self.done:
                self.finish(error=RequestCancelledError(self.request_id))
            if isinstance(self.runtime, _AsyncioRuntime):
                self.runtime.active.discard(self)

    def abort(self, error: BaseException | None) -> None:
        self.finish(error=error or RequestCancelledError(self.request_id))

    async def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments, with the results of responses passed among them."""
        args, kwargs = self.args, self.kwargs
        if any(isinstance(a, DeploymentResponse) for a in args):
            args = tuple([await _resolved(a) for a in args])
        if any(isinstance(v, DeploymentResponse) for v in kwargs.values()):
            kwargs = {k: await _resolved(v) for k, v in kwargs.items()}
        return args, kwargs

    async def send(self) -> None:
        args, kwargs = await self.arguments()
        handle = self.handle
        router = self.runtime.routers.get(handle._app_name, handle._deployment_name)
        self.finish(value=await router.call(self.meta(), args, kwargs))

    def finish(self, *, value: Any = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.value = value
        self.error = error
        self.done = True
        if self._lock is not None:
            self._lock.release()
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for waiter in waiters:
                _wake(waiter)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def add_waiter(self, waiter: Any) -> None:
        """Wake ``waiter`` once done (see :func:`_wake`); in the runtime's thread."""
        if self.done:
            _wake(waiter)
        elif self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)

    def remove_waiter(self, waiter: Any) -> None:
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)

    def cancel(self) -> None:
        if not self.done:
            self.runtime.call_soon(self._cancel_now)

    def _cancel_now(self) -> None:
        if self.done:
            return
        if not self._started:  # not sent yet, and now never will be
            self.finish(error=RequestCancelledError(self.request_id))
        elif self._scope is not None:
            self._scope.cancel()
        elif self._task is not None and not self._cancel_sent:
            self._cancel_sent = True  # once: a second Task.cancel() would break shields
            self._task.cancel()

    async def wait(self) -> None:
        """Wait for the outcome from any event loop; cancelling the waiter cancels the call."""
        if self.done:
            return
        runtime = self.runtime
        if runtime.is_current():
            await runtime.park(self)
            return
        library, loop = running_loop()
        if library == "asyncio":
            future = loop.create_future()
            wake: Callable[[], None] = functools.partial(_wake_asyncio_future, loop, future)
            done: Any = future
        elif library == "trio":
            event = trio.Event()
            wake = functools.partial(_wake_trio_event, loop, event)
            done = event.wait()
        else:
            raise RuntimeError("await a DeploymentResponse on an asyncio or trio event loop")
        try:
            runtime.call_soon(self.add_waiter, wake)
            await done
        except BaseException:
            self.cancel()
            raise

    def result(self, timeout_s: float | None) -> Any:
        if _loop.in_async_context():
            raise RuntimeError(_SYNC_IN_LOOP)
        if not self.done:
            lock = self._lock
            if lock is None:  # made on an event loop: hear from it when done
                lock = _thread.allocate_lock()
                lock.acquire()
                self.runtime.call_soon(self.add_waiter, lock.release)
            if timeout_s is None:
                lock.acquire()
            elif not lock.acquire(timeout=min(max(timeout_s, 0.0), threading.TIMEOUT_MAX)):
                raise TimeoutError(
                    f"Timed out after {timeout_s} s waiting for the result of request "
                    f"{self.request_id}."
                )
            lock.release()  # for the next reader
        return self.outcome()


def _wake(waiter: Any) -> None:
    """Wake one waiter of a call: an asyncio future of the runtime's loop, or a callable."""
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():
            waiter.set_result(None)
    else:
        waiter()


def _wake_asyncio_future(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_wake, future)


def _wake_trio_event(token: trio.lowlevel.TrioToken, event: trio.Event) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(event.set)


async def _resolved(value: Any) -> Any:
    if isinstance(value, DeploymentResponse):
        return await value
    return value


class _StreamCall(_Call):
    """A streaming request: items go through a bounded buffer to the reader."""

    __slots__ = ("items_in", "items_out")

    def __init__(self, handle: DeploymentHandle, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.items_in, self.items_out = anyio.create_memory_object_stream[Any](STREAM_BUFFER)
        super().__init__(handle, args, kwargs)

    async def send(self) -> None:
        args, kwargs = await self.arguments()
        handle = self.handle
        router = self.runtime.routers.get(handle._app_name, handle._deployment_name)
        try:
            async with router.stream(self.meta(), args, kwargs) as items:
                async for item in items:
                    await self.items_in.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the reader went away: leaving the stream cancels the generator
        self.finish(value=None)

    def finish(self, *, value: Any = None, error: BaseException | None = None) -> None:
        super().finish(value=value, error=error)
        self.items_in.close()

    async def next_item(self) -> Any:
        try:
            return await self.items_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None

    def close_reader(self) -> None:
        self.runtime.call_soon(self.items_out.close)


class _Fetch(_Job):
    """Reads the next item of a stream for a reader on another thread."""

    __slots__ = ("call", "future")

    def __init__(self, call: _StreamCall) -> None:
        super().__init__()
        self.call = call
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    async def run(self) -> None:
        self._started = True
        try:
            self.future.set_result(await self.call.next_item())
        except BaseException as exc:
            self.future.set_exception(exc)
        finally:
            runtime = self.call.runtime
            if isinstance(runtime, _AsyncioRuntime):
                runtime.active.discard(self)

    def abort(self, error: BaseException | None) -> None:
        if not self.future.done():
            self.future.set_exception(error or RequestCancelledError(self.call.request_id))


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
        call = self._call
        if not call.done:
            await call.wait()
        return call.outcome()

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
        state = "done" if self._call.done else "pending"
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
        if call.runtime.is_current():
            return await call.next_item()
        return await anyio.to_thread.run_sync(self._next_from_other_loop, abandon_on_cancel=True)

    def _next_from_other_loop(self) -> Any:
        fetch = _Fetch(self._call)  # holds the call, not self: dropping self stops the stream
        self._call.runtime.start(fetch)
        return fetch.future.result()

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
        if call is not None and not call.done:
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
