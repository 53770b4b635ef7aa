"""One background trio loop per process, for code that has no event loop of its own.

A plain synchronous script calls ``serve.run`` and ``handle.remote().result()``;
the embedded controller and the handles' routers of such a script run on this
loop, in a daemon thread started on first use. Sync code hands it work with
:func:`run` (wait for the result) or :func:`submit` (get a future).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

__all__ = ["in_async_context", "is_loop_thread", "run", "submit", "thread_ident", "token"]

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
    with _lock:
        if _token is None:
            ready: concurrent.futures.Future[trio.lowlevel.TrioToken] = concurrent.futures.Future()
            _thread = threading.Thread(
                target=_main, args=(ready,), name="trioserve-loop", daemon=True
            )
            _thread.start()
            _token = ready.result()
        return _token


def thread_ident() -> int:
    """The background loop thread's ident (starting the loop on first use)."""
    token()
    assert _thread is not None and _thread.ident is not None
    return _thread.ident


def is_loop_thread() -> bool:
    """True in the background loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def in_async_context() -> bool:
    """True when the calling thread runs an event loop (asyncio or trio) right now."""
    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        pass
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


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
