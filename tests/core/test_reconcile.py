"""One test per rule of ``decide`` (see the module docstring of core/reconcile.py)."""

from __future__ import annotations

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.reconcile import decide, failure_limit
from trioserve.core.state import (
    REASON_START_TIMEOUT,
    ClusterState,
    DeploymentStatus,
    ReplicaState,
    apply,
    deployment_status,
)

S = ReplicaState


def config(**overrides: object) -> DeploymentConfig:
    base: dict[str, object] = {
        "num_replicas": 3,
        "graceful_shutdown_timeout_s": 5.0,
        "health_check_period_s": 1.0,
    }
    base.update(overrides)
    return DeploymentConfig(**base)  # type: ignore[arg-type]


def deployed(
    state: ClusterState, at: float, version: str = "v1", cfg: DeploymentConfig | None = None
) -> None:
    spec = DeploymentSpec(name="D", code_version=version, config=cfg or config())
    apply(
        state,
        ev.AppDeployed(at=at, app="app", route_prefix="/", ingress="D", deployments=(spec,)),
    )


def step(state: ClusterState, now: float, load: object = None) -> list[Event]:
    """Decide and apply, as the controller does; return the decisions."""
    decisions = decide(state, now, load)  # type: ignore[arg-type]
    for d in decisions:
        apply(state, d)
    assert decide(state, now, load) == []  # type: ignore[arg-type]
    return decisions


def run_all(state: ClusterState, at: float) -> None:
    for r in list(state.replicas.values()):
        if r.state is S.STARTING:
            apply(state, ev.ReplicaRunning(at=at, replica=r.id, address=f"a{r.id}", pid=1))


def running_app(n: int = 3, version: str = "v1", **cfg: object) -> ClusterState:
    state = ClusterState()
    deployed(state, 0.0, version, config(num_replicas=n, **cfg))
    step(state, 0.0)
    run_all(state, 1.0)
    step(state, 1.0)
    return state


def kinds(decisions: list[Event]) -> list[str]:
    return [d.KIND for d in decisions]


def dep_of(state: ClusterState):  # type: ignore[no-untyped-def]
    return state.apps["app"].deployments["D"]


def test_start_replicas_up_to_target_with_ids_from_a_counter() -> None:
    state = ClusterState()
    deployed(state, 0.0)
    decisions = step(state, 0.0)
    assert [d.replica for d in decisions] == ["app#D#1", "app#D#2", "app#D#3"]  # type: ignore[attr-defined]
    assert all(d.reason == "scale up" for d in decisions)  # type: ignore[attr-defined]
    assert state.next_replica == 4


def test_decide_is_deterministic_and_does_not_modify_state() -> None:
    state = ClusterState()
    deployed(state, 0.0)
    before = state.copy()
    assert decide(state, 0.0) == decide(state, 0.0)
    assert state == before


def test_replace_replica_that_died() -> None:
    state = running_app()
    apply(state, ev.ReplicaDied(at=2.0, replica="app#D#2", exit_code=-9, reason="killed"))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaStarting"]
    assert state.replicas["app#D#2"].state is S.STOPPING


def test_kill_after_stop_timeout_once() -> None:
    state = running_app()
    apply(state, ev.ReplicaDied(at=2.0, replica="app#D#1", exit_code=None, reason="x"))
    step(state, 2.0)
    assert step(state, 2.0 + state.stop_timeout_s) == []  # not yet: strictly after
    decisions = step(state, 2.0 + state.stop_timeout_s + 0.5)
    assert kinds(decisions) == ["ReplicaKilled"]
    assert step(state, 100.0) == []  # killed once


def test_replace_unhealthy_after_three_consecutive_failed_health_checks() -> None:
    state = running_app()
    for n in (1, 2):
        apply(state, ev.HealthCheckFailed(at=2.0 + n, replica="app#D#1", consecutive=n, error="t"))
        assert step(state, 2.0 + n) == []
    apply(state, ev.HealthCheckFailed(at=5.0, replica="app#D#1", consecutive=3, error="t"))
    decisions = step(state, 5.0)
    assert kinds(decisions) == ["ReplicaDraining", "ReplicaStarting"]
    assert decisions[0].reason.startswith("unhealthy")  # type: ignore[attr-defined]


def test_health_check_passed_resets_the_count() -> None:
    state = running_app()
    apply(state, ev.HealthCheckFailed(at=2.0, replica="app#D#1", consecutive=2, error="t"))
    apply(state, ev.HealthCheckPassed(at=3.0, replica="app#D#1"))
    assert state.replicas["app#D#1"].health_failures == 0
    assert step(state, 3.0) == []


def test_stop_after_graceful_timeout_while_draining() -> None:
    state = running_app(3)
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="D", num_replicas=2))
    assert kinds(step(state, 2.0)) == ["ReplicaDraining"]
    assert step(state, 6.0) == []
    decisions = step(state, 7.5)
    assert kinds(decisions) == ["ReplicaStopping"]
    assert "graceful_shutdown_timeout_s" in decisions[0].reason  # type: ignore[attr-defined]


def test_stop_after_start_timeout_counts_as_failed_start() -> None:
    state = ClusterState()
    deployed(state, 0.0, cfg=config(num_replicas=1))
    step(state, 0.0)
    decisions = step(state, state.start_timeout_s + 1)
    assert kinds(decisions) == ["ReplicaStopping", "ReplicaStarting"]
    assert decisions[0].reason == REASON_START_TIMEOUT  # type: ignore[attr-defined]
    assert dep_of(state).failures == 1


def test_scale_down_prefers_replicas_still_starting_newest_first() -> None:
    state = running_app(2)
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="D", num_replicas=4))
    step(state, 2.0)  # starts #3 and #4
    apply(state, ev.DeploymentScaled(at=3.0, app="app", deployment="D", num_replicas=1))
    decisions = step(state, 3.0)
    assert [(d.KIND, d.replica) for d in decisions] == [  # type: ignore[attr-defined]
        ("ReplicaStopping", "app#D#4"),
        ("ReplicaStopping", "app#D#3"),
        ("ReplicaDraining", "app#D#2"),
    ]


def test_rolling_update_starts_new_before_draining_old_in_batches_of_20_percent() -> None:
    state = running_app(10, "v1")
    deployed(state, 2.0, "v2", config(num_replicas=10))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaStarting", "ReplicaStarting"]  # 20 % of 10
    assert all(d.code_version == "v2" for d in decisions)  # type: ignore[attr-defined]
    assert sum(r.state is S.RUNNING for r in state.replicas.values()) == 10
    run_all(state, 3.0)
    decisions = step(state, 3.0)
    assert kinds(decisions) == ["ReplicaDraining"] * 2 + ["ReplicaStarting"] * 2
    drained = {d.replica for d in decisions if d.KIND == "ReplicaDraining"}  # type: ignore[attr-defined]
    assert drained == {"app#D#1", "app#D#2"}  # the oldest first
    # never fewer than 10 running, never more than 12 active, until done
    t = 4.0
    while True:
        active = [r for r in state.replicas.values() if r.state in (S.STARTING, S.RUNNING)]
        running = [r for r in state.replicas.values() if r.state is S.RUNNING]
        assert len(active) <= 12 and len(running) >= 10
        if all(r.code_version == "v2" for r in active) and len(running) == 10:
            break
        run_all(state, t)
        step(state, t)
        t += 1
        assert t < 50
    assert deployment_status(dep_of(state))[0] is DeploymentStatus.HEALTHY


def test_stop_outdated_starting_replicas() -> None:
    state = ClusterState()
    deployed(state, 0.0, "v1", config(num_replicas=2))
    step(state, 0.0)
    deployed(state, 1.0, "v2", config(num_replicas=2))
    decisions = step(state, 1.0)
    assert kinds(decisions) == ["ReplicaStopping", "ReplicaStopping"] + ["ReplicaStarting"] * 2
    assert decisions[0].reason == "outdated version"  # type: ignore[attr-defined]


def test_reconfigure_in_place_for_config_only_change() -> None:
    state = running_app(2)
    pids_before = {r.id for r in state.replicas.values()}
    deployed(state, 2.0, "v1", config(num_replicas=2, user_config={"threshold": 5}))
    decisions = step(state, 2.0)
    assert kinds(decisions) == ["ReplicaReconfigured", "ReplicaReconfigured"]
    assert {r.id for r in state.replicas.values()} == pids_before


def test_num_replicas_change_only_scales_no_reconfigure() -> None:
    state = running_app(2)
    deployed(state, 2.0, "v1", config(num_replicas=3))
    assert kinds(step(state, 2.0)) == ["ReplicaStarting"]
    assert deployment_status(dep_of(state))[0] is DeploymentStatus.UPSCALING


def test_give_up_after_failure_limit_with_deploy_failed_and_traceback() -> None:
    state = ClusterState()
    deployed(state, 0.0, "v1", config(num_replicas=2))
    t = 0.0
    for _ in range(failure_limit(2)):
        step(state, t)
        starting = next(r for r in state.replicas.values() if r.state is S.STARTING)
        apply(
            state,
            ev.ReplicaStartFailed(at=t, replica=starting.id, error="Traceback\nValueError: bad"),
        )
        t += 1
    decisions = decide(state, t)
    assert "DeploymentFailed" in kinds(decisions)
    step(state, t)
    status, message = deployment_status(dep_of(state))
    assert status is DeploymentStatus.DEPLOY_FAILED
    assert "ValueError: bad" in message
    assert not any(d.KIND == "ReplicaStarting" for d in decide(state, t + 100))


def test_failed_new_version_leaves_old_version_serving() -> None:
    state = running_app(2, "v1")
    deployed(state, 2.0, "v2", config(num_replicas=2))
    t = 2.0
    while not dep_of(state).failed:
        step(state, t)
        for r in list(state.replicas.values()):
            if r.state is S.STARTING:
                apply(state, ev.ReplicaStartFailed(at=t, replica=r.id, error="boom"))
        t += 1
        assert t < 100
    old = [r for r in state.replicas.values() if r.code_version == "v1"]
    assert len(old) == 2 and all(r.state is S.RUNNING for r in old)


def test_forget_deleted_app_after_its_replicas_exit() -> None:
    state = running_app(2)
    apply(state, ev.AppDeleted(at=2.0, app="app"))
    assert kinds(step(state, 2.0)) == ["ReplicaDraining", "ReplicaDraining"]
    for r in list(state.replicas.values()):
        apply(state, ev.ReplicaDrained(at=3.0, replica=r.id))
        apply(state, ev.ReplicaExited(at=3.0, replica=r.id, exit_code=0))
    assert kinds(step(state, 3.0)) == ["DeploymentRemoved", "AppRemoved"]
    assert state.apps == {} and state.replicas == {}


def test_autoscale_scales_up_after_delay_and_records_evidence() -> None:
    auto = AutoscalingConfig(
        min_replicas=1, max_replicas=5, upscale_delay_s=2, look_back_period_s=2
    )
    state = ClusterState()
    deployed(state, 0.0, cfg=config(num_replicas=None, autoscaling_config=auto))
    step(state, 0.0)
    run_all(state, 0.5)
    samples = [LoadSample(t / 2, ongoing=5.0, queued=3.0) for t in range(0, 13)]
    load = {("app", "D"): samples}
    assert step(state, 1.0, {("app", "D"): samples[:3]}) == []  # not observed for 2 s yet
    decisions = step(state, 6.0, load)
    assert kinds(decisions) == ["AutoscaleDecision"] + ["ReplicaStarting"] * 3
    decision = decisions[0]
    assert (decision.from_replicas, decision.to_replicas) == (1, 4)  # type: ignore[attr-defined]
    assert decision.evidence["samples"]  # type: ignore[attr-defined]
