"""The event log: an append-only, gapless, hash-chained log of events in SQL.

* :class:`EventLog` - synchronous; open with ``EventLog.open(url_or_path)``.
* :class:`AsyncEventLog` - the same operations as ``async`` methods (anyio: trio
  or asyncio), run in one worker thread, or inline under simulated time.
* :class:`StoredEvent` - an event as stored (seq, kind, version, payload, chain),
  decoded lazily through ``.event``.
* :class:`ChainReport` - what :meth:`EventLog.verify_chain` found.
* :class:`StoreError`, :class:`SchemaError` - the log cannot be used; a newer
  schema than :data:`SCHEMA_VERSION`.

See ``trioserve/store/log.py`` for the guarantees and the hash-chain framing.
"""

from trioserve.store.aio import AsyncEventLog
from trioserve.store.log import (
    SCHEMA_VERSION,
    ChainReport,
    EventLog,
    SchemaError,
    StoredEvent,
    StoreError,
)

__all__ = [
    "SCHEMA_VERSION",
    "AsyncEventLog",
    "ChainReport",
    "EventLog",
    "SchemaError",
    "StoreError",
    "StoredEvent",
]
