"""``@serve.batch``: Ray Serve's dynamic request batching, on asyncio and trio.

A function (or method) decorated with :func:`batch` is written for a batch: each
parameter receives a list holding one value per request, and the function
returns a list holding one result per request. Callers call it with a single
item each and ``await`` their own result::

    @serve.deployment(max_ongoing_requests=32)
    class Model:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def __call__(self, texts: list[str]) -> list[int]:
            return [len(t) for t in texts]

How batches form
    Requests wait in a queue. A batch leaves it as soon as ``max_batch_size``
    requests wait, or ``batch_wait_timeout_s`` after the oldest waiting request
    arrived, whichever comes first; at most ``max_concurrent_batches`` batches
    run at once. A batch is formed only when one may run, so requests that
    arrive while the function is busy gather into the next batch. With
    ``batch_size_fn``, the size of a batch is ``batch_size_fn(items)`` (the
    first argument of each request) instead of the number of requests.

Where the queue lives
    One queue per event loop and per owner: per instance for a method (the
    ``self`` of the call), one for a plain function. The settings belong to the
    decorated function; ``set_max_batch_size(n)`` and
    ``set_batch_wait_timeout_s(t)`` on it (or on the bound method, e.g. from
    ``reconfigure``) apply from the next batch on.

Results, errors, cancellation
    The function must return a list as long as the batch; otherwise every
    caller of the batch gets a :class:`~trioserve.exceptions.RayServeException`
    naming both lengths. An exception raised by the function reaches every
    caller of that batch, and only them. A caller cancelled while its request
    waits leaves the queue (a batch whose callers are all gone is not run); a
    caller cancelled while its batch runs does not stop the batch for the
    others.

Streaming
    An ``async def`` generator yields one list per step, one output per
    request; each caller iterates over its own outputs. ``StopIteration`` (the
    class or an instance) in a request's place ends that request's stream. The
    generator is stopped once every request's stream has ended or its caller
    has gone.

The batches run in a task of the event loop's own (an asyncio task, or a trio
system task), not in any caller's task; the task ends when the queue is empty
and starts again with the next request.
"""

from __future__ import annotations

import abc
import collections
import contextvars
import functools
import inspect
import logging
import math
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, overload

import anyio
import anyio.lowlevel
import sniffio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trioserve.exceptions import RayServeException
from trioserve.replica import metrics
from trioserve.replica.host import RequestContext, _request

__all__ = ["batch"]

log = logging.getLogger("trioserve.replica")

BatchSizeFn = Callable[[list[Any]], int]


# --------------------------------------------------------------------------- validation
# The checks and messages of Ray Serve's ``serve.batch``.


def _check_function(func: object) -> None:
    if not callable(func):
        raise TypeError("@serve.batch can only be used to decorate functions or methods.")
    if not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)):
        raise TypeError("Functions decorated with @serve.batch must be 'async def'")


def _checked_max_batch_size(value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"max_batch_size must be integer >= 1, got {value}")
    if value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {value}")
    return value


def _checked_batch_wait_timeout_s(value: object) -> float:
    if not isinstance(value, float | int):
        raise TypeError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    if value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    return float(value)


def _checked_max_concurrent_batches(value: object) -> int:
    if not isinstance(value, int) or value < 1:
        raise TypeError(f"max_concurrent_batches must be an integer >= 1, got {value}")
    return value


def _checked_batch_size_fn(value: object) -> BatchSizeFn | None:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(value)}")
    return value


# --------------------------------------------------------------------------- requests


class _Request(abc.ABC):
    """One caller's request: its arguments and the way its result goes back."""

    __slots__ = ("arguments", "arrived", "finished", "gone", "item", "model_id", "owner")

    def __init__(self, owner: object, arguments: dict[str, Any], item: Any, model_id: str) -> None:
        self.owner = owner
        self.arguments = arguments
        self.item = item
        """The first batched argument: what ``batch_size_fn`` measures."""
        self.model_id = model_id
        self.arrived = anyio.current_time()
        self.finished = False
        """The caller has its result, its error, or the end of its stream."""
        self.gone = False
        """The caller stopped waiting (cancelled, or closed its stream)."""

    @abc.abstractmethod
    def fail(self, error: BaseException) -> None:
        """Give the caller ``error`` (nothing when it has its outcome already)."""


class _Call(_Request):
    """A request of a coroutine function: one result."""

    __slots__ = ("_done", "_error", "_traceback", "_value")

    def __init__(self, owner: object, arguments: dict[str, Any], item: Any, model_id: str) -> None:
        super().__init__(owner, arguments, item, model_id)
        self._done = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._traceback: TracebackType | None = None

    def resolve(self, value: Any) -> None:
        if not self.finished:
            self.finished = True
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._error = error
            self._traceback = error.__traceback__
            self._done.set()

    async def result(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            # Every caller of the batch raises the same exception: each one from
            # the batch's own traceback, not from the callers' before it.
            raise self._error.with_traceback(self._traceback)
        return self._value


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _StreamCall(_Request):
    """A request of an async generator function: a stream of outputs."""

    __slots__ = ("_send", "receive")

    def __init__(self, owner: object, arguments: dict[str, Any], item: Any, model_id: str) -> None:
        super().__init__(owner, arguments, item, model_id)
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._send: MemoryObjectSendStream[Any] = send
        self.receive: MemoryObjectReceiveStream[Any] = receive

    def emit(self, value: Any) -> None:
        if self.finished:
            return
        try:
            self._send.send_nowait(value)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.finish()  # the caller closed its stream

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._send.close()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.emit(_Failure(error))
            self.finish()


def _is_stop(value: Any) -> bool:
    """Whether a streaming output ends its request's stream (Ray's sentinels)."""
    return (
        value is StopIteration
        or value is StopAsyncIteration
        or isinstance(value, StopIteration | StopAsyncIteration)
    )


# --------------------------------------------------------------------------- the queue


class _Settings:
    __slots__ = (
        "batch_size_fn",
        "batch_wait_timeout_s",
        "max_batch_size",
        "max_concurrent_batches",
    )

    def __init__(
        self,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
        batch_size_fn: BatchSizeFn | None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn


class _BatchQueue:
    """The requests of one owner on one event loop, and the batches made of them."""

    def __init__(self, batcher: _Batcher) -> None:
        self._batcher = batcher
        self._pending: collections.deque[_Request] = collections.deque()
        self._arrival: anyio.Event | None = None
        self._slots = anyio.Semaphore(batcher.settings.max_concurrent_batches)
        self._former: object | None = None
        """The token of the task forming batches now, if any."""

    def put(self, request: _Request) -> None:
        self._pending.append(request)
        if self._arrival is not None:
            self._arrival.set()
        if self._former is None:
            token = self._former = object()
            _spawn(functools.partial(self._work, token), f"@serve.batch {self._batcher.name}")

    def withdraw(self, request: _Request) -> None:
        """The caller of ``request`` stopped waiting for it."""
        request.gone = True
        if not request.finished:
            try:
                self._pending.remove(request)
            except ValueError:
                return  # already in a batch, which goes on for the other callers
            if not self._pending and self._arrival is not None:
                self._arrival.set()  # no batch to wait for any more

    async def _work(self, token: object) -> None:
        """Form batches while requests wait, each when a slot is free; run them."""
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    await self._slots.acquire()
                    requests = None
                    try:
                        requests = await self._next_batch()
                    finally:
                        if requests is None:
                            self._slots.release()
                    if requests is None:
                        break
                    tg.start_soon(self._run, requests)
        except Exception:  # a bug here must not take the event loop down
            log.exception("@serve.batch %s: the batching task failed", self._batcher.name)
        finally:
            if self._former is token:  # stopped while forming: nobody will serve these
                self._former = None
                error = RuntimeError(
                    f"@serve.batch {self._batcher.name}: the batching task stopped"
                )
                while self._pending:
                    self._pending.popleft().fail(error)

    async def _next_batch(self) -> list[_Request] | None:
        """The next batch; None (and no longer forming) when no request waits."""
        while True:
            if not self._pending:
                self._former = None
                return None
            settings = self._batcher.settings
            max_size, size_fn = settings.max_batch_size, settings.batch_size_fn
            deadline = self._pending[0].arrived + settings.batch_wait_timeout_s
            while True:
                count, full = self._scan(max_size, size_fn)
                remaining = deadline - anyio.current_time()
                if full or not self._pending or remaining <= 0:
                    break
                arrival = self._arrival = anyio.Event()
                with anyio.move_on_after(remaining):
                    await arrival.wait()
                self._arrival = None
            requests = [self._pending.popleft() for _ in range(count)]
            if requests:
                return requests

    def _scan(self, max_size: int, size_fn: BatchSizeFn | None) -> tuple[int, bool]:
        """How many waiting requests the next batch takes, and whether it is full."""
        if size_fn is None:
            return min(len(self._pending), max_size), len(self._pending) >= max_size
        count = 0
        while count < len(self._pending):
            items = [self._pending[i].item for i in range(count + 1)]
            try:
                size = size_fn(items)
            except Exception as exc:  # the newest item made it fail: that request fails
                failed = self._pending[count]
                del self._pending[count]
                failed.fail(exc)
                continue
            if size > max_size:
                if count == 0:
                    self._pending.popleft().fail(
                        RuntimeError(
                            "Size of item is greater than max_batch_size. Please increase "
                            "the max_batch_size or check the implementation of the "
                            "batch_size_fn."
                        )
                    )
                    continue
                return count, True
            count += 1
            if size >= max_size:
                return count, True
        return count, False

    async def _run(self, requests: list[_Request]) -> None:
        """Call the user's function on one batch and hand each caller its part."""
        try:
            live = [r for r in requests if not r.gone]
            if not live:
                return
            # serve.get_multiplexed_model_id() in the function: the batch's model, if one.
            models = {r.model_id for r in live}
            model = models.pop() if len(models) == 1 else ""
            _request.set(RequestContext(multiplexed_model_id=model))
            started = anyio.current_time()
            try:
                await self._batcher.call(live)
            except Exception as exc:
                for r in live:
                    r.fail(exc)
            metrics.batch_run(
                self._batcher.name,
                len(live),
                started - requests[0].arrived,
                anyio.current_time() - started,
            )
        finally:
            self._slots.release()
            error = RuntimeError(f"@serve.batch {self._batcher.name}: the batch was stopped")
            for r in requests:
                r.fail(error)  # only those the batch did not finish


def _spawn(fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    """Run ``fn`` in a task of the current event loop that no caller owns."""
    context = contextvars.copy_context()
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, name=name, context=context)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(fn(), name=name, context=context)
        _asyncio_tasks.add(task)
        task.add_done_callback(_asyncio_tasks.discard)


_asyncio_tasks: set[Any] = set()


# --------------------------------------------------------------------------- the decorated function


class _Batcher:
    """What a decorated function knows: the user's function, its settings, its queues."""

    def __init__(self, func: Callable[..., Any], settings: _Settings) -> None:
        self.func = func
        self.settings = settings
        self.name = getattr(func, "__qualname__", None) or repr(func)
        self.attr = getattr(func, "__name__", "")
        self.signature = inspect.signature(func)
        self.params = list(self.signature.parameters.values())
        self.streaming = inspect.isasyncgenfunction(func)
        self.wrapper: Callable[..., Any] | None = None
        self._queues: anyio.lowlevel.RunVar[dict[int, tuple[Any, _BatchQueue]]] = (
            anyio.lowlevel.RunVar(f"trioserve.batch:{self.name}")
        )

    # ---- settings (Ray Serve's names)

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Batches formed from now on take at most ``new_max_batch_size`` requests."""
        self.settings.max_batch_size = _checked_max_batch_size(new_max_batch_size)

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Batches formed from now on wait at most ``new_batch_wait_timeout_s``."""
        self.settings.batch_wait_timeout_s = _checked_batch_wait_timeout_s(new_batch_wait_timeout_s)

    def get_max_batch_size(self) -> int:
        return self.settings.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.settings.batch_wait_timeout_s

    # ---- callers

    def enqueue(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_BatchQueue, Any]:
        """Queue one call (arguments checked against the signature now)."""
        bound = self.signature.bind(*args, **kwargs)
        owner = self._owner(args)
        arguments = dict(bound.arguments)
        params = self.params
        if owner is not None:
            del arguments[params[0].name]
            params = params[1:]
        item = None
        if params:
            first = params[0]
            item = arguments.get(first.name, first.default)
        kind = _StreamCall if self.streaming else _Call
        request = kind(owner, arguments, item, _request.get().multiplexed_model_id)
        queue = self._queue(owner)
        queue.put(request)
        return queue, request

    def _owner(self, args: tuple[Any, ...]) -> object:
        """The ``self`` of a method call; None for a call of a plain function."""
        if not args or not self.params:
            return None
        for klass in type(args[0]).__mro__:
            found = vars(klass).get(self.attr)
            if found is not None and (
                found is self.wrapper or getattr(found, "__wrapped__", None) is self.wrapper
            ):
                return args[0]
        return None

    def _queue(self, owner: object) -> _BatchQueue:
        try:
            queues = self._queues.get()
        except LookupError:
            queues = {}
            self._queues.set(queues)
        key = id(owner)
        entry = queues.get(key)
        if entry is not None and _referent(entry[0]) is owner:
            return entry[1]
        queue = _BatchQueue(self)
        queues[key] = (_reference(owner, queues, key), queue)
        return queue

    # ---- running a batch

    def arguments_of(self, owner: object, requests: Sequence[_Request]) -> tuple[Any, Any]:
        """The positional and keyword arguments of one call on ``requests``."""
        batched: collections.OrderedDict[str, Any] = collections.OrderedDict()
        params = self.params
        if owner is not None:
            batched[params[0].name] = owner
            params = params[1:]
        for p in params:
            if not any(p.name in r.arguments for r in requests):
                continue  # no caller passed it: the function's default applies
            if p.kind is p.VAR_POSITIONAL:
                rows = [r.arguments.get(p.name, ()) for r in requests]
                if len({len(row) for row in rows}) != 1:
                    raise TypeError(
                        f"@serve.batch {self.name}: the requests of a batch must pass the "
                        f"same number of positional arguments"
                    )
                batched[p.name] = tuple(list(column) for column in zip(*rows, strict=True))
            elif p.kind is p.VAR_KEYWORD:
                dicts = [r.arguments.get(p.name, {}) for r in requests]
                if len({frozenset(d) for d in dicts}) != 1:
                    raise TypeError(
                        f"@serve.batch {self.name}: the requests of a batch must pass the "
                        f"same keyword arguments"
                    )
                batched[p.name] = {key: [d[key] for d in dicts] for key in dicts[0]}
            else:
                batched[p.name] = [r.arguments.get(p.name, p.default) for r in requests]
        bound = inspect.BoundArguments(self.signature, batched)
        return bound.args, bound.kwargs

    def check(self, results: Any, expected: int) -> Any:
        """``results`` if it holds one result per request; raises otherwise."""
        try:
            length = len(results)
        except TypeError:
            raise TypeError(
                f"@serve.batch {self.name} must return a list with one result per request, "
                f"not {type(results).__name__}"
            ) from None
        if length != expected:
            raise RayServeException(
                "Batched function doesn't preserve batch size. "
                f"The input list has length {expected} but the returned list has length "
                f"{length}."
            )
        return results

    async def call(self, requests: list[_Request]) -> None:
        args, kwargs = self.arguments_of(requests[0].owner, requests)
        if not self.streaming:
            results = self.check(await self.func(*args, **kwargs), len(requests))
            for r, value in zip(requests, results, strict=True):
                assert isinstance(r, _Call)
                r.resolve(value)
            return
        streams = [r for r in requests if isinstance(r, _StreamCall)]
        outputs = self.func(*args, **kwargs)
        try:
            async for step in outputs:
                for r, value in zip(streams, self.check(step, len(streams)), strict=True):
                    if _is_stop(value):
                        r.finish()
                    else:
                        r.emit(value)
                if all(r.finished or r.gone for r in streams):
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
        for r in streams:
            r.finish()


def _reference(owner: object, queues: dict[int, Any], key: int) -> Any:
    """A reference to ``owner`` that drops its queue when ``owner`` is collected."""
    if owner is None:
        return None

    def forget(ref: Any) -> None:
        entry = queues.get(key)
        if entry is not None and entry[0] is ref:
            del queues[key]

    try:
        return weakref.ref(owner, forget)
    except TypeError:  # no weak references (``__slots__``): the queue keeps it alive
        return _Strong(owner)


class _Strong:
    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj


def _referent(ref: Any) -> object:
    if ref is None:
        return None
    if isinstance(ref, _Strong):
        return ref.obj
    return ref()


def _decorate(func: Callable[..., Any], settings: _Settings) -> Any:
    _check_function(func)
    # Each decorated function has its own settings, even when one
    # ``serve.batch(...)`` decorator is applied to several.
    batcher = _Batcher(
        func,
        _Settings(
            settings.max_batch_size,
            settings.batch_wait_timeout_s,
            settings.max_concurrent_batches,
            settings.batch_size_fn,
        ),
    )
    wrapper: Callable[..., Any]
    if batcher.streaming:

        @functools.wraps(func)
        async def stream_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            queue, request = batcher.enqueue(args, kwargs)
            try:
                async for output in request.receive:
                    if isinstance(output, _Failure):
                        raise output.error
                    yield output
            finally:
                request.receive.close()
                queue.withdraw(request)

        wrapper = stream_wrapper
    else:

        @functools.wraps(func)
        async def batch_wrapper(*args: Any, **kwargs: Any) -> Any:
            queue, request = batcher.enqueue(args, kwargs)
            try:
                return await request.result()
            finally:
                queue.withdraw(request)

        wrapper = batch_wrapper
    batcher.wrapper = wrapper
    vars(wrapper).update(
        set_max_batch_size=batcher.set_max_batch_size,
        set_batch_wait_timeout_s=batcher.set_batch_wait_timeout_s,
        _get_max_batch_size=batcher.get_max_batch_size,
        _get_batch_wait_timeout_s=batcher.get_batch_wait_timeout_s,
    )
    return wrapper


# --------------------------------------------------------------------------- the decorator


@overload
def batch(_func: Callable[..., Any], /) -> Any: ...


@overload
def batch(
    _func: None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: BatchSizeFn | None = None,
) -> Callable[[Callable[..., Any]], Any]: ...


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: BatchSizeFn | None = None,
) -> Any:
    """Ray Serve's ``@serve.batch``: run an ``async def`` function on batches of calls.

    Bare (``@serve.batch``) or with options, on an ``async def`` function or
    method, or an ``async def`` generator (streaming). See the module
    documentation for how batches form, what callers get and where queues live.

    Args:
        max_batch_size: the most requests in one batch (10).
        batch_wait_timeout_s: how long a batch waits for ``max_batch_size``
            requests after its oldest request arrived (0.01).
        max_concurrent_batches: the most batches running at once (1).
        batch_size_fn: measures a batch (given the first argument of each
            request) when the number of requests is not the right measure.

    Raises ``TypeError`` for a function that is not ``async def`` and for
    option values of the wrong type, ``ValueError`` for ``max_batch_size < 1``
    and ``batch_wait_timeout_s < 0``, with Ray Serve's messages.

    The decorated function has ``set_max_batch_size(n)`` and
    ``set_batch_wait_timeout_s(t)``.
    """
    if _func is not None:
        _check_function(_func)
    settings = _Settings(
        _checked_max_batch_size(max_batch_size),
        _checked_batch_wait_timeout_s(batch_wait_timeout_s),
        _checked_max_concurrent_batches(max_concurrent_batches),
        _checked_batch_size_fn(batch_size_fn),
    )
    if _func is not None:
        return _decorate(_func, settings)
    return functools.partial(_decorate, settings=settings)
