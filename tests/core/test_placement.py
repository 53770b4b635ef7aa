"""Placement: what a replica needs, what is in use and free, and which GPUs it gets."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.core import events as ev
from trioserve.core.config import ConfigError, DeploymentConfig
from trioserve.core.events import DeploymentSpec
from trioserve.core.placement import (
    Ledger,
    assign_gpus,
    demand,
    demand_of,
    fits,
    free,
    gpu_count,
    gpu_use,
    in_use,
)
from trioserve.core.state import ClusterState, ReplicaState, apply

S = ReplicaState


def state_with(resources: dict[str, float] | None, **options: dict[str, Any]) -> ClusterState:
    """A state whose instance has ``resources``, with one deployment per option set."""
    state = ClusterState()
    apply(
        state,
        ev.ControllerStarted(at=0.0, instance_id="i", pid=1, resources=resources),
    )
    specs = tuple(
        DeploymentSpec(
            name=name,
            code_version="v1",
            config=DeploymentConfig(num_replicas=1, ray_actor_options=actor),
        )
        for name, actor in options.items()
    )
    apply(
        state, ev.AppDeployed(at=0.0, app="app", route_prefix="/", ingress="A", deployments=specs)
    )
    return state


def start(state: ClusterState, deployment: str, number: int, gpu_ids: tuple[int, ...] = ()) -> str:
    dep = state.deployment("app", deployment)
    replica = f"app#{deployment}#{number}"
    apply(
        state,
        ev.ReplicaStarting(
            at=1.0,
            replica=replica,
            app="app",
            deployment=deployment,
            code_version=dep.code_version,
            config_version=dep.config_version,
            reason="scale up",
            gpu_ids=gpu_ids,
        ),
    )
    return replica


# ------------------------------------------------------------------------------ demand


def test_demand_maps_ray_actor_options_to_resource_names() -> None:
    config = DeploymentConfig(
        ray_actor_options={
            "num_cpus": 1,
            "num_gpus": 0.5,
            "memory": 2**30,
            "resources": {"zeta": 2, "accelerator": 1},
        }
    )

    need = demand(config)

    assert need == {
        "CPU": 1.0,
        "GPU": 0.5,
        "memory": float(2**30),
        "accelerator": 1.0,
        "zeta": 2.0,
    }
    assert list(need) == ["CPU", "GPU", "memory", "accelerator", "zeta"]
    assert all(isinstance(v, float) for v in need.values())


def test_a_replica_reserves_nothing_unless_it_asks_not_even_a_cpu() -> None:
    assert demand(DeploymentConfig()) == {}
    assert demand(DeploymentConfig(ray_actor_options={})) == {}
    assert demand_of(None) == {}


def test_zero_entries_are_dropped_and_other_ray_options_ignored() -> None:
    options = {
        "num_cpus": 0,
        "num_gpus": 0.0,
        "memory": None,
        "resources": {"accelerator": 0},
        "accelerator_type": "A100",
        "object_store_memory": 2**20,
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    assert demand(DeploymentConfig(ray_actor_options=options)) == {}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"num_cpus": -1}, "num_cpus must be a non-negative number"),
        ({"num_gpus": -0.5}, "num_gpus must be a non-negative number"),
        ({"memory": -(2**30)}, "memory must be a non-negative number"),
        ({"num_gpus": "1"}, "num_gpus must be a number"),
        ({"num_cpus": True}, "num_cpus must be a number"),
        ({"num_cpus": float("inf")}, "num_cpus must be a non-negative number"),
        ({"num_gpus": float("nan")}, "num_gpus must be a non-negative number"),
        ({"num_gpus": 1.5}, "num_gpus must be a whole number when above 1"),
        ({"resources": ["accelerator"]}, "resources must be a dict"),
        ({"resources": {"accelerator": -1}}, "resources['accelerator'] must be a non-negative"),
        ({"resources": {"accelerator": "one"}}, "resources['accelerator'] must be a number"),
        ({"resources": {"GPU": 1}}, "use the 'num_gpus' option instead of 'GPU'"),
        ({"resources": {"CPU": 1}}, "use the 'num_cpus' option instead of 'CPU'"),
        ({"resources": {"": 1}}, "resource name must be a non-empty string"),
    ],
)
def test_invalid_resource_options_are_a_config_error_naming_the_option(
    options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match="ray_actor_options") as info:
        DeploymentConfig(ray_actor_options=options)
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="ray_actor_options"):
        demand_of(options)


def test_ray_actor_options_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="ray_actor_options must be a dict"):
        DeploymentConfig(ray_actor_options=[("num_cpus", 1)])  # type: ignore[arg-type]


def test_whole_numbers_of_gpus_above_one_are_accepted() -> None:
    assert demand(DeploymentConfig(ray_actor_options={"num_gpus": 2.0})) == {"GPU": 2.0}


# ------------------------------------------------------------------- in use and free


def test_every_replica_that_holds_a_process_holds_its_resources() -> None:
    state = state_with({"CPU": 8, "GPU": 2}, A={"num_cpus": 1, "num_gpus": 1})
    ids = [start(state, "A", n, (n - 1,)) for n in (1, 2)]
    assert in_use(state) == {"CPU": 2.0, "GPU": 2.0}

    a, b = ids
    apply(state, ev.ReplicaRunning(at=2.0, replica=a, address="x", pid=5))
    apply(state, ev.ReplicaDraining(at=3.0, replica=a, reason="scale down"))
    apply(state, ev.ReplicaStopping(at=4.0, replica=b, reason="scale down"))
    assert {r.state for r in state.replicas.values()} == {S.DRAINING, S.STOPPING}
    assert in_use(state) == {"CPU": 2.0, "GPU": 2.0}  # still held while stopping

    apply(state, ev.ReplicaExited(at=5.0, replica=b, exit_code=0))
    assert in_use(state) == {"CPU": 1.0, "GPU": 1.0}  # freed once gone
    assert free(state) == {"CPU": 7.0, "GPU": 1.0}


def test_free_is_none_without_accounting_and_counts_undeclared_names_as_zero() -> None:
    assert free(state_with(None, A={"num_gpus": 1})) is None

    state = state_with({"CPU": 4}, A={"num_cpus": 1, "resources": {"accelerator": 1}})
    start(state, "A", 1)
    assert free(state) == {"CPU": 3.0, "accelerator": -1.0}


def test_in_use_is_the_same_whatever_the_order_of_the_replicas() -> None:
    state = state_with({"CPU": 1}, A={"num_cpus": 0.1}, B={"num_cpus": 0.2}, C={"num_cpus": 0.3})
    for n, name in enumerate("ABC", 1):
        start(state, name, n)
    forward = in_use(state)["CPU"]
    state.replicas = dict(reversed(list(state.replicas.items())))
    assert in_use(state)["CPU"] == forward == 0.6


def test_a_replica_keeps_the_demand_it_started_with() -> None:
    state = state_with({"GPU": 2}, A={"num_gpus": 1})
    start(state, "A", 1, (0,))
    spec = DeploymentSpec(
        name="A", code_version="v2", config=DeploymentConfig(ray_actor_options={"num_gpus": 0.5})
    )
    apply(
        state, ev.AppDeployed(at=2.0, app="app", route_prefix="/", ingress="A", deployments=(spec,))
    )
    assert in_use(state) == {"GPU": 1.0}


# ------------------------------------------------------------------------------- fits


def test_fits_compares_every_name_and_tolerates_float_noise() -> None:
    assert fits({"CPU": 1.0}, None)
    assert fits({}, {})
    assert fits({"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0, "memory": 5.0})
    assert not fits({"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.5})
    assert not fits({"accelerator": 1.0}, {"CPU": 8.0})
    assert 0.7 - 0.4 < 0.3
    assert fits({"CPU": 0.3}, {"CPU": 0.7 - 0.4})  # 0.29999999999999993: float noise


# ------------------------------------------------------------------------------ GPUs


def test_gpu_count_is_the_whole_gpus_declared() -> None:
    assert gpu_count(None) == 0
    assert gpu_count({"CPU": 4}) == 0
    assert gpu_count({"GPU": 2.0}) == 2
    assert gpu_count({"GPU": 1.5}) == 1


def test_whole_gpus_are_the_lowest_ids_nobody_uses() -> None:
    assert assign_gpus(0.0, 4, {}) == ()
    assert assign_gpus(1.0, 4, {}) == (0,)
    assert assign_gpus(2.0, 4, {0: 1.0, 1: 0.25}) == (2, 3)
    assert assign_gpus(1.0, 4, {0: 0.5, 1: 1.0, 2: 0.5, 3: 0.5}) is None
    assert assign_gpus(1.0, 0, {}) is None
    assert assign_gpus(3.0, 2, {}) is None


def test_a_fraction_goes_to_the_lowest_gpu_with_room_left() -> None:
    assert assign_gpus(0.5, 2, {}) == (0,)
    assert assign_gpus(0.5, 2, {0: 0.5}) == (0,)
    assert assign_gpus(0.5, 2, {0: 1.0}) == (1,)
    assert assign_gpus(0.6, 2, {0: 0.5, 1: 0.5}) is None
    assert assign_gpus(0.1, 1, {0: 0.3 + 0.3 + 0.3}) == (0,)
    assert assign_gpus(0.5, 0, {}) is None


def test_gpu_use_by_id_from_the_state() -> None:
    state = state_with({"GPU": 3}, Half={"num_gpus": 0.5}, Two={"num_gpus": 2})
    start(state, "Half", 1, (0,))
    start(state, "Half", 2, (0,))
    start(state, "Two", 3, (1, 2))
    assert gpu_use(state) == {0: 1.0, 1: 1.0, 2: 1.0}


# ---------------------------------------------------------------------------- ledger


def test_ledger_places_until_full_and_records_what_it_placed() -> None:
    state = state_with({"CPU": 4, "GPU": 2}, A={"num_gpus": 1})
    ledger = Ledger.of(state)
    assert ledger is not None and Ledger.of(state_with(None)) is None

    assert ledger.place({"GPU": 1.0, "CPU": 1.0}) == (0,)
    assert ledger.place({"GPU": 0.5}) == (1,)
    assert ledger.place({"GPU": 0.5}) == (1,)
    assert ledger.place({"GPU": 0.5}) is None
    assert ledger.place({"CPU": 3.5}) is None
    assert ledger.place({"CPU": 3.0}) == ()
    assert ledger.free() == {"CPU": 0.0, "GPU": 0.0}
    assert ledger.gpu_use() == {0: 1.0, 1: 1.0}


def test_why_not_says_what_is_free_of_what_the_instance_has() -> None:
    ledger = Ledger({"CPU": 8.0, "GPU": 1.0})
    ledger.add({"GPU": 1.0}, (0,))

    assert ledger.why_not("Model", 1, {"CPU": 1.0, "GPU": 1.0}) == (
        "1 replica of 'Model' cannot be placed: it needs {'CPU': 1.0, 'GPU': 1.0} and the "
        "instance has {'GPU': 0.0} free of {'GPU': 1.0}."
    )
    assert ledger.why_not("Model", 2, {"GPU": 1.0}).startswith(
        "2 replicas of 'Model' cannot be placed: each needs {'GPU': 1.0} and"
    )


def test_why_not_says_when_a_replica_can_never_fit() -> None:
    ledger = Ledger({"CPU": 8.0, "GPU": 0.0})

    assert ledger.never_fits({"GPU": 1.0, "CPU": 1.0}) == {"GPU": 0.0}
    assert ledger.why_not("Model", 1, {"GPU": 1.0}) == (
        "1 replica of 'Model' cannot be placed: it needs {'GPU': 1.0}, more than the "
        "instance has ({'GPU': 0.0}); lower ray_actor_options or start the instance with "
        "more resources."
    )
    assert Ledger({"CPU": 2.0}).never_fits({"accelerator": 1.0}) == {"accelerator": 0.0}
    assert Ledger({"GPU": 1.0}).never_fits({"GPU": 2.0}) == {"GPU": 1.0}
    assert Ledger({"GPU": 1.0}).never_fits({"GPU": 0.5}) == {}


def test_why_not_explains_gpus_split_between_replicas() -> None:
    ledger = Ledger({"GPU": 2.0})
    ledger.add({"GPU": 0.5}, (0,))
    ledger.add({"GPU": 0.5}, (1,))

    assert ledger.place({"GPU": 1.0}) is None
    assert ledger.why_not("Model", 1, {"GPU": 1.0}) == (
        "1 replica of 'Model' cannot be placed: it needs {'GPU': 1.0} and the instance has "
        "{'GPU': 1.0} free of {'GPU': 2.0}, but that is spread over GPUs partly in use "
        "(in use per GPU: {0: 0.5, 1: 0.5})."
    )
