"""The event log for async code: :class:`AsyncEventLog`, written against anyio.

In production every call runs :class:`~trioserve.store.log.EventLog`'s method
in a worker thread, one at a time (a single ``anyio.CapacityLimiter(1)``: one
writer), so a slow ``fsync`` never blocks the event loop. Under simulated time,
``threaded=False`` calls the methods inline instead, because a thread would let
a mock clock jump while the loop looks idle; each call is then atomic with
respect to other tasks (it has no checkpoint).

Cancellation: a call cancelled while waiting for its turn does nothing; once
its thread has started, the operation runs to completion (an append is then
either fully stored or, on error, not at all) and the cancellation is delivered
afterwards.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Final, Self, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy.engine import URL

from trioserve.core.events import Event
from trioserve.store.log import ChainReport, EventLog, StoredEvent

__all__ = ["AsyncEventLog"]

T = TypeVar("T")

_ASYNC_CHUNK: Final = 2048


class AsyncEventLog:
    """The operations of :class:`EventLog` as ``async`` methods.

    Create it with :meth:`open`, or wrap an open :class:`EventLog`. Works under
    trio and asyncio. Closing it closes the wrapped log.
    """

    def __init__(self, log: EventLog, *, threaded: bool = True) -> None:
        """Wrap ``log``; ``threaded=False`` runs calls inline (for simulated time)."""
        self._log = log
        self._threaded = threaded
        self._limiter: anyio.CapacityLimiter | None = None

    @classmethod
    async def open(
        cls,
        url_or_path: str | os.PathLike[str] | URL,
        *,
        create: bool = True,
        threaded: bool = True,
    ) -> AsyncEventLog:
        """Open a log as :meth:`EventLog.open` does, off the event loop if ``threaded``."""
        opener = functools.partial(EventLog.open, url_or_path, create=create)
        log = await anyio.to_thread.run_sync(opener) if threaded else opener()
        return cls(log, threaded=threaded)

    @property
    def sync(self) -> EventLog:
        """The wrapped synchronous log (do not call it from the event loop in production)."""
        return self._log

    @property
    def threaded(self) -> bool:
        """Whether calls run in a worker thread (``True``) or inline."""
        return self._threaded

    @property
    def instance_id(self) -> str:
        """See :attr:`EventLog.instance_id`."""
        return self._log.instance_id

    @property
    def where(self) -> str:
        """See :attr:`EventLog.where`."""
        return self._log.where

    async def _call(self, fn: Callable[[], T]) -> T:
        if not self._threaded:
            return fn()
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    async def append(self, events: Iterable[Event], *, durable: bool = True) -> list[StoredEvent]:
        """See :meth:`EventLog.append`. ``events`` is consumed before the call returns."""
        batch = list(events)
        return await self._call(functools.partial(self._log.append, batch, durable=durable))

    def read(self, after: int = 0, upto: int | None = None) -> AsyncIterator[StoredEvent]:
        """Iterate over events ``after < seq <= upto`` as :meth:`EventLog.read` does.

        ``upto=None`` means the last event committed when iteration begins.
        Chunks are fetched (one call each) as the iteration proceeds.
        """
        return _AsyncReader(self, after, upto)

    async def last_seq(self) -> int:
        """See :meth:`EventLog.last_seq`."""
        return await self._call(self._log.last_seq)

    async def count(self) -> int:
        """See :meth:`EventLog.count`."""
        return await self._call(self._log.count)

    async def put_blob(self, data: bytes) -> str:
        """See :meth:`EventLog.put_blob`."""
        return await self._call(functools.partial(self._log.put_blob, bytes(data)))

    async def get_blob(self, digest: str) -> bytes:
        """See :meth:`EventLog.get_blob`."""
        return await self._call(functools.partial(self._log.get_blob, digest))

    async def has_blob(self, digest: str) -> bool:
        """See :meth:`EventLog.has_blob`."""
        return await self._call(functools.partial(self._log.has_blob, digest))

    async def write_snapshot(self, seq: int, state: bytes, *, durable: bool = True) -> None:
        """See :meth:`EventLog.write_snapshot`."""
        await self._call(
            functools.partial(self._log.write_snapshot, seq, bytes(state), durable=durable)
        )

    async def latest_snapshot(self, upto: int | None = None) -> tuple[int, bytes] | None:
        """See :meth:`EventLog.latest_snapshot`."""
        return await self._call(functools.partial(self._log.latest_snapshot, upto))

    async def snapshot_seqs(self) -> list[int]:
        """See :meth:`EventLog.snapshot_seqs`."""
        return await self._call(self._log.snapshot_seqs)

    async def verify_chain(self) -> ChainReport:
        """See :meth:`EventLog.verify_chain`."""
        return await self._call(self._log.verify_chain)

    async def aclose(self) -> None:
        """Close the wrapped log, after any call already running in a thread."""
        await self._call(self._log.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    def __repr__(self) -> str:
        mode = "threaded" if self._threaded else "inline"
        return f"<AsyncEventLog {self._log.where} ({mode})>"


class _AsyncReader:
    """The async iterator behind :meth:`AsyncEventLog.read`: one call per chunk."""

    def __init__(self, log: AsyncEventLog, after: int, upto: int | None) -> None:
        self._log = log
        self._after = after
        self._upto = upto
        self._buffer: collections.deque[StoredEvent] = collections.deque()
        self._done = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StoredEvent:
        if not self._buffer:
            if self._done:
                raise StopAsyncIteration
            if self._upto is None:
                self._upto = await self._log.last_seq()
            if self._after >= self._upto:
                self._done = True
                raise StopAsyncIteration
            sync = self._log.sync
            chunk = await self._log._call(
                functools.partial(sync._read_chunk, self._after, self._upto, _ASYNC_CHUNK)
            )
            if not chunk:
                self._done = True
                raise StopAsyncIteration
            self._after = chunk[-1].seq
            self._buffer.extend(chunk)
        return self._buffer.popleft()
