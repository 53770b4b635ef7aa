"""The journal: the event log and the state it replays to, kept in step and verifiable."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import DeploymentSpec
from trioserve.core.journal import Journal, state_at, verify
from trioserve.core.reconcile import decide
from trioserve.core.state import ClusterState, IllegalTransition, ReplicaState, state_to_bytes
from trioserve.store import EventLog

CART = DeploymentSpec(
    name="Cart",
    code_version="v1",
    config=DeploymentConfig(
        num_replicas=2,
        user_config={"currency": "EUR", "limits": [10, 100], "tax": {"eu": 0.2}},
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=3.0,
        health_check_period_s=0.5,
        health_check_timeout_s=1.0,
    ),
    source="import:shop.cart:Cart",
)

PRICING = DeploymentSpec(
    name="Pricing",
    code_version="v1",
    config=DeploymentConfig(
        num_replicas=None,
        autoscaling_config=AutoscalingConfig(
            min_replicas=1,
            max_replicas=3,
            target_ongoing_requests=1,
            metrics_interval_s=1,
            look_back_period_s=2,
            upscale_delay_s=2,
            downscale_delay_s=5,
        ),
    ),
    source="import:shop.pricing:Pricing",
)

CART_1, CART_2, PRICING_3 = "shop#Cart#1", "shop#Cart#2", "shop#Pricing#3"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def log(db: Path) -> Iterator[EventLog]:
    log = EventLog.open(db)
    yield log
    log.close()


def deploy(journal: Journal, at: float = 0.0) -> None:
    journal.record(
        [
            ev.ControllerStarted(
                at=at,
                instance_id=journal.log.instance_id,
                pid=4242,
                start_timeout_s=5.0,
                stop_timeout_s=2.0,
            )
        ]
    )
    journal.record(
        [
            ev.AppDeployed(
                at=at, app="shop", route_prefix="/shop", ingress="Cart", deployments=(CART, PRICING)
            )
        ]
    )


def ready(journal: Journal, at: float, after: Callable[[], object] = lambda: None) -> None:
    """Report every starting replica as running, one observation at a time."""
    starting = [r.id for r in journal.state.replicas.values() if r.state is ReplicaState.STARTING]
    for n, replica in enumerate(starting):
        port = 50000 + int(replica.rsplit("#", 1)[1])
        journal.record(
            [ev.ReplicaRunning(at=at, replica=replica, address=f"127.0.0.1:{port}", pid=6000 + n)]
        )
        after()


def pricing_load(start: int, end: int, total: float) -> dict[tuple[str, str], list[LoadSample]]:
    return {("shop", "Pricing"): [LoadSample(float(t), total) for t in range(start, end + 1)]}


def run_shop(journal: Journal, after: Callable[[], object] = lambda: None) -> None:
    """A realistic life: deploy, start, autoscale, replace an unhealthy replica, scale down."""
    deploy(journal)
    after()
    assert len(journal.step(1.0)) == 3  # Cart x2, Pricing x1
    after()
    ready(journal, 2.0, after)
    scaled = journal.step(5.0, pricing_load(2, 5, 3.0))
    assert [e.KIND for e in scaled] == ["AutoscaleDecision", "ReplicaStarting", "ReplicaStarting"]
    after()
    ready(journal, 6.0, after)
    for n, at in enumerate((7.0, 7.5, 8.0), start=1):
        journal.record(
            [ev.HealthCheckFailed(at=at, replica=CART_1, consecutive=n, error="timed out")]
        )
        after()
    replaced = journal.step(8.0)
    assert [e.KIND for e in replaced] == ["ReplicaDraining", "ReplicaStarting"]
    after()
    journal.record([ev.ReplicaDrained(at=8.5, replica=CART_1)])
    after()
    journal.record([ev.ReplicaExited(at=8.6, replica=CART_1, exit_code=0)])
    after()
    ready(journal, 9.0, after)
    journal.record([ev.DeploymentScaled(at=10.0, app="shop", deployment="Cart", num_replicas=1)])
    after()
    assert [e.KIND for e in journal.step(10.0)] == ["ReplicaDraining"]
    after()
    assert [e.KIND for e in journal.step(14.0)] == ["ReplicaStopping"]  # graceful timeout
    after()
    assert [e.KIND for e in journal.step(17.0)] == ["ReplicaKilled"]  # stop timeout
    after()
    (killed,) = [r for r in journal.state.replicas.values() if r.killed]
    journal.record([ev.ReplicaExited(at=17.5, replica=killed.id, exit_code=-9)])
    after()
    assert journal.step(18.0) == []


def kinds(log: EventLog) -> list[str]:
    return [stored.kind for stored in log.read()]


# ------------------------------------------------------------------------ recording


def test_record_stores_events_with_gapless_seqs_and_applies_them(log: EventLog) -> None:
    journal = Journal.open(log)

    deploy(journal)
    decisions = journal.step(1.0)

    assert [s.seq for s in log.read()] == [1, 2, 3, 4, 5]
    assert journal.seq == 5
    assert [e.KIND for e in decisions] == ["ReplicaStarting"] * 3
    assert set(journal.state.replicas) == {CART_1, CART_2, PRICING_3}
    assert [s.event for s in log.read(after=2)] == decisions


def test_deciding_again_with_nothing_new_records_nothing(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    journal.step(1.0)

    assert journal.step(1.5) == []
    assert log.last_seq() == 5


def test_record_refuses_an_observation_of_an_unknown_replica(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    journal.step(1.0)
    before = journal.state.copy()

    with pytest.raises(IllegalTransition, match="'shop#Cart#99' does not exist"):
        journal.record([ev.ReplicaRunning(at=2.0, replica="shop#Cart#99", address="x", pid=1)])

    assert log.last_seq() == 5
    assert journal.seq == 5
    assert journal.state == before


def test_record_refuses_a_whole_batch_when_a_later_event_is_illegal(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    journal.step(1.0)
    before = journal.state.copy()
    batch = [
        ev.ReplicaRunning(at=2.0, replica=CART_1, address="127.0.0.1:50001", pid=6001),
        ev.ReplicaDraining(at=2.0, replica=CART_2, reason="scale down"),  # CART_2 is STARTING
    ]

    with pytest.raises(IllegalTransition, match=r"'shop#Cart#2' is STARTING: ReplicaDraining"):
        journal.record(batch)

    assert log.last_seq() == 5
    assert journal.state == before
    assert journal.state.replicas[CART_1].state is ReplicaState.STARTING


def test_record_refuses_an_autoscale_decision_from_a_stale_target(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    before = journal.state.copy()
    stale = ev.AutoscaleDecision(
        at=3.0,
        app="shop",
        deployment="Pricing",
        from_replicas=2,  # the target is 1
        to_replicas=3,
        reason="upscale",
        evidence={"samples": []},
    )

    with pytest.raises(IllegalTransition, match="has target 1, not 2"):
        journal.record([stale])

    assert log.last_seq() == 2
    assert journal.state == before


def test_reload_rebuilds_the_state_from_the_log(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=3)
    run_shop(journal)
    expected = journal.state.copy()
    journal.state.apps.clear()
    journal.state.replicas.clear()

    journal.reload()

    assert journal.state == expected
    assert journal.seq == log.last_seq()


# ------------------------------------------------------------------------ snapshots


def test_a_snapshot_is_written_every_n_events(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=3)
    deploy(journal)  # seqs 1, 2
    for n, at in enumerate((3.0, 4.0, 5.0, 6.0, 7.0)):  # seqs 3..7
        journal.record(
            [ev.DeploymentScaled(at=at, app="shop", deployment="Cart", num_replicas=n + 1)]
        )

    assert log.snapshot_seqs() == [3, 6]

    journal.step(8.0)  # one batch of 6 ReplicaStarting (Cart x5, Pricing x1): seqs 8..13
    assert log.snapshot_seqs() == [3, 6, 13]


def test_a_snapshot_holds_the_state_at_its_seq(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=4)
    states: dict[int, bytes] = {}
    run_shop(journal, after=lambda: states.setdefault(journal.seq, state_to_bytes(journal.state)))

    seqs = log.snapshot_seqs()
    assert len(seqs) >= 4
    for seq in seqs:
        snap = log.latest_snapshot(upto=seq)
        assert snap == (seq, states[seq])


def test_reopening_gives_the_live_state(db: Path, log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=4)
    run_shop(journal)
    journal.record([ev.HealthCheckFailed(at=19.0, replica=CART_2, consecutive=1, error="503")])
    journal.record([ev.HealthCheckPassed(at=19.5, replica=CART_2)])
    assert log.snapshot_seqs()[-1] < log.last_seq()  # a tail after the last snapshot

    with EventLog.open(db) as other:
        reopened = Journal.open(other)

        assert reopened.state == journal.state
        assert reopened.seq == journal.seq
        assert decide(reopened.state, 30.0) == decide(journal.state, 30.0)


def test_reopening_without_snapshots_replays_from_the_start(db: Path, log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=10_000)
    run_shop(journal)
    assert log.snapshot_seqs() == []

    with EventLog.open(db) as other:
        assert Journal.open(other).state == journal.state


def test_state_at_gives_the_state_after_an_earlier_seq(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=5)
    states: dict[int, ClusterState] = {0: ClusterState()}
    run_shop(journal, after=lambda: states.setdefault(journal.seq, journal.state.copy()))
    assert len(log.snapshot_seqs()) >= 3

    for seq, expected in states.items():
        assert state_at(log, seq) == expected, seq
    assert state_at(log) == journal.state
    # Between snapshots too: after seq 6 one replica runs, the others still start.
    middle = state_at(log, 6)
    assert middle.replicas[CART_2].state is ReplicaState.STARTING
    assert middle.replicas[CART_1].state is ReplicaState.RUNNING


# ------------------------------------------------------------------------- verify


def test_verify_accepts_a_realistic_log(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=4)
    run_shop(journal)

    report = verify(log)

    assert report.ok, report.problem
    assert report.first_bad_seq is None
    assert report.events == log.last_seq()
    assert report.decisions == sum(1 for k in kinds(log) if k in ev.DECISION_KINDS)
    assert report.decisions == 11
    assert report.snapshots == len(log.snapshot_seqs())


def test_verify_finds_a_decision_that_decide_would_not_make(db: Path, log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=10_000)
    run_shop(journal)
    # Nothing asks for PRICING_3 to go: it is healthy and the target is met.
    (forged,) = log.append([ev.ReplicaDraining(at=19.0, replica=PRICING_3, reason="scale down")])
    # The log goes on past the forged decision, as a controller would have kept it.
    journal.reload()
    journal.record([ev.ReplicaDrained(at=19.5, replica=PRICING_3)])
    journal.record([ev.ReplicaExited(at=19.6, replica=PRICING_3, exit_code=0)])

    report = verify(log)

    assert not report.ok
    assert report.first_bad_seq == forged.seq
    assert "ReplicaDraining" in report.problem
    assert report.events == forged.seq - 1


def test_verify_finds_an_autoscale_decision_its_evidence_does_not_support(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    journal.step(1.0)
    ready(journal, 2.0)
    load = pricing_load(2, 5, 3.0)
    (genuine, *_) = decide(journal.state, 5.0, load)
    assert isinstance(genuine, ev.AutoscaleDecision) and genuine.to_replicas == 3
    understated = ev.AutoscaleDecision(
        at=genuine.at,
        app=genuine.app,
        deployment=genuine.deployment,
        from_replicas=genuine.from_replicas,
        to_replicas=genuine.to_replicas - 1,
        reason=genuine.reason,
        evidence=genuine.evidence,
    )
    (stored,) = journal.record([understated])
    journal.step(5.0)

    report = verify(log)

    assert not report.ok
    assert report.first_bad_seq == stored.seq
    assert "AutoscaleDecision" in report.problem


def test_verify_finds_a_snapshot_that_differs_from_the_replay(log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=10_000)
    run_shop(journal)
    good_seq, bad_seq = 6, 12
    log.write_snapshot(good_seq, state_to_bytes(state_at(log, good_seq)))
    other = state_at(log, bad_seq)
    other.replicas[CART_2].state = ReplicaState.DRAINING  # what the log never said
    log.write_snapshot(bad_seq, state_to_bytes(other))

    report = verify(log)

    assert not report.ok
    assert report.first_bad_seq == bad_seq
    assert "snapshot" in report.problem
    assert report.snapshots == 2


def test_verify_finds_a_payload_byte_flipped_in_the_file(db: Path, log: EventLog) -> None:
    journal = Journal.open(log, snapshot_every=4)
    run_shop(journal)
    (target,) = [s.seq for s in log.read() if s.kind == "AutoscaleDecision"]
    log.close()
    with sqlite3.connect(db) as conn:
        (payload,) = conn.execute("SELECT payload FROM events WHERE seq = ?", (target,)).fetchone()
        damaged = bytearray(payload)
        damaged[len(damaged) // 2] ^= 0x01
        conn.execute("UPDATE events SET payload = ? WHERE seq = ?", (bytes(damaged), target))
    conn.close()

    with EventLog.open(db) as reopened:
        report = verify(reopened)

    assert not report.ok
    assert report.first_bad_seq == target
    assert "altered" in report.problem
    assert report.events == target - 1


# --------------------------------------------------------------------- regressions


# Regression test; the bug was: Journal.open (and reload) set _last_snapshot to the current seq,
# not to the seq of the latest snapshot: with snapshot_every=3, 2 events, a reopen and 1 more
# event, no snapshot is written at seq 3, so a controller restarted more often than every N events
# never snapshots and its start-up replay grows without bound.
def test_snapshot_cadence_survives_a_reopen(log: EventLog) -> None:
    deploy(Journal.open(log, snapshot_every=3))  # seqs 1, 2

    journal = Journal.open(log, snapshot_every=3)
    journal.record([ev.DeploymentScaled(at=3.0, app="shop", deployment="Cart", num_replicas=3)])

    assert log.snapshot_seqs() == [3]


# Regression test; the bug was: autoscaling's prefix-sum mean depends on samples outside the
# look-back that the evidence leaves out: Pricing (target 1) under 1.4 then exactly 2.0 ongoing
# requests is scaled 1 -> 3 at t=9, and verify() re-running it on the evidence gets 1 -> 2, so it
# reports a genuine decision as not what decide() gives.
def test_verify_accepts_a_genuine_autoscale_decision_on_fractional_load(log: EventLog) -> None:
    journal = Journal.open(log)
    deploy(journal)
    journal.step(1.0)
    ready(journal, 2.0)
    samples = [LoadSample(float(t), 1.4) for t in range(0, 4)]
    samples += [LoadSample(float(t), 2.0) for t in range(4, 10)]
    decisions = journal.step(9.0, {("shop", "Pricing"): samples})
    assert decisions and decisions[0].KIND == "AutoscaleDecision"

    report = verify(log)

    assert report.ok, report.problem
