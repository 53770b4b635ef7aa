"""The controller's performance figures, each beside a baseline measured in the same run.

Run ``python -m benchmarks.controller`` (``--help`` for the sizes). It prints
a Markdown table of:

* **decide** - one ``decide(state, now)`` pass over a converged state of
  1,000 and 10,000 replicas (from :mod:`simulations.scale`), beside the time
  merely to iterate over all replicas of the state in a Python loop, the floor
  for any pass. Aim: under 100 ms at 10,000 replicas.
* **replay** - events/s over a log of 100,000 events: from zero (read, decode
  and apply every event, as ``Journal.open`` does on a log without a
  snapshot), and ``Journal.open`` from the latest snapshot plus the tail;
  beside reading the same rows without decoding them. Aim: over 50,000
  events/s.
* **durable append** - events/s with one event per transaction and with 1,000
  per transaction (``durable=True``: fsync), beside the same inserts made
  with ``sqlite3`` directly, without our codec, hash chain or SQLAlchemy.

The 100,000-event log is recorded through a :class:`~trioserve.core.journal.Journal`
by a synthetic cluster of 1,000 replicas (40 applications x 5 deployments x 5
replicas): every decision comes from ``decide``, and the observations are the
legal answers a world would give (replicas become ready, drain, exit; health
checks fail and recover; processes crash), under rounds of rolling updates,
in-place reconfigurations, scaling, crashes and deletions. Observations and
intents are appended in batches with ``durable=False``; a snapshot is written
every 1,000 events as the controller does. All files live in a temporary
folder. Reads run with a warm OS page cache.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from benchmarks.records import Record
from benchmarks.table import Row, markdown
from simulations.scale import DecideTiming, median_time, run_scale
from trioserve.core import events as ev
from trioserve.core.config import DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.journal import DEFAULT_SNAPSHOT_EVERY, Journal
from trioserve.core.state import ClusterState, ReplicaState, replay
from trioserve.store import EventLog

__all__ = ["LogBuilder", "Row", "build_log", "main", "measure", "records"]

DECIDE_AIM_S = 0.100
REPLAY_AIM_EVENTS_PER_S = 50_000

APPS = 40
DEPLOYMENTS_PER_APP = 5
REPLICAS_EACH = 5
SINGLE_APPENDS = 300
BATCH_SIZE = 1000
BATCHES = 20
RUNS = 3
"""Each replay and read figure is the median of this many runs."""

S = ReplicaState
T = TypeVar("T")


# ------------------------------------------------------------------ the 100k log


class LogBuilder:
    """Records a realistic event history through a :class:`Journal`, quickly."""

    def __init__(self, log: EventLog, *, seed: int, snapshot_every: int) -> None:
        self.journal = Journal.open(log, snapshot_every=snapshot_every)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.next_pid = 1000
        self.versions: dict[str, int] = {}
        self.user_configs: dict[str, object] = {}
        self.rounds = 0
        self._controller_started()

    @property
    def state(self) -> ClusterState:
        return self.journal.state

    def _record(self, events: Sequence[Event]) -> None:
        if events:
            self.journal.record(events, durable=False)

    def _controller_started(self) -> None:
        self._record(
            [
                ev.ControllerStarted(
                    at=self.now, instance_id=self.journal.log.instance_id, pid=self.next_pid
                )
            ]
        )

    def _deployed(self, app: str) -> ev.AppDeployed:
        version = self.versions[app]
        config = DeploymentConfig(num_replicas=REPLICAS_EACH, user_config=self.user_configs[app])
        specs = tuple(
            DeploymentSpec(
                name=f"d{d}",
                code_version=f"v{version}",
                config=config,
                source=f"import:models.{app}:Model{d}",
            )
            for d in range(DEPLOYMENTS_PER_APP)
        )
        return ev.AppDeployed(
            at=self.now, app=app, route_prefix=f"/{app}", ingress="d0", deployments=specs
        )

    def settle(self) -> None:
        """Decide, and answer every decision as the world would, until nothing moves."""
        for _ in range(500):
            self.now += 1.0
            decided = self.journal.step(self.now)
            observed: list[Event] = []
            for r in self.state.replicas.values():
                if r.state is S.STARTING:
                    self.next_pid += 1
                    observed.append(
                        ev.ReplicaRunning(
                            at=self.now,
                            replica=r.id,
                            address=f"127.0.0.1:{20000 + self.next_pid % 40000}",
                            pid=self.next_pid,
                        )
                    )
                elif r.state is S.DRAINING:
                    observed.append(ev.ReplicaDrained(at=self.now, replica=r.id))
                elif r.state is S.STOPPING:
                    observed.append(ev.ReplicaExited(at=self.now, replica=r.id, exit_code=0))
            self._record(observed)
            if not decided and not observed:
                return
        raise RuntimeError("the synthetic cluster did not settle")

    def start(self) -> None:
        for a in range(APPS):
            app = f"app{a:02d}"
            self.versions[app] = 1
            self.user_configs[app] = None
        self._record([self._deployed(app) for app in sorted(self.versions)])
        self.settle()

    def running(self, apps: Sequence[str]) -> list[str]:
        wanted = set(apps)
        return [
            r.id for r in self.state.replicas.values() if r.state is S.RUNNING and r.app in wanted
        ]

    def round(self) -> None:
        """One round: something happens to an eighth of the applications, then settle."""
        rng = self.rng
        apps = rng.sample(sorted(self.state.apps), k=max(1, len(self.state.apps) // 8))
        op = rng.choice(("update", "update", "reconfigure", "scale", "health", "crash", "delete"))
        self.now += 1.0
        out: list[Event] = []
        if op == "update":
            for app in apps:
                self.versions[app] += 1
                out.append(self._deployed(app))
        elif op == "reconfigure":
            for app in apps:
                self.user_configs[app] = {"threshold": rng.randint(1, 9)}
                out.append(self._deployed(app))
        elif op == "scale":
            for app in apps:
                for d in range(DEPLOYMENTS_PER_APP):
                    n = rng.randint(1, 2 * REPLICAS_EACH)
                    out.append(
                        ev.DeploymentScaled(
                            at=self.now, app=app, deployment=f"d{d}", num_replicas=n
                        )
                    )
        elif op == "health":
            for rid in self.running(apps):
                fails = rng.choice((0, 1, 2, 3))
                for n in range(1, fails + 1):
                    out.append(
                        ev.HealthCheckFailed(
                            at=self.now, replica=rid, consecutive=n, error="health check timed out"
                        )
                    )
                if 0 < fails < 3:
                    out.append(ev.HealthCheckPassed(at=self.now, replica=rid))
        elif op == "crash":
            for rid in self.running(apps):
                if rng.random() < 0.3:
                    out.append(
                        ev.ReplicaDied(
                            at=self.now, replica=rid, exit_code=-9, reason="killed by signal 9"
                        )
                    )
        else:
            self._record([ev.AppDeleted(at=self.now, app=app) for app in apps])
            self.settle()
            for app in apps:
                self.versions[app] += 1
            out = [self._deployed(app) for app in apps]
        self._record(out)
        self.settle()
        self.rounds += 1
        if self.rounds % 25 == 0:
            self.next_pid += 1
            self._controller_started()


def build_log(path: Path, events: int, *, seed: int = 0) -> LogBuilder:
    """Record at least ``events`` events into a new log at ``path``."""
    builder = LogBuilder(EventLog.open(path), seed=seed, snapshot_every=DEFAULT_SNAPSHOT_EVERY)
    builder.start()
    while builder.journal.seq < events:
        builder.round()
    return builder


# ------------------------------------------------------------------- measuring


def _timed(fn: Callable[[], T], runs: int = 1) -> tuple[float, T]:
    """Median wall time of ``runs`` calls of ``fn``, and the last result."""
    median, _, result = median_time(fn, runs)
    return median, result


def _count_raw(log: EventLog) -> int:
    n = 0
    for _stored in log.read():
        n += 1
    return n


def _count_decoded(log: EventLog) -> int:
    n = 0
    for stored in log.read():
        if stored.event is not None:
            n += 1
    return n


def _replay_from_zero(log: EventLog) -> ClusterState:
    return replay(stored.event for stored in log.read())


_RAW_SCHEMA = (
    "CREATE TABLE events (seq INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, "
    "version INTEGER NOT NULL, payload BLOB NOT NULL, chain BLOB NOT NULL)"
)
_RAW_INSERT = (
    "INSERT INTO events (seq, at, kind, version, payload, chain) VALUES (?, ?, ?, ?, ?, ?)"
)


def _raw_sqlite(path: Path) -> sqlite3.Connection:
    """A bare sqlite3 database set up as the event log is: WAL, synchronous=FULL."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL").fetchall()
    con.execute("PRAGMA synchronous = FULL")
    con.execute(_RAW_SCHEMA)
    return con


def _raw_append(con: sqlite3.Connection, batches: Sequence[Sequence[tuple[object, ...]]]) -> None:
    for batch in batches:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(_RAW_INSERT, batch)
        con.execute("COMMIT")


def _our_append(log: EventLog, batches: Sequence[Sequence[Event]]) -> None:
    for batch in batches:
        log.append(batch, durable=True)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------- the table


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms"


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f} ev/s"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _decide_row(t: DecideTiming, aim: bool) -> Row:
    return Row(
        what=f"`decide`, converged, {t.replicas:,} replicas ({t.deployments:,} deployments)",
        figure=_ms(t.decide_s),
        baseline=f"iterate all replicas: {_ms(t.iterate_s)}",
        ratio=f"{t.decide_s / t.iterate_s:.0f}x",
        aim=f"< 100 ms: {_verdict(t.decide_s < DECIDE_AIM_S)}" if aim else "-",
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(events: int = 100_000, deployments: int = 1000, seed: int = 0) -> str:
    """Measure everything and return the report (Markdown)."""
    return measure(events, deployments, seed)[0]


def records(quick: bool = False) -> list[Record]:
    """The suite's controller figures (a smaller log and state with ``quick``)."""
    if quick:
        return measure(10_000, 100, 0)[1]
    return measure()[1]


def _decide_record(t: DecideTiming, aim: bool) -> Record:
    return Record(
        "Controller",
        f"`decide`, converged, {t.replicas:,} replicas",
        t.decide_s * 1000,
        "ms",
        "iterate all replicas",
        t.iterate_s * 1000,
        target="< 100 ms" if aim else "",
        met=t.decide_s < DECIDE_AIM_S if aim else None,
    )


def measure(
    events: int = 100_000, deployments: int = 1000, seed: int = 0
) -> tuple[str, list[Record]]:
    """Measure everything: the report (Markdown) and the suite's records."""
    rows: list[Row] = []
    recs: list[Record] = []
    notes: list[str] = []
    started = time.perf_counter()

    # decide, from the converged scale world
    _say(f"converging {deployments} deployments x 10 replicas...")
    scale = run_scale(deployments, 10, seed)
    assert scale.decide_small is not None
    rows.append(_decide_row(scale.decide_small, aim=False))
    rows.append(_decide_row(scale.decide, aim=True))
    recs.append(_decide_record(scale.decide_small, aim=False))
    recs.append(_decide_record(scale.decide, aim=True))
    notes.extend(scale.lines())

    with tempfile.TemporaryDirectory(prefix="trioserve-bench-") as tmp:
        folder = Path(tmp)

        # replay
        _say(f"recording a log of {events:,} events...")
        build_s, builder = _timed(lambda: build_log(folder / "events.db", events, seed=seed))
        log = builder.journal.log
        total = log.last_seq()
        snap = log.latest_snapshot()
        assert snap is not None
        tail = total - snap[0]
        kinds = collections.Counter(s.kind for s in log.read())
        notes.append(
            f"log: {total:,} events recorded in {build_s:.1f} s ({builder.rounds} rounds, "
            f"{len(builder.state.replicas):,} replicas at the end; "
            f"{len(log.snapshot_seqs())} snapshots); by kind: "
            + ", ".join(f"{k} {n:,}" for k, n in kinds.most_common())
        )

        _say("replaying...")
        raw_s, n = _timed(lambda: _count_raw(log), RUNS)
        assert n == total
        decode_s, _ = _timed(lambda: _count_decoded(log), RUNS)
        zero_s, replayed = _timed(lambda: _replay_from_zero(log), RUNS)
        if replayed != builder.state:
            raise AssertionError("replaying the log from zero does not give the live state")
        open_s, journal = _timed(lambda: Journal.open(log), RUNS)
        if journal.state != builder.state:
            raise AssertionError("Journal.open (snapshot + tail) does not give the live state")
        raw_rate = total / raw_s
        raw_name = "raw read, no decode"
        recs.append(
            Record(
                "Controller",
                f"replay from zero, {total:,} events",
                total / zero_s,
                "events/s",
                raw_name,
                raw_rate,
                target="> 50,000 events/s",
                met=total / zero_s > REPLAY_AIM_EVENTS_PER_S,
            )
        )
        recs.append(
            Record(
                "Controller",
                f"`Journal.open` (snapshot + {tail:,}-event tail), effective",
                total / open_s,
                "events/s",
                raw_name,
                raw_rate,
                target="> 50,000 events/s",
                met=total / open_s > REPLAY_AIM_EVENTS_PER_S,
            )
        )
        baseline = f"raw read, no decode: {_rate(raw_rate)}"
        zero_rate = total / zero_s
        rows.append(
            Row(
                what=f"replay from zero, {total:,} events (read + decode + apply)",
                figure=_rate(zero_rate),
                baseline=baseline,
                ratio=f"{raw_rate / zero_rate:.1f}x",
                aim=f"> 50,000 ev/s: {_verdict(zero_rate > REPLAY_AIM_EVENTS_PER_S)}",
            )
        )
        rows.append(
            Row(
                what="  of which read + decode only (no apply)",
                figure=_rate(total / decode_s),
                baseline=baseline,
                ratio=f"{raw_rate / (total / decode_s):.1f}x",
                aim="-",
            )
        )
        rows.append(
            Row(
                what=(
                    f"`Journal.open`: latest snapshot + {tail:,}-event tail, "
                    f"state at event {total:,}"
                ),
                figure=f"{_ms(open_s)} = {_rate(total / open_s)} effective",
                baseline=baseline,
                ratio=f"{raw_rate / (total / open_s):.2f}x",
                aim=f"> 50,000 ev/s: {_verdict(total / open_s > REPLAY_AIM_EVENTS_PER_S)}",
            )
        )

        # durable appends: the same events and rows, into fresh files
        _say("appending durably...")
        sample = list(log.read(upto=BATCH_SIZE * BATCHES))
        decoded = [s.event for s in sample]
        rows_raw = [(s.seq, s.at, s.kind, s.version, s.payload, s.chain) for s in sample]
        log.close()

        single = EventLog.open(folder / "single.db")
        single_s, _ = _timed(lambda: _our_append(single, _chunks(decoded[:SINGLE_APPENDS], 1)))
        single.close()
        raw = _raw_sqlite(folder / "single-raw.db")
        raw_single_s, _ = _timed(lambda: _raw_append(raw, _chunks(rows_raw[:SINGLE_APPENDS], 1)))
        raw.close()
        recs.append(
            Record(
                "Controller",
                "durable append, 1 event per transaction",
                SINGLE_APPENDS / single_s,
                "events/s",
                "sqlite3, 1 row per commit",
                SINGLE_APPENDS / raw_single_s,
            )
        )
        rows.append(
            Row(
                what=f"durable append, 1 event per transaction ({SINGLE_APPENDS} events)",
                figure=_rate(SINGLE_APPENDS / single_s),
                baseline=f"sqlite3, 1 row per commit: {_rate(SINGLE_APPENDS / raw_single_s)}",
                ratio=f"{single_s / raw_single_s:.1f}x",
                aim="-",
            )
        )

        count = len(decoded)
        batched = EventLog.open(folder / "batched.db")
        batch_s, _ = _timed(lambda: _our_append(batched, _chunks(decoded, BATCH_SIZE)))
        batched.close()
        raw = _raw_sqlite(folder / "batched-raw.db")
        raw_batch_s, _ = _timed(lambda: _raw_append(raw, _chunks(rows_raw, BATCH_SIZE)))
        raw.close()
        recs.append(
            Record(
                "Controller",
                f"durable append, {BATCH_SIZE:,} events per transaction",
                count / batch_s,
                "events/s",
                "sqlite3 executemany, same rows",
                count / raw_batch_s,
            )
        )
        rows.append(
            Row(
                what=(f"durable append, {BATCH_SIZE:,} events per transaction ({count:,} events)"),
                figure=_rate(count / batch_s),
                baseline=f"sqlite3 executemany, same rows: {_rate(count / raw_batch_s)}",
                ratio=f"{batch_s / raw_batch_s:.1f}x",
                aim="-",
            )
        )

    cpus = os.cpu_count()
    head = (
        f"trioserve controller benchmark - Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {cpus} CPUs, {platform.machine()}; "
        f"decide: median of {scale.decide.passes} passes; replay/read: median of {RUNS} runs"
    )
    elapsed = time.perf_counter() - started
    report = "\n".join(
        [
            head,
            "",
            markdown(rows),
            "",
            *notes,
            f"(the benchmark took {elapsed:.0f} s)",
        ]
    )
    return report, recs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.controller",
        description="The controller's performance figures (see the module docstring).",
    )
    parser.add_argument("--events", type=int, default=100_000, help="events in the replay log")
    parser.add_argument(
        "--deployments", type=int, default=1000, help="deployments of 10 replicas for decide"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(run(args.events, args.deployments, args.seed))


if __name__ == "__main__":
    main()
