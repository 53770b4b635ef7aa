"""The event log's tables, as SQLAlchemy Core metadata.

Schema 1:

* ``events(seq, at, kind, version, payload, chain)``: one row per event, ``seq``
  gapless from 1; ``payload`` is the codec's msgpack bytes; ``chain`` the hash
  chain (see :func:`trioserve.store.log.chain_hash`); ``at`` a copy of the
  event's ``at`` for queries by time.
* ``snapshots(seq, state)``: the state after event ``seq``, opaque bytes.
* ``blobs(digest, data)``: content-addressed bytes; ``digest`` is SHA-256 hex.
* ``meta(key, value)``: ``schema_version`` and ``instance_id``.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Double, Integer, LargeBinary, MetaData, Table, Text
from sqlalchemy.dialects.sqlite import REAL
from sqlalchemy.types import TypeEngine

__all__ = ["SCHEMA_VERSION", "blobs", "events", "meta", "metadata", "snapshots"]

SCHEMA_VERSION = 1
"""The schema this code writes, and the newest it reads."""

metadata = MetaData()

# A 64-bit float everywhere: REAL on SQLite, DOUBLE PRECISION on PostgreSQL.
_Seconds: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")
# A 64-bit seq: BIGINT elsewhere, but exactly INTEGER on SQLite, where an
# INTEGER PRIMARY KEY is the rowid (the fastest possible lookups by seq).
_Seq: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")

# ``seq`` is assigned by the writer (last + 1 inside the write transaction),
# never by the database, so there is no AUTOINCREMENT and no sequence.
events = Table(
    "events",
    metadata,
    Column("seq", _Seq, primary_key=True, autoincrement=False),
    Column("at", _Seconds, nullable=False),
    Column("kind", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("chain", LargeBinary, nullable=False),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("seq", _Seq, primary_key=True, autoincrement=False),
    Column("state", LargeBinary, nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("digest", Text, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)
