"""The replica state machine, apply, statuses and snapshots."""

from __future__ import annotations

import itertools

import msgpack
import pytest

from trioserve.core import events as ev
from trioserve.core.config import DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.reconcile import decide
from trioserve.core.state import (
    TRANSITIONS,
    AppStatus,
    ClusterState,
    DeploymentStatus,
    IllegalTransition,
    ReplicaState,
    app_status,
    apply,
    deployment_status,
    replay,
    state_from_bytes,
    state_to_bytes,
)

S = ReplicaState
R = "app#D#1"
CONFIG_VERSION = DeploymentConfig(num_replicas=1).lightweight_digest()


def base_state() -> ClusterState:
    state = ClusterState()
    spec = DeploymentSpec(name="D", code_version="v1", config=DeploymentConfig(num_replicas=1))
    apply(
        state, ev.AppDeployed(at=0, app="app", route_prefix="/", ingress="D", deployments=(spec,))
    )
    return state


def replica_event(kind: str, at: float = 1.0) -> Event:
    """One event of each replica kind, for replica R."""
    return {
        "ReplicaStarting": ev.ReplicaStarting(
            at=at,
            replica=R,
            app="app",
            deployment="D",
            code_version="v1",
            config_version=CONFIG_VERSION,
            reason="scale up",
        ),
        "ReplicaRunning": ev.ReplicaRunning(at=at, replica=R, address="x", pid=7),
        "ReplicaStartFailed": ev.ReplicaStartFailed(at=at, replica=R, error="tb"),
        "ReplicaDied": ev.ReplicaDied(at=at, replica=R, exit_code=1, reason="died"),
        "ReplicaDrained": ev.ReplicaDrained(at=at, replica=R),
        "ReplicaExited": ev.ReplicaExited(at=at, replica=R, exit_code=0),
        "HealthCheckFailed": ev.HealthCheckFailed(at=at, replica=R, consecutive=1, error="e"),
        "HealthCheckPassed": ev.HealthCheckPassed(at=at, replica=R),
        "ReplicaReconfigured": ev.ReplicaReconfigured(at=at, replica=R, config_version="c2"),
        "ReplicaDraining": ev.ReplicaDraining(at=at, replica=R, reason="scale down"),
        "ReplicaStopping": ev.ReplicaStopping(at=at, replica=R, reason="scale down"),
        "ReplicaKilled": ev.ReplicaKilled(at=at, replica=R, reason="timeout"),
        "ReplicaAdopted": ev.ReplicaAdopted(at=at, replica=R, pid=4242),
    }[kind]


PATHS = {
    None: [],
    S.STARTING: ["ReplicaStarting"],
    S.RUNNING: ["ReplicaStarting", "ReplicaRunning"],
    S.DRAINING: ["ReplicaStarting", "ReplicaRunning", "ReplicaDraining"],
    S.STOPPING: ["ReplicaStarting", "ReplicaRunning", "ReplicaDraining", "ReplicaDrained"],
}
KINDS = sorted({kind for _, kind in TRANSITIONS})


def state_in(replica_state: ReplicaState | None) -> ClusterState:
    state = base_state()
    for kind in PATHS[replica_state]:
        apply(state, replica_event(kind))
    return state


@pytest.mark.parametrize(("before", "kind"), list(itertools.product(PATHS, KINDS)))
def test_transition_table_is_the_only_way_a_replica_changes(
    before: ReplicaState | None, kind: str
) -> None:
    state = state_in(before)
    snapshot = state.copy()
    if (before, kind) in TRANSITIONS:
        apply(state, replica_event(kind, at=2.0))
        after = TRANSITIONS[(before, kind)]
        replica = state.replicas.get(R)
        assert (replica.state if replica else None) is after
    else:
        with pytest.raises(IllegalTransition) as info:
            apply(state, replica_event(kind, at=2.0))
        message = str(info.value)
        assert R in message and kind in message
        assert (before.value if before else "does not exist") in message
        assert state == snapshot  # nothing changed


def test_an_adopted_replica_keeps_its_state_and_since_and_takes_the_new_pid() -> None:
    state = state_in(S.RUNNING)
    before = state.replicas[R]
    since, reason = before.since, before.reason
    apply(state, ev.ReplicaAdopted(at=9.0, replica=R, pid=4242))
    replica = state.replicas[R]
    assert (replica.state, replica.since, replica.reason, replica.pid) == (
        S.RUNNING,
        since,
        reason,
        4242,
    )


def test_the_deployed_config_survives_a_snapshot() -> None:
    state = base_state()
    config = {"applications": [{"name": "app", "import_path": "m:app", "args": {"k": 1}}]}
    apply(state, ev.ConfigDeployed(at=1.0, config=config))
    assert state.deployed_config == config
    assert state_from_bytes(state_to_bytes(state)).deployed_config == config


def test_state_records_when_and_why_a_replica_changed_state() -> None:
    state = state_in(S.RUNNING)
    apply(state, ev.ReplicaDraining(at=5.0, replica=R, reason="rolling update"))
    replica = state.replicas[R]
    assert (replica.state, replica.since, replica.reason) == (S.DRAINING, 5.0, "rolling update")


def test_replay_and_snapshot_round_trip_give_equal_states() -> None:
    events: list[Event] = []
    state = base_state()
    events.append(
        ev.AppDeployed(
            at=0,
            app="app",
            route_prefix="/",
            ingress="D",
            deployments=(
                DeploymentSpec(
                    name="D",
                    code_version="v1",
                    config=DeploymentConfig(num_replicas=2, user_config={"a": [1, 2]}),
                ),
            ),
        )
    )
    state = ClusterState()
    apply(state, events[0])
    for d in decide(state, 1.0):
        apply(state, d)
        events.append(d)
    assert replay(events) == state
    assert state_from_bytes(state_to_bytes(state)) == state


def test_app_status_running_after_all_replicas_run_and_deleting_after_delete() -> None:
    state = base_state()
    assert app_status(state.apps["app"])[0] is AppStatus.DEPLOYING
    apply(state, replica_event("ReplicaStarting"))
    apply(state, replica_event("ReplicaRunning"))
    assert app_status(state.apps["app"]) == (AppStatus.RUNNING, "")
    apply(state, ev.AppDeleted(at=3.0, app="app"))
    assert app_status(state.apps["app"])[0] is AppStatus.DELETING


def test_app_status_unhealthy_when_a_replica_died_after_running() -> None:
    state = state_in(S.RUNNING)
    apply(state, ev.ReplicaDied(at=3.0, replica=R, exit_code=-9, reason="killed by signal 9"))
    status, message = app_status(state.apps["app"])
    assert status is AppStatus.UNHEALTHY and "D" in message


def test_starting_a_replica_of_a_deployment_being_removed_is_refused() -> None:
    state = base_state()
    apply(state, ev.AppDeleted(at=1.0, app="app"))
    with pytest.raises(IllegalTransition, match="being removed"):
        apply(state, replica_event("ReplicaStarting"))


# ------------------------------------------------------------------------- placement

GPU_SPEC = DeploymentSpec(
    name="Model",
    code_version="v1",
    config=DeploymentConfig(
        num_replicas=3, ray_actor_options={"num_gpus": 1, "num_cpus": 2, "memory": 2**30}
    ),
)
PENDING = (
    "1 replica of 'Model' cannot be placed: it needs {'CPU': 2.0, 'GPU': 1.0, "
    "'memory': 1073741824.0} and the instance has {'GPU': 0.0} free of {'GPU': 2.0}."
)


def placed_state() -> ClusterState:
    """An instance with 2 GPUs, two replicas placed on them and a third pending."""
    state = ClusterState()
    apply(
        state,
        ev.ControllerStarted(
            at=0.0,
            instance_id="i",
            pid=1,
            resources={"CPU": 8, "GPU": 2, "memory": 2.0**34, "accelerator": 1},
        ),
    )
    apply(
        state,
        ev.AppDeployed(at=0, app="app", route_prefix="/", ingress="Model", deployments=(GPU_SPEC,)),
    )
    for d in decide(state, 1.0):
        apply(state, d)
    return state


def test_controller_started_sets_the_resources_as_floats_and_none_turns_accounting_off() -> None:
    state = placed_state()
    assert state.resources == {"CPU": 8.0, "GPU": 2.0, "memory": 2.0**34, "accelerator": 1.0}
    assert all(isinstance(v, float) for v in state.resources.values())

    apply(state, ev.ControllerStarted(at=5.0, instance_id="i", pid=2))
    assert state.resources is None


def test_replica_starting_records_gpu_ids_and_demand_and_pending_is_kept() -> None:
    state = placed_state()
    replicas = list(state.replicas.values())
    assert [(r.id, r.gpu_ids) for r in replicas] == [("app#Model#1", (0,)), ("app#Model#2", (1,))]
    assert replicas[0].demand == {"CPU": 2.0, "GPU": 1.0, "memory": 2.0**30}
    dep = state.apps["app"].deployments["Model"]
    assert dep.pending == PENDING


def test_snapshot_round_trip_keeps_resources_gpu_ids_demand_and_pending() -> None:
    state = placed_state()

    again = state_from_bytes(state_to_bytes(state))

    assert again == state
    assert again.resources == state.resources
    assert again.replicas["app#Model#2"].gpu_ids == (1,)
    assert isinstance(again.replicas["app#Model#2"].gpu_ids, tuple)
    assert again.replicas["app#Model#2"].demand == {"CPU": 2.0, "GPU": 1.0, "memory": 2.0**30}
    assert again.apps["app"].deployments["Model"].pending == PENDING
    assert decide(again, 2.0) == decide(state, 2.0) == []


def test_a_snapshot_from_before_placement_still_loads() -> None:
    state = placed_state()
    top = msgpack.unpackb(state_to_bytes(state), raw=False)
    del top["resources"]
    for app in top["apps"]:
        for dep in app["deployments"]:
            del dep["pending"]
            for r in dep["replicas"]:
                del r["gpu_ids"], r["demand"]

    old = state_from_bytes(msgpack.packb(top, use_bin_type=True))

    assert old.resources is None
    assert old.apps["app"].deployments["Model"].pending == ""
    replica = old.replicas["app#Model#1"]
    assert replica.gpu_ids == ()
    assert replica.demand == {"CPU": 2.0, "GPU": 1.0, "memory": 2.0**30}  # from its spec


def test_deployment_pending_sets_and_clears_the_message_and_needs_the_deployment() -> None:
    state = base_state()
    apply(state, ev.DeploymentPending(at=1.0, app="app", deployment="D", message="no room"))
    assert state.apps["app"].deployments["D"].pending == "no room"
    apply(state, ev.DeploymentPending(at=2.0, app="app", deployment="D", message=""))
    assert state.apps["app"].deployments["D"].pending == ""
    with pytest.raises(IllegalTransition, match="no deployment 'E'"):
        apply(state, ev.DeploymentPending(at=3.0, app="app", deployment="E", message="x"))


def test_a_replica_starting_clears_the_pending_message() -> None:
    state = base_state()
    apply(state, ev.DeploymentPending(at=1.0, app="app", deployment="D", message="no room"))
    apply(state, replica_event("ReplicaStarting"))
    assert state.apps["app"].deployments["D"].pending == ""


def test_the_status_message_says_why_replicas_are_pending() -> None:
    state = placed_state()
    dep = state.apps["app"].deployments["Model"]
    status, message = deployment_status(dep)
    assert status is DeploymentStatus.UPDATING
    assert message == f"Deploying: 0 of 3 replicas running the new version. {PENDING}"
    app, app_message = app_status(state.apps["app"])
    assert app is AppStatus.DEPLOYING and "Model" in app_message

    # A stale message is not shown on a healthy deployment.
    apply(state, ev.DeploymentScaled(at=2.0, app="app", deployment="Model", num_replicas=2))
    for r in list(state.replicas.values()):
        apply(state, ev.ReplicaRunning(at=3.0, replica=r.id, address="x", pid=9))
    assert dep.pending == PENDING
    assert deployment_status(dep) == (DeploymentStatus.HEALTHY, "")


def test_proxy_events_record_where_it_serves_and_why_it_exited() -> None:
    state = replay(
        [
            ev.ControllerStarted(at=0.0, instance_id="i", pid=1),
            ev.ProxyStarted(at=1.0, pid=40, url="http://127.0.0.1:8000", event_loop="trio"),
        ]
    )
    assert (state.proxy_pid, state.proxy_url, state.proxy_starts) == (
        40,
        "http://127.0.0.1:8000",
        1,
    )
    assert state_from_bytes(state_to_bytes(state)) == state

    apply(state, ev.ProxyExited(at=2.0, pid=40, exit_code=1, reason="cannot listen on :8000"))
    assert (state.proxy_pid, state.proxy_url, state.proxy_error) == (
        None,
        "",
        "cannot listen on :8000",
    )
    apply(state, ev.ProxyStarted(at=3.0, pid=41, url="http://127.0.0.1:8001"))
    assert (state.proxy_pid, state.proxy_error, state.proxy_starts) == (41, "", 2)
    # A new controller: the proxy of the one before is gone with it.
    apply(state, ev.ControllerStarted(at=4.0, instance_id="i", pid=2))
    assert state.proxy_pid is None and state.proxy_url == ""


def test_an_autoscaling_deployment_starting_at_zero_replicas_is_running_at_once() -> None:
    from trioserve.core.config import AutoscalingConfig

    config = DeploymentConfig(
        num_replicas=None, autoscaling_config=AutoscalingConfig(min_replicas=0, max_replicas=2)
    )
    spec = DeploymentSpec(name="D", code_version="v", config=config, source="import:m:D")
    state = replay(
        [
            ev.ControllerStarted(at=0.0, instance_id="i", pid=1),
            ev.AppDeployed(at=1.0, app="a", route_prefix="/", ingress="D", deployments=(spec,)),
        ]
    )
    dep = state.apps["a"].deployments["D"]
    assert dep.target_replicas == 0
    assert deployment_status(dep)[0] is DeploymentStatus.HEALTHY
    assert app_status(state.apps["a"])[0] is AppStatus.RUNNING  # serve.run returns, as in Ray


def test_the_status_message_of_a_scale_says_why() -> None:
    from trioserve.core.config import AutoscalingConfig

    config = DeploymentConfig(
        num_replicas=None, autoscaling_config=AutoscalingConfig(min_replicas=1, max_replicas=4)
    )
    spec = DeploymentSpec(name="D", code_version="v", config=config, source="import:m:D")
    state = replay(
        [
            ev.ControllerStarted(at=0.0, instance_id="i", pid=1),
            ev.AppDeployed(at=1.0, app="a", route_prefix="/", ingress="D", deployments=(spec,)),
            ev.ReplicaStarting(
                at=1.0,
                replica="a#D#1",
                app="a",
                deployment="D",
                code_version="v",
                config_version=spec.config_version,
                reason="start",
            ),
            ev.ReplicaRunning(at=2.0, replica="a#D#1", address="tcp://x", pid=5),
            ev.AutoscaleDecision(
                at=3.0,
                app="a",
                deployment="D",
                from_replicas=1,
                to_replicas=3,
                reason="upscale: mean load 6",
                evidence={},
            ),
        ]
    )
    status, message = deployment_status(state.apps["a"].deployments["D"])
    assert status is DeploymentStatus.UPSCALING
    assert message == "Upscaling from 1 to 3 replicas (upscale: mean load 6)."
    assert state_from_bytes(state_to_bytes(state)) == state
