"""The event log (trioserve.store): what a user of the log can rely on."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pytest
import trio

from trioserve.core.events import (
    AppDeleted,
    Event,
    EventDecodeError,
    EventVersionError,
    ReplicaDrained,
    register,
    register_upcaster,
)
from trioserve.store import (
    SCHEMA_VERSION,
    AsyncEventLog,
    ChainReport,
    EventLog,
    SchemaError,
    StoredEvent,
    StoreError,
)
from trioserve.store.log import GENESIS_CHAIN, chain_hash

WRITER = Path(__file__).with_name("_writer.py")
DEADLINE_S = 60.0  # generous: only a broken log or a wedged child ever reaches it


def drained(n: int, start: int = 0) -> list[Event]:
    return [ReplicaDrained(at=float(start + i), replica=f"r{start + i}") for i in range(n)]


def check_prefix(events: list[StoredEvent]) -> None:
    """Assert the events are seqs 1..n and their chain is the hash chain from genesis."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    previous = GENESIS_CHAIN
    for e in events:
        assert e.chain == chain_hash(previous, e.kind, e.version, e.payload), e.seq
        previous = e.chain


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as an operator (or an older trioserve) would use."""
    return sqlite3.connect(path, isolation_level=None)


# --------------------------------------------------------------- writer process


class Writer:
    """A `_writer.py` child process and the seqs it reported as committed."""

    def __init__(self, db: Path, batch: int, mode: str = "durable", limit: int = 1_000_000):
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(db), str(batch), mode, str(limit)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.committed: list[int] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_commits(self, n: int) -> None:
        """Block until the child has reported at least ``n`` committed batches."""
        while len(self.committed) < n:
            try:
                line = self.lines.get(timeout=DEADLINE_S)
            except queue.Empty:
                pytest.fail("the writer process reported nothing for a minute")
            if line is None:
                assert self.proc.stderr is not None
                pytest.fail(f"the writer process ended early: {self.proc.stderr.read()}")
            self.committed.append(int(line))

    def kill(self) -> None:
        """SIGKILL the child, then collect every commit it reported before dying."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE_S)
        self._reader.join(timeout=DEADLINE_S)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.committed.append(int(line))
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for w in started:
        w.kill()


# ------------------------------------------------------------------------ tests


def test_append_and_read_back_then_continue_after_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "run" / "events.db"  # parent folders do not exist yet
    first = [AppDeleted(at=1.0, app="a"), ReplicaDrained(at=2.5, replica="r1")]
    with EventLog.open(db) as log:
        instance_id = log.instance_id
        assert log.last_seq() == 0 and log.count() == 0
        stored = log.append(first)
        assert [s.seq for s in stored] == [1, 2]
        assert log.append([]) == []
        back = list(log.read())
    assert back == stored
    assert [s.event for s in back] == first
    assert [(s.kind, s.version, s.at) for s in back] == [
        ("AppDeleted", 1, 1.0),
        ("ReplicaDrained", 1, 2.5),
    ]
    assert all(len(s.chain) == 32 for s in back)
    check_prefix(back)

    with EventLog.open(db, create=False) as log:
        assert log.instance_id == instance_id  # made once, at creation
        more = log.append(drained(3, start=10))
        assert [s.seq for s in more] == [3, 4, 5]
        assert log.last_seq() == 5 and log.count() == 5
        everything = list(log.read())
        assert [s.seq for s in log.read(after=2, upto=4)] == [3, 4]
        assert log.verify_chain() == ChainReport(ok=True, checked=5, first_bad_seq=None, problem="")
    check_prefix(everything)
    assert [s.event for s in everything] == [*first, *drained(3, start=10)]

    conn = sqlite_connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(conn.execute("SELECT key, value FROM meta")) == {
        "schema_version": str(SCHEMA_VERSION),
        "instance_id": instance_id,
    }
    conn.close()


def test_closed_log_refuses_calls_and_missing_log_is_not_created(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "events.db")
    log.close()
    log.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        log.append(drained(1))
    with pytest.raises(StoreError, match="no event log"):
        EventLog.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_read_is_the_log_as_of_the_call(tmp_path: Path) -> None:
    with EventLog.open(tmp_path / "events.db") as log:
        log.append(drained(3))
        reader = log.read()
        log.append(drained(2, start=3))
        assert [s.seq for s in reader] == [1, 2, 3]
        assert [s.seq for s in log.read(after=3)] == [4, 5]
        assert list(log.read(after=5)) == []


def test_url_and_in_memory_logs(tmp_path: Path) -> None:
    with EventLog.open(f"sqlite:///{tmp_path / 'by-url.db'}") as log:
        log.append(drained(2))
    with EventLog.open(tmp_path / "by-url.db") as log:
        assert log.last_seq() == 2
    with EventLog.open("sqlite://") as log:
        log.append(drained(2))
        assert [s.seq for s in log.read()] == [1, 2]
        assert log.verify_chain().ok


def test_threads_appending_at_once_get_gapless_contiguous_batches(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    EventLog.open(db).close()
    batches: list[list[int]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        with EventLog.open(db) as log:  # its own engine: like another process
            for _ in range(20):
                stored = log.append(drained(3), durable=k % 2 == 0)
                with lock:
                    batches.append([s.seq for s in stored])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_S)
    assert sorted(seq for batch in batches for seq in batch) == list(range(1, 241))
    assert all(batch == list(range(batch[0], batch[0] + 3)) for batch in batches)
    with EventLog.open(db) as log:
        assert log.verify_chain().ok


def test_writer_killed_mid_stream_leaves_a_sound_log(tmp_path: Path, writers: list[Writer]) -> None:
    db = tmp_path / "events.db"
    batch = 7
    writer = Writer(db, batch)
    writers.append(writer)
    writer.wait_for_commits(5)
    writer.kill()
    assert writer.proc.returncode == -signal.SIGKILL

    with EventLog.open(db) as log:
        report = log.verify_chain()
        assert report.ok, report.problem
        events = list(log.read())
    assert writer.committed, "the writer reported no commit"
    assert max(writer.committed) <= len(events)  # nothing acknowledged was lost
    assert len(events) % batch == 0  # and no partial batch survived
    assert [s.seq for s in events] == list(range(1, len(events) + 1))
    for s in events:
        assert s.event == ReplicaDrained(at=float(s.seq - 1), replica=f"r{s.seq - 1}")

    with EventLog.open(db) as log:  # the log carries on after the crash
        assert log.append(drained(1))[0].seq == len(events) + 1


def test_flipped_payload_byte_is_reported_at_its_seq(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append(drained(10))
    conn = sqlite_connect(db)
    (payload,) = conn.execute("SELECT payload FROM events WHERE seq = 4").fetchone()
    flipped = bytearray(payload)
    flipped[-1] ^= 0x01
    conn.execute("UPDATE events SET payload = ? WHERE seq = 4", (bytes(flipped),))
    conn.close()

    with EventLog.open(db) as log:
        report = log.verify_chain()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert report.checked == 3
    assert "seq 4" in report.problem and "chain" in report.problem


def test_removed_row_is_reported_as_the_missing_seq(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append(drained(10))
    conn = sqlite_connect(db)
    conn.execute("DELETE FROM events WHERE seq = 6")
    conn.close()

    with EventLog.open(db) as log:
        report = log.verify_chain()
        assert (report.ok, report.first_bad_seq, report.checked) == (False, 6, 5)
        assert "seq 6 is missing" in report.problem
        with pytest.raises(StoreError, match="seq 6 is missing"):
            list(log.read())  # replay never silently skips a hole


def test_snapshot_of_a_missing_event_is_reported(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append(drained(10))
        log.write_snapshot(10, b"state")
    conn = sqlite_connect(db)
    conn.execute("DELETE FROM events WHERE seq > 8")  # the tail is gone
    conn.close()
    with EventLog.open(db) as log:
        report = log.verify_chain()
    assert (report.ok, report.first_bad_seq, report.checked) == (False, 10, 8)
    assert "snapshot" in report.problem


def test_readers_see_a_consistent_prefix_while_a_process_appends(
    tmp_path: Path, writers: list[Writer]
) -> None:
    db = tmp_path / "events.db"
    batch = 50
    EventLog.open(db).close()
    writer = Writer(db, batch, mode="fast", limit=400_000)
    writers.append(writer)

    lengths: set[int] = set()
    with EventLog.open(db, create=False) as log:
        # Keep reading until reads have seen the log grow several times and
        # span several fetch chunks, all while the writer is still appending.
        while len(lengths) < 5 or max(lengths) < 10_000:
            assert writer.proc.poll() is None, "the writer stopped before the reads were done"
            events = list(log.read())
            assert len(events) % batch == 0, f"a read saw part of a batch: {len(events)} events"
            check_prefix(events)
            lengths.add(len(events))
            if max(lengths) < 10_000:
                writer.wait_for_commits(len(writer.committed) + 20)


# An event kind as a newer trioserve defines it: version 2 renamed a field.
@register
@dataclasses.dataclass(frozen=True)
class _TestRenamedField(Event):
    KIND: ClassVar[str] = "_TestRenamedField"
    VERSION: ClassVar[int] = 2
    FAMILY: ClassVar[str] = "observation"

    replica: str


def _rename_replica_id(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["replica"] = data.pop("replica_id")
    return data


register_upcaster("_TestRenamedField", 1, _rename_replica_id)


def insert_raw(db: Path, kind: str, version: int, payload: bytes, at: float) -> int:
    """Append a row as another trioserve version would: correct seq and chain."""
    conn = sqlite_connect(db)
    conn.execute("BEGIN IMMEDIATE")
    seq, previous = conn.execute(
        "SELECT seq, chain FROM events ORDER BY seq DESC LIMIT 1"
    ).fetchone() or (0, GENESIS_CHAIN)
    conn.execute(
        "INSERT INTO events (seq, at, kind, version, payload, chain) VALUES (?, ?, ?, ?, ?, ?)",
        (seq + 1, at, kind, version, payload, chain_hash(previous, kind, version, payload)),
    )
    conn.execute("COMMIT")
    conn.close()
    return int(seq) + 1


def test_old_event_versions_are_upcast_on_read(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append([AppDeleted(at=1.0, app="a")])
    old_payload = msgpack.packb({"at": 2.0, "replica_id": "r7"}, use_bin_type=True)
    seq = insert_raw(db, "_TestRenamedField", 1, old_payload, at=2.0)

    with EventLog.open(db) as log:
        (stored,) = log.read(after=seq - 1)
        assert stored.version == 1  # stored as written: the log is never rewritten
        assert stored.event == _TestRenamedField(at=2.0, replica="r7")
        assert log.verify_chain().ok
        # and the current version round-trips through the store as usual
        (new,) = log.append([_TestRenamedField(at=3.0, replica="r8")])
        assert (new.version, new.event) == (2, _TestRenamedField(at=3.0, replica="r8"))


def test_event_from_a_newer_version_is_refused_not_misread(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append([AppDeleted(at=1.0, app="a")])
    future = msgpack.packb({"at": 2.0, "replica": "r7", "zone": "b"}, use_bin_type=True)
    seq = insert_raw(db, "_TestRenamedField", 3, future, at=2.0)

    with EventLog.open(db) as log:
        (stored,) = log.read(after=seq - 1)
        with pytest.raises(EventVersionError) as excinfo:
            _ = stored.event
        message = str(excinfo.value)
        assert "_TestRenamedField" in message and "3" in message and "2" in message
        report = log.verify_chain()
        assert (report.ok, report.first_bad_seq) == (False, seq)
        assert "_TestRenamedField" in report.problem

    unknown = insert_raw(db, "NoSuchKind", 1, msgpack.packb({"at": 3.0}), at=3.0)
    with EventLog.open(db) as log:
        (stored,) = log.read(after=unknown - 1)
        with pytest.raises(EventDecodeError, match="NoSuchKind"):
            _ = stored.event


def test_log_from_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with EventLog.open(db) as log:
        log.append(drained(2))
    conn = sqlite_connect(db)
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = db.read_bytes()

    for create in (True, False):
        with pytest.raises(SchemaError) as excinfo:
            EventLog.open(db, create=create)
        message = str(excinfo.value)
        assert "newer trioserve" in message
        assert "schema version 2" in message and f"up to {SCHEMA_VERSION}" in message
        assert str(db) in message and "upgrade" in message.lower()
    assert isinstance(excinfo.value, StoreError)
    assert db.read_bytes() == before


def make_foreign_sqlite(path: Path) -> None:
    conn = sqlite_connect(path)
    conn.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);"
        "INSERT INTO users VALUES (1, 'ada');"
    )
    conn.close()


def make_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 400)


@pytest.mark.parametrize("make", [make_foreign_sqlite, make_garbage], ids=["sqlite", "garbage"])
def test_a_file_that_is_not_a_log_is_refused_untouched(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    db = tmp_path / "other.db"
    make(db)
    before = db.read_bytes()
    for create in (True, False):
        with pytest.raises(StoreError, match="not a trioserve event log") as excinfo:
            EventLog.open(db, create=create)
        assert not isinstance(excinfo.value, SchemaError)
        assert str(db) in str(excinfo.value)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_blobs_are_content_addressed(tmp_path: Path) -> None:
    with EventLog.open(tmp_path / "events.db") as log:
        data = b"\x80\x04pickled deployment code"
        digest = log.put_blob(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert log.put_blob(data) == digest  # idempotent
        assert log.has_blob(digest)
        assert log.get_blob(digest) == data
        assert log.put_blob(b"") == hashlib.sha256(b"").hexdigest()
        assert log.get_blob(hashlib.sha256(b"").hexdigest()) == b""

        missing = hashlib.sha256(b"never stored").hexdigest()
        assert not log.has_blob(missing)
        with pytest.raises(KeyError, match=f"no blob with digest '{missing}'"):
            log.get_blob(missing)
        assert log.verify_chain().ok


def test_latest_snapshot_picks_the_newest_at_or_before_upto(tmp_path: Path) -> None:
    with EventLog.open(tmp_path / "events.db") as log:
        assert log.latest_snapshot() is None
        log.append(drained(30))
        log.write_snapshot(10, b"s10")
        log.write_snapshot(20, b"s20")
        log.write_snapshot(20, b"s20 again")  # the state after seq 20, replaced
        assert log.snapshot_seqs() == [10, 20]
        assert log.latest_snapshot() == (20, b"s20 again")
        assert log.latest_snapshot(upto=25) == (20, b"s20 again")
        assert log.latest_snapshot(upto=19) == (10, b"s10")
        assert log.latest_snapshot(upto=9) is None
        with pytest.raises(ValueError, match="seq 31"):
            log.write_snapshot(31, b"future")
        assert log.verify_chain().ok


# ------------------------------------------------------------------- AsyncEventLog


async def async_round_trip(alog: AsyncEventLog) -> None:
    async with alog:
        stored = await alog.append(drained(5000))  # more than one fetch chunk
        assert [s.seq for s in stored] == list(range(1, 5001))
        assert await alog.last_seq() == 5000 and await alog.count() == 5000
        back = [s async for s in alog.read()]
        assert back == stored
        assert [s.event for s in back[:3]] == drained(3)
        assert [s.seq async for s in alog.read(after=4998)] == [4999, 5000]
        digest = await alog.put_blob(b"code")
        assert await alog.has_blob(digest) and await alog.get_blob(digest) == b"code"
        await alog.write_snapshot(5000, b"state")
        assert await alog.latest_snapshot() == (5000, b"state")
        assert await alog.snapshot_seqs() == [5000]
        assert (await alog.verify_chain()).ok
    assert alog.sync.closed


@pytest.mark.parametrize("threaded", [True, False])
async def test_async_log_round_trip_under_trio(tmp_path: Path, threaded: bool) -> None:
    alog = await AsyncEventLog.open(tmp_path / "events.db", threaded=threaded)
    assert alog.threaded is threaded
    await async_round_trip(alog)


def test_async_log_round_trip_under_asyncio(tmp_path: Path) -> None:
    async def main() -> None:
        await async_round_trip(await AsyncEventLog.open(tmp_path / "events.db"))

    asyncio.run(main())


async def test_threaded_append_does_not_block_the_trio_loop(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    async with await AsyncEventLog.open(db) as alog:
        # Another process holds the write lock, so the append cannot finish
        # until we let go: meanwhile the loop must keep running other tasks.
        holder = sqlite_connect(db)
        holder.execute("BEGIN IMMEDIATE")
        done = trio.Event()
        result: list[StoredEvent] = []

        async def append() -> None:
            result.extend(await alog.append(drained(2000)))
            done.set()

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(append)
                ticks = 0
                while ticks < 1000:
                    await trio.sleep(0)
                    ticks += 1
                assert not done.is_set()  # 1000 loop turns while the append was pending
                holder.execute("COMMIT")
                holder.close()
                await done.wait()
        assert [s.seq for s in result] == list(range(1, 2001))
