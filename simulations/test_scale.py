"""The controller at scale, in the simulated world (see :mod:`simulations.scale`).

Run with ``pytest simulations/test_scale.py -s`` to see the ``decide`` figures;
they are printed, never asserted.
"""

from __future__ import annotations

from pathlib import Path

from simulations.scale import ScaleReport, run_scale
from trioserve.core.journal import state_at, verify
from trioserve.core.state import AppStatus, ClusterState, ReplicaState, app_status
from trioserve.store import EventLog


def _assert_converged(state: ClusterState, report: ScaleReport) -> None:
    deployments = [dep for app in state.apps.values() for dep in app.deployments.values()]
    assert len(deployments) == report.num_deployments
    for dep in deployments:
        running = [r for r in dep.replicas.values() if r.state is ReplicaState.RUNNING]
        assert dep.target_replicas == report.replicas_each, f"{dep.app}/{dep.name}"
        assert len(running) == len(dep.replicas) == dep.target_replicas, f"{dep.app}/{dep.name}"
    for app in state.apps.values():
        assert app_status(app) == (AppStatus.RUNNING, ""), app.name
    assert len(state.replicas) == report.num_deployments * report.replicas_each


def test_scale_full_size_converges(tmp_path: Path) -> None:
    """1,000 deployments x 10 replicas = 10,000 replicas converge (about 10 s here).

    Asserts on the state replayed from the log: every deployment runs exactly
    its target of replicas, every application is RUNNING; ``run_scale`` has
    already checked the world's safety invariants once at the end (hash
    chain, gapless seqs, replay == live state, replica counts).

    ``journal.verify`` is not run at this size: it re-runs ``decide`` over
    the whole state before each of the 10,000 logged decisions, so it is
    quadratic (about 6 s at 1,000 replicas, 22 s at 2,000, so some ten minutes
    at 10,000). :func:`test_scale_log_verifies` runs it at a tenth of the size.
    """
    log_path = tmp_path / "events.db"
    report = run_scale(1000, 10, seed=0, log_path=log_path)
    print()
    print("\n".join(report.lines()))
    assert report.running == 10_000
    assert report.decide.decisions == 0
    with EventLog.open(log_path, create=False) as log:
        _assert_converged(state_at(log), report)


def test_scale_log_verifies(tmp_path: Path) -> None:
    """A reduced size, 100 deployments x 10 replicas = 1,000 replicas, so that
    ``journal.verify`` (quadratic in the number of decisions, see above) takes
    seconds: convergence as above, and the whole log verifies (hash chain,
    every decision re-derived by ``decide``)."""
    log_path = tmp_path / "events.db"
    report = run_scale(100, 10, seed=1, log_path=log_path, compare_small=False)
    print()
    print("\n".join(report.lines()))
    assert report.running == 1000
    with EventLog.open(log_path, create=False) as log:
        _assert_converged(state_at(log), report)
        result = verify(log)
        assert result.ok, f"seq {result.first_bad_seq}: {result.problem}"
        assert result.events == report.events
        assert result.decisions == 1000
