"""The event log: an append-only, gapless, hash-chained sequence of events.

:class:`EventLog` keeps the controller's events in a SQL database through
SQLAlchemy Core (SQLite by default; the URL is a setting). Its promises:

* **Gapless, strictly increasing sequence numbers.** The first event is seq 1;
  each append assigns ``last + 1, last + 2, ...`` inside one write transaction
  (``BEGIN IMMEDIATE`` on SQLite), so concurrent writers, even in other
  processes, never interleave or skip numbers.
* **Atomic batches.** :meth:`EventLog.append` stores all of its events or none;
  a reader never sees part of a batch, even if the writer is killed mid-way.
* **Durability.** With ``durable=True`` (the default) an append has reached the
  disk when it returns (``PRAGMA synchronous=FULL`` in WAL mode).
* **Tamper evidence.** Every event carries ``chain``, a SHA-256 over the previous
  event's chain and this event's kind, version and payload (see
  :func:`chain_hash`); :meth:`EventLog.verify_chain` recomputes it.
* **Never misreading.** A log written by a newer schema is refused with
  :class:`SchemaError`; a file that is not a trioserve log is refused with
  :class:`StoreError` and left untouched.

The store knows events only through the codec in :mod:`trioserve.core.events`
(``encode`` / ``decode``); snapshots and blobs are opaque bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import secrets
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from trioserve.core.events import Event, decode, encode
from trioserve.store import _schema
from trioserve.store._schema import SCHEMA_VERSION

__all__ = [
    "BUSY_TIMEOUT_S",
    "GENESIS_CHAIN",
    "SCHEMA_VERSION",
    "ChainReport",
    "EventLog",
    "SchemaError",
    "StoreError",
    "StoredEvent",
    "chain_hash",
]

GENESIS_CHAIN: Final = bytes(32)
"""The chain value that "event 0" would have: the first event chains onto it."""

BUSY_TIMEOUT_S: Final = 30.0
"""How long a SQLite connection waits for another process's write lock."""

_CHUNK: Final = 4096
_MAX_SEQ: Final = 2**62

# Connection execution options read by the SQLite ``begin`` hook.
_BEGIN_OPTION: Final = "trioserve_begin"  # "IMMEDIATE" (default) or "DEFERRED"
_SYNC_OPTION: Final = "trioserve_synchronous"  # "FULL" or "NORMAL"
_SYNC_INFO_KEY: Final = "trioserve_synchronous"  # current setting, per DBAPI connection

_READ_CHUNK_SQL: Final = (
    "SELECT seq, at, kind, version, payload, chain FROM events "
    "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)
_INSERT_SQL: Final = (
    "INSERT INTO events (seq, at, kind, version, payload, chain) VALUES (?, ?, ?, ?, ?, ?)"
)


class StoreError(Exception):
    """The event log cannot be opened or used; the message names the log."""


class SchemaError(StoreError):
    """The log's schema is newer than this trioserve can read."""


def chain_hash(previous: bytes, kind: str, version: int, payload: bytes) -> bytes:
    """Return the chain value of an event, given the previous event's chain.

    The hashed bytes are framed so that no two different events hash the same
    input::

        SHA-256( previous                 32 bytes (GENESIS_CHAIN for seq 1)
               | u32be(len(K)) | K         K = kind encoded as UTF-8
               | u32be(version)
               | u64be(len(P)) | P )       P = payload

    Raises :class:`struct.error` for a version outside ``0 .. 2**32 - 1``.
    """
    k = kind.encode("utf-8")
    head = struct.pack(">I", len(k)) + k + struct.pack(">IQ", version, len(payload))
    return hashlib.sha256(previous + head + payload).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as stored: its sequence number and the codec's bytes.

    ``event`` decodes the payload on first access (upcasting old versions) and
    keeps the result, so reading raw rows costs no decoding.
    """

    seq: int
    at: float
    kind: str
    version: int
    payload: bytes
    chain: bytes
    _event: Event | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    @property
    def event(self) -> Event:
        """The decoded event.

        Raises :class:`trioserve.core.events.EventVersionError` if the event was
        written by a newer version of its kind, and
        :class:`trioserve.core.events.EventDecodeError` if it cannot be decoded.
        """
        event = self._event
        if event is None:
            event = decode(self.kind, self.version, self.payload)
            object.__setattr__(self, "_event", event)
        return event


@dataclasses.dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of :meth:`EventLog.verify_chain`.

    ``checked`` counts the events that passed before the first problem (all of
    them when ``ok``). ``first_bad_seq`` is the seq of the first event that is
    missing, altered or undecodable (or of a snapshot that refers to a missing
    event), ``None`` when ``ok`` or when the problem is not about one seq.
    ``problem`` explains it in a sentence; it is empty when ``ok``.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: str


# ------------------------------------------------------------------- SQLite hooks


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy's ``begin`` hook emit BEGIN itself (pysqlite's own
    # transaction handling would emit a deferred BEGIN only before DML).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()
    connection_record.info[_SYNC_INFO_KEY] = "FULL"


def _on_sqlite_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    sync = options.get(_SYNC_OPTION)
    if sync is not None and conn.info.get(_SYNC_INFO_KEY) != sync:
        conn.exec_driver_sql(f"PRAGMA synchronous = {sync}")
        conn.info[_SYNC_INFO_KEY] = sync
    if options.get(_BEGIN_OPTION) == "DEFERRED":
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _resolve(url_or_path: str | os.PathLike[str] | URL) -> URL:
    if isinstance(url_or_path, URL):
        return url_or_path
    text = os.fspath(url_or_path)
    if "://" in text:
        return make_url(text)
    path = Path(text).expanduser()
    return URL.create("sqlite", database=str(path))


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for other databases and memory."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _describe(url: URL) -> str:
    path = _sqlite_file(url)
    if path is not None:
        return str(path)
    return url.render_as_string(hide_password=True)


# ------------------------------------------------------------------------ EventLog


class EventLog:
    """A synchronous handle on one event log. Create it with :meth:`open`.

    Methods may be called from any thread (each call checks a connection out
    of SQLAlchemy's pool); an in-memory SQLite log (``sqlite://``) shares one
    connection and must be used from one thread at a time.
    """

    def __init__(self, engine: Engine, *, where: str, instance_id: str) -> None:
        """Wrap an engine whose database :meth:`open` has validated; use :meth:`open`."""
        self._engine: Engine | None = engine
        self._where = where
        self._instance_id = instance_id
        self._sqlite = engine.dialect.name == "sqlite"

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str] | URL, *, create: bool = True) -> EventLog:
        """Open the log at a SQLAlchemy URL or a filesystem path.

        A path (anything without ``://``) means ``sqlite:///<path>``. With
        ``create=True`` a missing database, and its parent folder, is created
        with empty tables and a new random ``instance_id``; with
        ``create=False`` a missing log raises :class:`StoreError`.

        Raises :class:`SchemaError` if the log was written by a newer schema,
        and :class:`StoreError` if the database is not a trioserve log (which
        is then left unmodified) or cannot be opened.
        """
        url = _resolve(url_or_path)
        where = _describe(url)
        path = _sqlite_file(url)
        if path is not None:
            if path.is_dir():
                raise StoreError(f"cannot open the event log at {where}: it is a folder")
            if not path.exists():
                if not create:
                    raise StoreError(f"there is no event log at {where}")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(
                        f"cannot create the folder for the event log at {where}: {exc}"
                    ) from exc

        if url.get_backend_name() == "sqlite":
            # An in-memory database lives only as long as its one connection.
            in_memory = url.database in (None, "", ":memory:") or "mode=memory" in str(url)
            engine = sa.create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
                **({"poolclass": StaticPool} if in_memory else {}),
            )
            sa_event.listen(engine, "connect", _on_sqlite_connect)
            sa_event.listen(engine, "begin", _on_sqlite_begin)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)

        try:
            instance_id = _prepare(engine, where, create=create)
            if path is not None:
                _enable_wal(engine, where)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, where=where, instance_id=instance_id)

    @property
    def instance_id(self) -> str:
        """Random hex made once when the log was created; names the instance."""
        return self._instance_id

    @property
    def where(self) -> str:
        """The log's file path (SQLite) or URL with any password hidden."""
        return self._where

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._engine is None

    def close(self) -> None:
        """Release all connections. Idempotent; later calls raise :class:`StoreError`."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<EventLog {self._where} ({state})>"

    # ------------------------------------------------------------------- events

    def append(self, events: Iterable[Event], *, durable: bool = True) -> list[StoredEvent]:
        """Store ``events`` in order, in one transaction, and return them as stored.

        Their seqs continue the log without a gap. Either all of them are
        stored or, if this raises, none. With ``durable=True`` they are on disk
        when this returns; ``durable=False`` (SQLite ``synchronous=NORMAL``) may
        lose the last commits on power loss, but never leaves a partial batch.
        An empty ``events`` stores nothing and returns ``[]``.
        """
        encoded = [(float(e.at), *encode(e)) for e in events]
        if not encoded:
            return []
        with self._writing(durable=durable) as conn:
            row = conn.execute(
                sa.select(_schema.events.c.seq, _schema.events.c.chain)
                .order_by(_schema.events.c.seq.desc())
                .limit(1)
            ).first()
            seq, previous = (0, GENESIS_CHAIN) if row is None else (int(row[0]), bytes(row[1]))
            stored: list[StoredEvent] = []
            for at, kind, version, payload in encoded:
                seq += 1
                previous = chain_hash(previous, kind, version, payload)
                stored.append(StoredEvent(seq, at, kind, version, payload, previous))
            if self._sqlite:
                # Straight to the driver's executemany: SQLAlchemy's per-row
                # parameter processing would cost more than the insert itself.
                conn.exec_driver_sql(
                    _INSERT_SQL,
                    [(s.seq, s.at, s.kind, s.version, s.payload, s.chain) for s in stored],
                )
            else:
                conn.execute(
                    sa.insert(_schema.events),
                    [
                        {
                            "seq": s.seq,
                            "at": s.at,
                            "kind": s.kind,
                            "version": s.version,
                            "payload": s.payload,
                            "chain": s.chain,
                        }
                        for s in stored
                    ],
                )
        return stored

    def read(self, after: int = 0, upto: int | None = None) -> Iterator[StoredEvent]:
        """Iterate over the events with ``after < seq <= upto``, in seq order.

        ``upto=None`` means the last event committed when ``read`` is called:
        events appended later are not included, so a read is always a
        consistent prefix of the log, never part of a batch. Rows are fetched
        in chunks, not all at once. Raises :class:`StoreError` if a seq in the
        range is missing (a damaged log; see :meth:`verify_chain`).
        """
        bound = self.last_seq() if upto is None else upto
        return self._iterate(after, bound)

    def _iterate(self, after: int, upto: int) -> Iterator[StoredEvent]:
        while after < upto:
            chunk = self._read_chunk(after, upto, _CHUNK)
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].seq

    def _read_chunk(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events after ``after`` (inclusive of ``upto``), checked gapless."""
        chunk = [StoredEvent(*row) for row in self._fetch_rows(after, upto, limit)]
        if chunk and chunk[-1].seq - after != len(chunk):
            expected = after + 1
            for stored in chunk:
                if stored.seq != expected:
                    break
                expected += 1
            raise StoreError(
                f"the event log at {self._where} is damaged: event seq {expected} is missing; "
                "run `trioserve log verify` for details"
            )
        return chunk

    def _fetch_rows(self, after: int, upto: int, limit: int) -> list[tuple[Any, ...]]:
        engine = self._live()
        if self._sqlite:
            # Raw DBAPI cursor: one autocommit SELECT is one consistent snapshot,
            # and skips SQLAlchemy's row layer on the replay path.
            try:
                raw = engine.raw_connection()
                try:
                    cursor = raw.cursor()
                    cursor.execute(_READ_CHUNK_SQL, (after, upto, limit))
                    rows = cursor.fetchall()
                    cursor.close()
                finally:
                    raw.close()
            except (sqlite3.Error, sa.exc.DBAPIError) as exc:
                raise self._error("read", exc) from exc
            return rows  # type: ignore[return-value]
        t = _schema.events
        with self._reading() as conn:
            result = conn.execute(
                sa.select(t.c.seq, t.c.at, t.c.kind, t.c.version, t.c.payload, t.c.chain)
                .where(t.c.seq > after, t.c.seq <= upto)
                .order_by(t.c.seq)
                .limit(limit)
            )
            return [
                (seq, at, kind, version, bytes(payload), bytes(chain))
                for seq, at, kind, version, payload, chain in result
            ]

    def last_seq(self) -> int:
        """The seq of the last committed event; 0 for an empty log."""
        with self._reading() as conn:
            value = conn.execute(sa.select(sa.func.max(_schema.events.c.seq))).scalar()
        return 0 if value is None else int(value)

    def count(self) -> int:
        """The number of stored events (equal to :meth:`last_seq` in a sound log)."""
        with self._reading() as conn:
            value = conn.execute(sa.select(sa.func.count()).select_from(_schema.events)).scalar()
        return int(value or 0)

    # -------------------------------------------------------------------- blobs

    def put_blob(self, data: bytes) -> str:
        """Store bytes under their SHA-256 hex digest and return the digest.

        Idempotent: storing the same bytes again stores nothing new. The blob
        is durable when this returns.
        """
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        if self.has_blob(digest):
            return digest
        t = _schema.blobs
        with self._writing(durable=True) as conn:
            if conn.execute(sa.select(t.c.digest).where(t.c.digest == digest)).first() is None:
                conn.execute(sa.insert(t).values(digest=digest, data=data))
        return digest

    def get_blob(self, digest: str) -> bytes:
        """Return the bytes stored under ``digest``.

        Raises :class:`KeyError` if there is none, and :class:`StoreError` if
        the stored bytes no longer match their digest.
        """
        t = _schema.blobs
        with self._reading() as conn:
            data = conn.execute(sa.select(t.c.data).where(t.c.digest == digest)).scalar()
        if data is None:
            raise KeyError(f"no blob with digest {digest!r} in the event log at {self._where}")
        data = bytes(data)
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(
                f"the event log at {self._where} is damaged: "
                f"blob {digest} does not match its digest"
            )
        return data

    def has_blob(self, digest: str) -> bool:
        """Whether bytes with this digest are stored."""
        t = _schema.blobs
        with self._reading() as conn:
            row = conn.execute(sa.select(t.c.digest).where(t.c.digest == digest)).first()
        return row is not None

    # ---------------------------------------------------------------- snapshots

    def write_snapshot(self, seq: int, state: bytes, *, durable: bool = True) -> None:
        """Store ``state`` as the state after event ``seq``, replacing any earlier one.

        The store does not look inside ``state``. Raises :class:`ValueError` if
        event ``seq`` is not in the log.
        """
        state = bytes(state)
        t = _schema.snapshots
        with self._writing(durable=durable) as conn:
            last = conn.execute(sa.select(sa.func.max(_schema.events.c.seq))).scalar() or 0
            if not 1 <= seq <= last:
                raise ValueError(
                    f"cannot snapshot at seq {seq}: the event log at {self._where} holds seqs "
                    f"1..{last}"
                )
            conn.execute(sa.delete(t).where(t.c.seq == seq))
            conn.execute(sa.insert(t).values(seq=seq, state=state))

    def latest_snapshot(self, upto: int | None = None) -> tuple[int, bytes] | None:
        """The snapshot with the highest seq (at most ``upto``), as ``(seq, state)``.

        ``None`` if there is no such snapshot.
        """
        t = _schema.snapshots
        query = sa.select(t.c.seq, t.c.state).order_by(t.c.seq.desc()).limit(1)
        if upto is not None:
            query = query.where(t.c.seq <= upto)
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def snapshot_seqs(self) -> list[int]:
        """The seqs of all stored snapshots, ascending."""
        t = _schema.snapshots
        with self._reading() as conn:
            return [int(s) for s in conn.execute(sa.select(t.c.seq).order_by(t.c.seq)).scalars()]

    # ------------------------------------------------------------- verification

    def verify_chain(self) -> ChainReport:
        """Check the whole log from seq 1 and report the first problem.

        Checks, in order: every seq from 1 is present; every event's chain
        matches :func:`chain_hash` of the previous chain and its kind, version
        and payload; every event decodes (with upcasting) and its ``at``
        column matches the event; every snapshot refers to a stored event; and
        every blob matches its digest. Reads a consistent view only if no one
        appends meanwhile; appends after the start are checked as well.
        """
        previous = GENESIS_CHAIN
        expected = 1
        after = 0

        def bad(seq: int | None, problem: str) -> ChainReport:
            return ChainReport(ok=False, checked=expected - 1, first_bad_seq=seq, problem=problem)

        while True:
            rows = self._fetch_rows(after, _MAX_SEQ, _CHUNK)
            if not rows:
                break
            for seq, at, kind, version, payload, chain in rows:
                if seq != expected:
                    return bad(
                        expected,
                        f"event seq {expected} is missing (the next stored event is seq {seq})",
                    )
                try:
                    computed = chain_hash(previous, kind, version, payload)
                except Exception as exc:
                    return bad(seq, f"event seq {seq} has malformed kind/version/payload: {exc}")
                if computed != chain:
                    return bad(
                        seq,
                        f"event seq {seq}: the stored chain does not match its kind, version and "
                        "payload (the event or its chain was altered)",
                    )
                try:
                    event = decode(kind, version, payload)
                except Exception as exc:
                    return bad(seq, f"event seq {seq} cannot be decoded: {exc}")
                if not _same_time(event.at, at):
                    return bad(
                        seq,
                        f"event seq {seq}: the at column ({at!r}) differs from the event's "
                        f"at ({event.at!r})",
                    )
                previous = chain
                expected += 1
            after = int(rows[-1][0])
        last = expected - 1

        for snapshot_seq in self.snapshot_seqs():
            if not 1 <= snapshot_seq <= last:
                return bad(
                    snapshot_seq,
                    f"the snapshot at seq {snapshot_seq} refers to an event that is not in the "
                    f"log (the last seq is {last})",
                )

        for digest in self._damaged_blobs():
            return bad(None, f"blob {digest} does not match its digest")

        return ChainReport(ok=True, checked=last, first_bad_seq=None, problem="")

    def _damaged_blobs(self) -> Iterator[str]:
        t = _schema.blobs
        after = ""
        while True:
            with self._reading() as conn:
                rows = conn.execute(
                    sa.select(t.c.digest, t.c.data)
                    .where(t.c.digest > after)
                    .order_by(t.c.digest)
                    .limit(64)
                ).all()
            if not rows:
                return
            for digest, data in rows:
                if hashlib.sha256(bytes(data)).hexdigest() != digest:
                    yield str(digest)
            after = str(rows[-1][0])

    # ---------------------------------------------------------------- internals

    def _live(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise StoreError(f"the event log at {self._where} is closed")
        return engine

    def _error(self, action: str, exc: BaseException) -> StoreError:
        orig = getattr(exc, "orig", None) or exc
        return StoreError(f"cannot {action} the event log at {self._where}: {orig}")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection in a read transaction (deferred BEGIN: takes no write lock)."""
        engine = self._live()
        try:
            with engine.connect() as conn:
                conn.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
                yield conn
        except sa.exc.DBAPIError as exc:
            raise self._error("read", exc) from exc

    @contextlib.contextmanager
    def _writing(self, *, durable: bool) -> Iterator[Connection]:
        """A connection in a write transaction, committed when the block ends.

        On SQLite the transaction starts with BEGIN IMMEDIATE, so it holds the
        database's single write lock from the start and reads the true last seq.
        Elsewhere, the ``meta`` row is locked FOR UPDATE to serialize writers.
        """
        engine = self._live()
        try:
            with engine.connect() as conn:
                conn.execution_options(
                    **{_BEGIN_OPTION: "IMMEDIATE", _SYNC_OPTION: "FULL" if durable else "NORMAL"}
                )
                with conn.begin():
                    if not self._sqlite:
                        m = _schema.meta
                        conn.execute(
                            sa.select(m.c.value)
                            .where(m.c.key == "schema_version")
                            .with_for_update()
                        )
                    yield conn
        except sa.exc.DBAPIError as exc:
            raise self._error("write to", exc) from exc


def _same_time(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _prepare(engine: Engine, where: str, *, create: bool) -> str:
    """Check (and with ``create``, initialize) the database; return the instance id.

    Runs in one transaction that writes nothing unless the database is empty,
    so a foreign or newer database is left exactly as it was.
    """
    not_a_log = f"{where} is not a trioserve event log"
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE" if create else "DEFERRED"})
            with conn.begin():
                tables = set(sa.inspect(conn).get_table_names())
                if "meta" not in tables:
                    if tables:
                        raise StoreError(
                            f"{not_a_log}: it has tables ({', '.join(sorted(tables))}) but no "
                            "meta table; refusing to touch it"
                        )
                    if not create:
                        raise StoreError(f"{not_a_log}: the database is empty")
                    instance_id = secrets.token_hex(16)
                    _schema.metadata.create_all(conn)
                    conn.execute(
                        sa.insert(_schema.meta),
                        [
                            {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                            {"key": "instance_id", "value": instance_id},
                        ],
                    )
                    return instance_id
                m = _schema.meta
                values = {
                    str(k): str(v) for k, v in conn.execute(sa.select(m.c.key, m.c.value)).all()
                }
    except sa.exc.DBAPIError as exc:
        raise StoreError(f"{not_a_log}, or it cannot be opened: {exc.orig}") from exc

    raw_version = values.get("schema_version")
    if raw_version is None:
        raise StoreError(f"{not_a_log}: its meta table has no schema_version")
    try:
        version = int(raw_version)
    except ValueError:
        raise StoreError(
            f"{not_a_log}: its schema_version {raw_version!r} is not a number"
        ) from None
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the event log at {where} was written by a newer trioserve: it has schema version "
            f"{version}, and this trioserve reads schema versions up to {SCHEMA_VERSION}. "
            "Upgrade trioserve to open it (the log was not modified)."
        )
    if version < 1:
        raise StoreError(f"{not_a_log}: its schema_version {version} is invalid")
    missing = {t.name for t in _schema.metadata.sorted_tables} - tables
    if missing:
        raise StoreError(
            f"the event log at {where} is damaged: tables {', '.join(sorted(missing))} are missing"
        )
    existing_id = values.get("instance_id")
    if not existing_id:
        raise StoreError(f"the event log at {where} is damaged: its meta has no instance_id")
    return existing_id


def _enable_wal(engine: Engine, where: str) -> None:
    """Switch a SQLite file to WAL (persistent; a no-op if it already is)."""
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.fetchall()
            cursor.close()
        finally:
            raw.close()
    except (sqlite3.Error, sa.exc.DBAPIError) as exc:
        raise StoreError(f"cannot switch the event log at {where} to WAL mode: {exc}") from exc
