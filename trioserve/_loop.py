"""Background event loops for code that has no event loop of its own.

A plain synchronous script calls ``serve.run`` and ``handle.remote().result()``.

* The embedded controller and the API calls of such a script run on one
  background trio loop, in a daemon thread started on first use. Sync code
  hands it work with :func:`run` (wait for the result) or :func:`submit`
  (get a future).
* The requests that synchronous code sends through handles run on a second
  background loop, :func:`handle_loop`: asyncio, with uvloop when it is
  installed, also started on first use. Every such request costs two thread
  switches (there and back), and that loop makes them and the request itself
  cheaper than the trio loop does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

__all__ = [
    "handle_loop",
    "in_async_context",
    "is_loop_thread",
    "run",
    "submit",
    "thread_ident",
    "token",
]

T = TypeVar("T")

_lock = threading.Lock()
_token: trio.lowlevel.TrioToken | None = None
_thread: threading.Thread | None = None


def _main(ready: concurrent.futures.Future[trio.lowlevel.TrioToken]) -> None:
    async def serve_forever() -> None:
        ready.set_result(trio.lowlevel.current_trio_token())
        await trio.sleep_forever()

    trio.run(serve_forever)


def token() -> trio.lowlevel.TrioToken:
    """The background loop's token, starting the loop on first use."""
    global _token, _thread
    if _token is not None:  # the loop runs until the process exits
        return _token
    with _lock:
        if _token is None:
            ready: concurrent.futures.Future[trio.lowlevel.TrioToken] = concurrent.futures.Future()
            _thread = threading.Thread(
                target=_main, args=(ready,), name="trioserve-loop", daemon=True
            )
            _thread.start()
            _token = ready.result()
        return _token


_handle_loop: tuple[asyncio.AbstractEventLoop, int] | None = None


def _new_asyncio_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_handle_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def handle_loop() -> tuple[asyncio.AbstractEventLoop, int]:
    """The background asyncio loop of synchronous handle callers, and its thread's
    ident; started on first use, it runs until the process exits."""
    global _handle_loop
    if _handle_loop is not None:
        return _handle_loop
    with _lock:
        if _handle_loop is None:
            loop = _new_asyncio_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_run_handle_loop, args=(loop, ready), name="trioserve-handles", daemon=True
            )
            thread.start()
            ready.wait()
            assert thread.ident is not None
            _handle_loop = (loop, thread.ident)
        return _handle_loop


def thread_ident() -> int:
    """The background loop thread's ident (starting the loop on first use)."""
    if _token is None:
        token()
    assert _thread is not None and _thread.ident is not None
    return _thread.ident


def is_loop_thread() -> bool:
    """True in the background loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def _in_trio_run_fallback() -> bool:  # trio < 0.26 has no trio.lowlevel.in_trio_run
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


_in_trio_run: Callable[[], bool] = getattr(trio.lowlevel, "in_trio_run", _in_trio_run_fallback)


def in_async_context() -> bool:
    """True when the calling thread runs an event loop (asyncio or trio) right now."""
    # Both checks are cheap and raise nothing: sync handle calls make this check on every call.
    return _in_trio_run() or asyncio._get_running_loop() is not None


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await fn(*args)`` on the background loop and return its result.

    Must not be called from the background loop itself.
    """
    return trio.from_thread.run(fn, *args, trio_token=token())


def submit(fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
    """Start ``await fn(*args)`` on the background loop as a system task.

    Returns a future of its outcome. The task must finish by itself (or be
    cancelled through means ``fn`` provides): nothing waits for it.
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    async def task() -> None:
        try:
            result = await fn(*args)
        except BaseException as exc:  # delivered to the future, never to trio
            future.set_exception(exc)
        else:
            future.set_result(result)

    def spawn() -> None:
        trio.lowlevel.spawn_system_task(task)

    token().run_sync_soon(spawn)
    return future
