"""The controller's memory: the event log and the state it folds to, kept in step.

A :class:`Journal` is the one place where events enter the log. Every event is
checked against the state (an illegal one is refused before it is written),
appended, and applied, so that the state in memory is always exactly what
replaying the log gives. A snapshot of the state is written every
``snapshot_every`` events; opening a journal loads the latest snapshot and
replays the tail.

:func:`verify` is what ``trioserve log verify`` runs: the hash chain, every
snapshot against a replay from zero, and every logged decision against what
:func:`~trioserve.core.reconcile.decide` gives on the state just before it.

The journal is synchronous; the trio controller calls it from a worker
thread, the simulations call it directly under their virtual clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trioserve.core import events as ev
from trioserve.core.autoscaling import samples_from_evidence
from trioserve.core.events import Event
from trioserve.core.reconcile import Load, decide
from trioserve.core.state import (
    ClusterState,
    IllegalTransition,
    apply,
    check,
    state_from_bytes,
    state_to_bytes,
)
from trioserve.store import EventLog, StoredEvent

__all__ = ["DEFAULT_SNAPSHOT_EVERY", "Journal", "VerifyReport", "state_at", "verify"]

DEFAULT_SNAPSHOT_EVERY = 1000


class Journal:
    """An open event log and the :class:`ClusterState` it replays to."""

    def __init__(
        self,
        log: EventLog,
        state: ClusterState,
        seq: int,
        snapshot_every: int,
        last_snapshot: int = 0,
    ) -> None:
        self.log = log
        self.state = state
        self.seq = seq
        self.snapshot_every = snapshot_every
        self._last_snapshot = last_snapshot

    @classmethod
    def open(cls, log: EventLog, *, snapshot_every: int = DEFAULT_SNAPSHOT_EVERY) -> Journal:
        """Load the latest snapshot of ``log`` and replay the events after it."""
        state, seq, snapshot_seq = _load(log, upto=None)
        return cls(log, state, seq, snapshot_every, snapshot_seq)

    def record(self, events: Sequence[Event], *, durable: bool = True) -> list[StoredEvent]:
        """Check, append (in one transaction) and apply ``events``.

        Raises :class:`~trioserve.core.state.IllegalTransition` if any event
        does not fit the state; then nothing is written and the state is as
        before. If the append itself fails, the state is reloaded from the log
        and the error re-raised: the log is the truth.
        """
        if not events:
            return []
        check(self.state, events[0])  # cheap refusal of a stale observation
        try:
            for event in events:
                apply(self.state, event)
        except IllegalTransition:
            self.reload()
            raise
        try:
            stored = self.log.append(events, durable=durable)
        except BaseException:
            self.reload()
            raise
        self.seq = stored[-1].seq
        if self.seq - self._last_snapshot >= self.snapshot_every:
            self.snapshot()
        return stored

    def step(self, now: float, load: Load | None = None) -> list[Event]:
        """Decide at ``now``, record the decisions, and return them."""
        decisions = decide(self.state, now, load)
        if decisions:
            self.record(decisions, durable=False)
        return decisions

    def snapshot(self) -> None:
        """Write a snapshot of the current state at the current seq."""
        self.log.write_snapshot(self.seq, state_to_bytes(self.state))
        self._last_snapshot = self.seq

    def reload(self) -> None:
        """Forget the in-memory state and rebuild it from the log."""
        self.state, self.seq, self._last_snapshot = _load(self.log, upto=None)


def _load(log: EventLog, upto: int | None) -> tuple[ClusterState, int, int]:
    """(state, seq of its last event, seq of the snapshot it started from)."""
    snap = log.latest_snapshot(upto=upto)
    if snap is None:
        state, seq = ClusterState(), 0
    else:
        seq, blob = snap
        state = state_from_bytes(blob)
    snapshot_seq = seq
    for stored in log.read(after=seq, upto=upto):
        apply(state, stored.event)
        seq = stored.seq
    return state, seq, snapshot_seq


def state_at(log: EventLog, seq: int | None = None) -> ClusterState:
    """The state after event ``seq`` (the latest by default), from snapshot + tail."""
    return _load(log, upto=seq)[0]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found. ``first_bad_seq`` is ``None`` when all is well."""

    ok: bool
    events: int
    snapshots: int
    decisions: int
    first_bad_seq: int | None = None
    problem: str = ""


def verify(log: EventLog) -> VerifyReport:
    """Check the whole log: chain, snapshots, and every decision.

    Replays from the first event. Before each decision, re-runs ``decide`` on
    the state just before it (with the load samples an autoscaling decision
    recorded as its evidence) and requires the logged decision to be the first
    one ``decide`` gives. Each snapshot must equal the replayed state at its
    seq.
    """
    chain = log.verify_chain()
    if not chain.ok:
        return VerifyReport(False, chain.checked, 0, 0, chain.first_bad_seq, chain.problem)
    snapshot_seqs = set(log.snapshot_seqs())
    state = ClusterState()
    decisions = 0
    events = 0
    for stored in log.read():
        event = stored.event
        if event.KIND in ev.DECISION_KINDS:
            expected = _first_decision(state, event)
            if expected != event:
                return VerifyReport(
                    False,
                    events,
                    len(snapshot_seqs),
                    decisions,
                    stored.seq,
                    f"decision {event.KIND} at seq {stored.seq} is not what decide() gives "
                    f"on the state before it: expected {expected!r}, logged {event!r}",
                )
            decisions += 1
        try:
            apply(state, event)
        except IllegalTransition as exc:
            return VerifyReport(False, events, len(snapshot_seqs), decisions, stored.seq, str(exc))
        events += 1
        if stored.seq in snapshot_seqs:
            snap = log.latest_snapshot(upto=stored.seq)
            assert snap is not None
            if state_from_bytes(snap[1]) != state:
                return VerifyReport(
                    False,
                    events,
                    len(snapshot_seqs),
                    decisions,
                    stored.seq,
                    f"the snapshot at seq {stored.seq} differs from the replayed state",
                )
    return VerifyReport(True, events, len(snapshot_seqs), decisions)


def _first_decision(state: ClusterState, event: Event) -> Event | None:
    load: Load | None = None
    if isinstance(event, ev.AutoscaleDecision):
        load = {(event.app, event.deployment): samples_from_evidence(event.evidence)}
    decisions = decide(state, event.at, load)
    return decisions[0] if decisions else None
