"""The event vocabulary and its codec: what the log can store and read back."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import msgpack
import pytest

from trioserve.core import events as ev
from trioserve.core.autoscaling import LoadSample, autoscale, samples_from_evidence
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import (
    DECISION_KINDS,
    EVENT_TYPES,
    DeploymentSpec,
    Event,
    EventDecodeError,
    EventVersionError,
    decode,
    encode,
    register,
    register_upcaster,
)

# ------------------------------------------------------------------ realistic events

PRICING_AUTOSCALING = AutoscalingConfig(
    min_replicas=1,
    initial_replicas=2,
    max_replicas=4,
    target_ongoing_requests=1.5,
    metrics_interval_s=0.5,
    look_back_period_s=2.0,
    upscaling_factor=1.5,
    downscale_delay_s=5.0,
    downscale_to_zero_delay_s=None,
    upscale_delay_s=1.0,
    aggregation_function="max",
)

PRICING = DeploymentSpec(
    name="Pricing",
    code_version="c0ffee01",
    config=DeploymentConfig(
        num_replicas=None,
        autoscaling_config=PRICING_AUTOSCALING,
        max_ongoing_requests=8,
        max_queued_requests=100,
        user_config={
            "model": "gbm-v3",
            "thresholds": [0.25, 0.5, 0.75],
            "regions": {"eu": {"currency": "EUR", "tax": 0.2}, "us": {"currency": "USD"}},
            "features": [{"name": "price", "log": True}, {"name": "qty", "log": False}],
            "fallback": None,
        },
        graceful_shutdown_wait_loop_s=0.2,
        graceful_shutdown_timeout_s=1.0,
        health_check_period_s=0.5,
        health_check_timeout_s=1.0,
        ray_actor_options={"num_cpus": 0.5},
        logging_config={"log_level": "DEBUG"},
        version="2024-06-01",
    ),
    source="blob:" + "ab" * 32,
    init_args="cd" * 32,
)

CART = DeploymentSpec(
    name="Cart",
    code_version="c0ffee01",
    config=DeploymentConfig(num_replicas=2),
    source="import:shop.cart:Cart",
)


def _real_evidence() -> dict[str, Any]:
    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=1,
        metrics_interval_s=1,
        look_back_period_s=2,
        upscale_delay_s=2,
        downscale_delay_s=10,
    )
    samples = [LoadSample(float(t), 2.0, 1.0) for t in range(10)]
    choice = autoscale(config, target=1, running=1, samples=samples, now=9.0, last_scale_at=None)
    assert choice is not None
    return choice.evidence


EVIDENCE = _real_evidence()

SAMPLES: list[Event] = [
    ev.AppDeployed(
        at=1.5, app="shop", route_prefix="/shop", ingress="Cart", deployments=(CART, PRICING)
    ),
    ev.AppDeleted(at=90.0, app="shop"),
    ev.DeploymentScaled(at=12.0, app="shop", deployment="Cart", num_replicas=3),
    ev.ControllerStarted(
        at=0.0,
        instance_id="9f" * 16,
        pid=4242,
        start_timeout_s=5.0,
        stop_timeout_s=1.0,
        resources={"CPU": 16.0, "GPU": 2.0, "memory": 64.0 * 2**30, "accelerator": 1.0},
    ),
    ev.ReplicaRunning(at=2.25, replica="shop#Cart#1", address="127.0.0.1:52011", pid=5001),
    ev.ReplicaStartFailed(
        at=2.5,
        replica="shop#Pricing#3",
        error='Traceback (most recent call last):\n  File "pricing.py", line 4\nKeyError: "model"',
    ),
    ev.ReplicaDied(at=30.0, replica="shop#Cart#2", exit_code=-9, reason="killed by signal 9"),
    ev.ReplicaDrained(at=41.0, replica="shop#Cart#1"),
    ev.ReplicaExited(at=41.5, replica="shop#Cart#1", exit_code=None),
    ev.HealthCheckFailed(at=20.0, replica="shop#Cart#1", consecutive=2, error="timed out"),
    ev.HealthCheckPassed(at=21.0, replica="shop#Cart#1"),
    ev.ProxyStarted(at=21.5, pid=4300, url="http://127.0.0.1:8000", event_loop="asyncio"),
    ev.ProxyExited(at=21.7, pid=4300, exit_code=-9, reason="killed by SIGKILL"),
    ev.ConfigDeployed(
        at=95.0,
        config={"applications": [{"name": "shop", "import_path": "shop.app:app", "args": {}}]},
    ),
    ev.ReplicaAdopted(at=96.0, replica="shop#Pricing#4", pid=4411),
    ev.ReplicaStarting(
        at=1.5,
        replica="shop#Pricing#4",
        app="shop",
        deployment="Pricing",
        code_version=PRICING.code_version,
        config_version=PRICING.config_version,
        reason="scale up",
        gpu_ids=(0, 1),
    ),
    ev.ReplicaReconfigured(at=15.0, replica="shop#Pricing#4", config_version="0123456789abcdef"),
    ev.ReplicaDraining(at=40.0, replica="shop#Cart#1", reason="scale down"),
    ev.ReplicaStopping(at=42.0, replica="shop#Cart#1", reason="start timeout"),
    ev.ReplicaKilled(at=55.0, replica="shop#Cart#1", reason="did not exit within 1s of stopping"),
    ev.AutoscaleDecision(
        at=9.0,
        app="shop",
        deployment="Pricing",
        from_replicas=1,
        to_replicas=3,
        reason="upscale: mean load 3 over 2s on 1 running replica(s)",
        evidence=EVIDENCE,
    ),
    ev.DeploymentFailed(
        at=33.0, app="shop", deployment="Pricing", failures=6, error="KeyError: 'model'"
    ),
    ev.DeploymentPending(
        at=34.0,
        app="shop",
        deployment="Pricing",
        message=(
            "1 replica of 'Pricing' cannot be placed: it needs {'GPU': 1.0} and the instance "
            "has {'GPU': 0.0} free of {'GPU': 2.0}."
        ),
    ),
    ev.DeploymentRemoved(at=95.0, app="shop", deployment="Cart"),
    ev.AppRemoved(at=96.0, app="shop"),
]

BUILT_IN_KINDS = {e.KIND for e in SAMPLES}


def _registered_kinds() -> set[str]:
    # Test modules register their own kinds, all named with a leading underscore.
    return {kind for kind in EVENT_TYPES if not kind.startswith("_")}


# ------------------------------------------------------------------------- round trip


def test_every_registered_kind_has_a_realistic_sample_here() -> None:
    assert len(SAMPLES) == len(BUILT_IN_KINDS)
    assert BUILT_IN_KINDS == _registered_kinds()


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.KIND)
def test_encode_then_decode_gives_the_same_event(event: Event) -> None:
    kind, version, payload = encode(event)

    assert (kind, version) == (event.KIND, type(event).VERSION)
    assert isinstance(payload, bytes)
    decoded = decode(kind, version, payload)
    assert type(decoded) is type(event)
    assert decoded == event
    # Decoding is not lossy: encoding again gives the very same bytes (the hash
    # chain is computed over them).
    assert encode(decoded) == (kind, version, payload)


def test_app_deployed_keeps_nested_configs_through_the_codec() -> None:
    (event,) = [e for e in SAMPLES if isinstance(e, ev.AppDeployed)]

    decoded = decode(*encode(event))

    assert isinstance(decoded, ev.AppDeployed)
    assert isinstance(decoded.deployments, tuple)
    cart, pricing = decoded.deployments
    assert cart == CART
    assert pricing.config.autoscaling_config == PRICING_AUTOSCALING
    assert isinstance(pricing.config.autoscaling_config, AutoscalingConfig)
    assert pricing.config.user_config["regions"]["eu"] == {"currency": "EUR", "tax": 0.2}
    assert pricing.config.user_config["features"][1] == {"name": "qty", "log": False}
    assert pricing.config_version == PRICING.config_version
    assert pricing.config.initial_target == 2


def test_autoscale_evidence_read_back_gives_the_samples_it_recorded() -> None:
    (event,) = [e for e in SAMPLES if isinstance(e, ev.AutoscaleDecision)]

    decoded = decode(*encode(event))

    assert isinstance(decoded, ev.AutoscaleDecision)
    assert samples_from_evidence(decoded.evidence) == samples_from_evidence(EVIDENCE)
    assert samples_from_evidence(decoded.evidence)[-1] == LoadSample(9.0, 2.0, 1.0)


# ------------------------------------------------------------------- decode failures


def test_decode_of_an_unknown_kind_names_it() -> None:
    payload = msgpack.packb({"at": 1.0, "replica": "r"})

    with pytest.raises(EventDecodeError, match="unknown event kind 'ReplicaTeleported'"):
        decode("ReplicaTeleported", 1, payload)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x82\xa2at", "not valid msgpack"),  # truncated map
        (msgpack.packb({"at": 1.0, "replica": "r"}) + b"\x00", "not valid msgpack"),
        (msgpack.packb([1.0, "shop#Cart#1"]), "not a map"),
        (msgpack.packb({"at": 1.0}), "does not fit"),
        (msgpack.packb({"at": 1.0, "replica": "r", "colour": "red"}), "does not fit"),
        (msgpack.packb({1: 2}), "does not fit"),
    ],
    ids=["reserved-byte", "truncated", "trailing-bytes", "array", "missing", "extra", "int-key"],
)
def test_decode_of_a_garbage_payload_is_a_decode_error_naming_the_kind(
    payload: bytes, fragment: str
) -> None:
    with pytest.raises(EventDecodeError, match=fragment) as info:
        decode("ReplicaDrained", 1, payload)

    assert "'ReplicaDrained'" in str(info.value)
    assert not isinstance(info.value, EventVersionError)


def test_decode_of_an_app_deployed_with_an_invalid_config_is_a_decode_error() -> None:
    kind, version, payload = encode(SAMPLES[0])
    data = msgpack.unpackb(payload)
    data["deployments"][0]["config"]["max_ongoing_requests"] = 0

    with pytest.raises(EventDecodeError, match=r"'AppDeployed'.*max_ongoing_requests"):
        decode(kind, version, msgpack.packb(data))


def test_decode_of_a_newer_version_asks_for_an_upgrade() -> None:
    kind, version, payload = encode(ev.ReplicaDrained(at=1.0, replica="shop#Cart#1"))

    with pytest.raises(EventVersionError) as info:
        decode(kind, version + 1, payload)

    message = str(info.value)
    assert "'ReplicaDrained'" in message
    assert f"version {version + 1}" in message
    assert f"up to {version}" in message
    assert "upgrade" in message
    assert isinstance(info.value, EventDecodeError)


# ------------------------------------------------------------------------ upcasting


@register
@dataclasses.dataclass(frozen=True)
class _CoreTestReplicaPinged(Event):
    """Version 3. v1 had ``replica_id``; v2 renamed it ``replica``; v3 added ``rtt_s``."""

    KIND: ClassVar[str] = "_CoreTestReplicaPinged"
    VERSION: ClassVar[int] = 3
    FAMILY: ClassVar[str] = "observation"

    replica: str
    rtt_s: float


def _pinged_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["replica"] = data.pop("replica_id")
    return data


def _pinged_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "rtt_s": -1.0}


register_upcaster("_CoreTestReplicaPinged", 1, _pinged_v1_to_v2)
register_upcaster("_CoreTestReplicaPinged", 2, _pinged_v2_to_v3)


@register
@dataclasses.dataclass(frozen=True)
class _CoreTestNoUpcaster(Event):
    KIND: ClassVar[str] = "_CoreTestNoUpcaster"
    VERSION: ClassVar[int] = 2
    FAMILY: ClassVar[str] = "observation"

    replica: str


def test_old_payloads_are_upcast_through_every_version() -> None:
    v1 = msgpack.packb({"at": 3.0, "replica_id": "shop#Cart#7"})
    v2 = msgpack.packb({"at": 4.0, "replica": "shop#Cart#8"})

    assert decode("_CoreTestReplicaPinged", 1, v1) == _CoreTestReplicaPinged(
        at=3.0, replica="shop#Cart#7", rtt_s=-1.0
    )
    assert decode("_CoreTestReplicaPinged", 2, v2) == _CoreTestReplicaPinged(
        at=4.0, replica="shop#Cart#8", rtt_s=-1.0
    )


def test_a_version_1_controller_started_is_read_without_resource_accounting() -> None:
    v1 = msgpack.packb(
        {
            "at": 0.0,
            "instance_id": "9f" * 16,
            "pid": 4242,
            "start_timeout_s": 5.0,
            "stop_timeout_s": 1.0,
        }
    )

    event = decode("ControllerStarted", 1, v1)

    assert event == ev.ControllerStarted(
        at=0.0,
        instance_id="9f" * 16,
        pid=4242,
        start_timeout_s=5.0,
        stop_timeout_s=1.0,
        resources=None,
    )
    # Written again, it is a version 2 event that reads back the same.
    kind, version, payload = encode(event)
    assert (kind, version) == ("ControllerStarted", 2)
    assert msgpack.unpackb(payload)["resources"] is None
    assert decode(kind, version, payload) == event


def test_a_version_1_replica_starting_is_read_with_no_gpus() -> None:
    v1 = msgpack.packb(
        {
            "at": 1.5,
            "replica": "shop#Pricing#4",
            "app": "shop",
            "deployment": "Pricing",
            "code_version": "c0ffee01",
            "config_version": "0123456789abcdef",
            "reason": "scale up",
        }
    )

    event = decode("ReplicaStarting", 1, v1)

    assert isinstance(event, ev.ReplicaStarting)
    assert event.gpu_ids == ()
    assert event.replica == "shop#Pricing#4" and event.reason == "scale up"
    assert encode(event)[1] == 2


def test_gpu_ids_come_back_as_a_tuple() -> None:
    event = ev.ReplicaStarting(
        at=1.0,
        replica="shop#Model#1",
        app="shop",
        deployment="Model",
        code_version="v1",
        config_version="c1",
        reason="scale up",
        gpu_ids=(3,),
    )

    decoded = decode(*encode(event))

    assert isinstance(decoded, ev.ReplicaStarting)
    assert decoded.gpu_ids == (3,) and isinstance(decoded.gpu_ids, tuple)


def test_current_version_payloads_are_not_upcast() -> None:
    event = _CoreTestReplicaPinged(at=5.0, replica="shop#Cart#9", rtt_s=0.004)

    assert decode(*encode(event)) == event


def test_a_missing_upcaster_is_a_decode_error_naming_kind_and_version() -> None:
    payload = msgpack.packb({"at": 1.0, "replica": "r"})

    with pytest.raises(EventDecodeError, match=r"upcaster.*'_CoreTestNoUpcaster' version 1"):
        decode("_CoreTestNoUpcaster", 1, payload)


# -------------------------------------------------------------------- registration


def test_encode_refuses_an_unregistered_subclass_of_a_known_kind() -> None:
    @dataclasses.dataclass(frozen=True)
    class LoudDrained(ev.ReplicaDrained):
        volume: int = 11

    with pytest.raises(TypeError, match="LoudDrained is not a registered event type"):
        encode(LoudDrained(at=1.0, replica="shop#Cart#1"))


def test_encode_refuses_an_unregistered_kind() -> None:
    @dataclasses.dataclass(frozen=True)
    class ReplicaTeleported(Event):
        KIND: ClassVar[str] = "_CoreTestNeverRegistered"

        replica: str

    with pytest.raises(TypeError, match="ReplicaTeleported is not a registered event type"):
        encode(ReplicaTeleported(at=1.0, replica="shop#Cart#1"))


def test_register_refuses_a_second_class_for_a_registered_kind() -> None:
    @dataclasses.dataclass(frozen=True)
    class Impostor(Event):
        KIND: ClassVar[str] = "ReplicaDrained"

        replica: str

    with pytest.raises(ValueError, match="'ReplicaDrained' is already registered"):
        register(Impostor)
    assert EVENT_TYPES["ReplicaDrained"] is ev.ReplicaDrained
    assert register(ev.ReplicaDrained) is ev.ReplicaDrained  # registering again is harmless


# ------------------------------------------------------------------- vocabulary facts


def test_decision_kinds_are_exactly_what_decide_may_emit() -> None:
    assert {
        "ReplicaStarting",
        "ReplicaReconfigured",
        "ReplicaDraining",
        "ReplicaStopping",
        "ReplicaKilled",
        "AutoscaleDecision",
        "DeploymentFailed",
        "DeploymentPending",
        "DeploymentRemoved",
        "AppRemoved",
    } == DECISION_KINDS


def test_every_kind_belongs_to_one_family() -> None:
    families = {e.KIND: type(e).FAMILY for e in SAMPLES}

    assert {k for k, f in families.items() if f == "intent"} == {
        "AppDeployed",
        "AppDeleted",
        "DeploymentScaled",
        "ConfigDeployed",
    }
    assert {k for k, f in families.items() if f == "decision"} == DECISION_KINDS
    assert {k for k, f in families.items() if f == "observation"} == (
        BUILT_IN_KINDS
        - DECISION_KINDS
        - {"AppDeployed", "AppDeleted", "DeploymentScaled", "ConfigDeployed"}
    )


@pytest.mark.parametrize(
    ("kind", "subject"),
    [
        ("AppDeployed", "shop"),
        ("AppDeleted", "shop"),
        ("AppRemoved", "shop"),
        ("DeploymentScaled", "shop/Cart"),
        ("DeploymentRemoved", "shop/Cart"),
        ("AutoscaleDecision", "shop/Pricing"),
        ("DeploymentFailed", "shop/Pricing"),
        ("DeploymentPending", "shop/Pricing"),
        ("ReplicaStarting", "shop#Pricing#4"),
        ("ReplicaRunning", "shop#Cart#1"),
        ("HealthCheckFailed", "shop#Cart#1"),
        ("ControllerStarted", "-"),
    ],
)
def test_subject_names_what_the_event_is_about(kind: str, subject: str) -> None:
    (event,) = [e for e in SAMPLES if e.KIND == kind]

    assert event.subject() == subject
