"""Metrics without processes: merging expositions, the controller's families, event counts."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trioserve.core import events as ev
from trioserve.core.config import AutoscalingConfig, DeploymentConfig
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.metrics import (
    EventCounts,
    controller_families,
    merge_families,
    merge_texts,
    parse,
    render,
)
from trioserve.core.state import REASON_START_TIMEOUT, ClusterState, apply

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
T = TypeVar("T")


def samples_of(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    out: Samples = {}
    names: list[str] = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    assert len(names) == len(set(names)), f"a family appears twice: {names}"
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def replica_text(replica: str, requests: int, extra_help: str = "") -> bytes:
    registry = CollectorRegistry()
    counter = Counter(
        "ray_serve_deployment_request_counter",
        "Requests processed." + extra_help,
        ["deployment", "replica"],
        registry=registry,
    )
    counter.labels("D", replica).inc(requests)
    latency = Histogram(
        "ray_serve_deployment_processing_latency_ms",
        "Latency.",
        ["deployment", "replica"],
        buckets=(1, 10),
        registry=registry,
    )
    latency.labels("D", replica).observe(5)
    return generate_latest(registry)


# ------------------------------------------------------------------------ merging


def test_merging_keeps_one_family_per_name_with_every_source_s_series() -> None:
    own = CollectorRegistry()
    Gauge("ray_serve_num_ongoing_http_requests", "Ongoing.", registry=own).set(3)
    text = merge_texts(
        own.collect(),
        [replica_text("r1", 2), replica_text("r2", 5, extra_help=" (other help)")],
    )
    samples = samples_of(text)  # no duplicate family, no duplicate series
    assert text.count(b"# TYPE ray_serve_deployment_request_counter_total counter") == 1
    assert value(samples, "ray_serve_num_ongoing_http_requests") == 3
    total = "ray_serve_deployment_request_counter_total"
    assert value(samples, total, deployment="D", replica="r1") == 2
    assert value(samples, total, deployment="D", replica="r2") == 5
    bucket = "ray_serve_deployment_processing_latency_ms_bucket"
    assert value(samples, bucket, deployment="D", replica="r2", le="10.0") == 1
    assert value(samples, bucket, deployment="D", replica="r2", le="1.0") == 0
    assert value(samples, "ray_serve_deployment_processing_latency_ms_count",
                 deployment="D", replica="r1") == 1  # fmt: skip


def test_merging_drops_repeated_series_and_conflicting_types() -> None:
    gauge = CollectorRegistry()
    Gauge("ray_serve_deployment_request_counter", "Not a counter.", registry=gauge).set(1)
    text = merge_texts([], [replica_text("r1", 2), replica_text("r1", 9), generate_latest(gauge)])
    samples = samples_of(text)
    assert value(samples, "ray_serve_deployment_request_counter_total",
                 deployment="D", replica="r1") == 2  # fmt: skip
    assert ("ray_serve_deployment_request_counter", frozenset()) not in samples


def test_a_source_that_does_not_parse_is_skipped() -> None:
    assert parse("this is { not prometheus") == []
    text = merge_texts([], ["garbage {{{", replica_text("r1", 1)])
    assert value(samples_of(text), "ray_serve_deployment_request_counter_total",
                 deployment="D", replica="r1") == 1  # fmt: skip


def test_labels_are_escaped_on_the_way_through() -> None:
    registry = CollectorRegistry()
    c = Counter("user_things", "Things.", ["thing"], registry=registry)
    c.labels('a "quoted"\nname\\').inc()
    merged = render(merge_families([parse(generate_latest(registry))]))
    assert value(samples_of(merged), "user_things_total", thing='a "quoted"\nname\\') == 1


# ------------------------------------------------------------------------ controller


def spec(name: str, **config: object) -> DeploymentSpec:
    return DeploymentSpec(name=name, code_version="v1", config=DeploymentConfig(**config))  # type: ignore[arg-type]


def starting(replica: str, dep: str = "D", at: float = 1.0) -> ev.ReplicaStarting:
    return ev.ReplicaStarting(
        at=at,
        replica=replica,
        app="app",
        deployment=dep,
        code_version="v1",
        config_version=DeploymentConfig().lightweight_digest(),
        reason="scale up",
    )


def history() -> list[Event]:
    auto = AutoscalingConfig(min_replicas=1, max_replicas=5)
    return [
        ev.AppDeployed(
            at=0,
            app="app",
            route_prefix="/",
            ingress="D",
            deployments=(spec("D", num_replicas=2), spec("A", autoscaling_config=auto)),
        ),
        ev.ProxyStarted(at=0, pid=42, url="http://127.0.0.1:1"),
        starting("D#1"),
        starting("D#2"),
        ev.ReplicaRunning(at=2, replica="D#1", address="tcp://x:1", pid=10),
        ev.ReplicaStartFailed(at=2, replica="D#2", error="tb"),
        ev.ReplicaExited(at=3, replica="D#2", exit_code=1),
        starting("D#3"),
        ev.ReplicaRunning(at=4, replica="D#3", address="tcp://x:3", pid=11),
        ev.HealthCheckFailed(at=5, replica="D#3", consecutive=1, error="slow"),
        ev.ReplicaDied(at=6, replica="D#1", exit_code=-9, reason="killed"),
        starting("D#4"),
        ev.ReplicaStopping(at=7, replica="D#4", reason=REASON_START_TIMEOUT),
        starting("A#1", dep="A"),
    ]


def state_of(events: list[Event]) -> ClusterState:
    state = ClusterState()
    for event in events:
        apply(state, event)
    return state


def test_controller_families_count_replicas_by_state_and_show_targets() -> None:
    samples = samples_of(render(controller_families(state_of(history()))))
    replicas = "trioserve_replicas"
    assert value(samples, replicas, application="app", deployment="D", state="RUNNING") == 1
    assert value(samples, replicas, application="app", deployment="D", state="STOPPING") == 2
    assert value(samples, replicas, application="app", deployment="D", state="STARTING") == 0
    assert value(samples, replicas, application="app", deployment="A", state="STARTING") == 1
    target = "trioserve_deployment_target_replicas"
    assert value(samples, target, application="app", deployment="D") == 2
    assert value(samples, target, application="app", deployment="A") == 1
    # only autoscaling deployments have an autoscaling target
    autoscaling = "ray_serve_autoscaling_target_replicas"
    assert value(samples, autoscaling, application="app", deployment="A") == 1
    assert (autoscaling, frozenset({("application", "app"), ("deployment", "D")})) not in samples
    healthy = "ray_serve_deployment_replica_healthy"
    assert value(samples, healthy, application="app", deployment="D", replica="D#3") == 0
    assert value(samples, "ray_serve_proxy_status") == 2
    assert value(samples, "ray_serve_application_status", application="app") in range(1, 7)


def test_controller_families_of_an_empty_state() -> None:
    samples = samples_of(render(controller_families(ClusterState())))
    assert value(samples, "ray_serve_proxy_status") == 1  # starting
    assert not [k for k in samples if k[0] == "trioserve_replicas"]


def test_event_counts_count_starts_failures_deaths_and_health_checks() -> None:
    events = history()
    events.append(
        ev.AutoscaleDecision(
            at=8, app="app", deployment="A", from_replicas=1, to_replicas=3, reason="", evidence={}
        )
    )
    counts = EventCounts()
    counts.catch_up(enumerate(events, start=1))
    counts.catch_up(enumerate(events, start=1))  # events already counted are not counted again
    assert counts.seq == len(events)
    samples = samples_of(render(counts.families()))
    d = {"application": "app", "deployment": "D"}
    assert value(samples, "ray_serve_deployment_replica_starts_total", **d) == 4
    # a constructor error and a start timeout; the death of a running replica is not one
    assert value(samples, "trioserve_replica_start_failures_total", **d) == 2
    assert value(samples, "trioserve_replica_deaths_total", **d) == 1
    assert value(samples, "ray_serve_health_check_failures_total", **d) == 1
    assert value(samples, "ray_serve_deployment_replica_starts_total",
                 application="app", deployment="A") == 1  # fmt: skip
    assert value(samples, "trioserve_autoscaling_decisions_total",
                 application="app", deployment="A", direction="up") == 1  # fmt: skip
    assert value(samples, "trioserve_controller_events_total", kind="ReplicaStarting") == 5


# ------------------------------------------------------------------------ proxy


def test_proxy_metrics_bound_the_method_label_and_count_clients_that_left() -> None:
    from trioserve.proxy.metrics import ProxyMetrics

    metrics = ProxyMetrics()
    metrics.observe("/a", "app", "D", "GET", 200, 0.003)
    metrics.observe("/a", "app", "D", "BREW", 200, 0.003)
    metrics.observe("/a", "app", "D", "GET", "cancelled", 0.5)
    metrics.observe("/a", "app", "D", "POST", 503, 0.001)
    samples = samples_of(metrics.own())
    requests = "ray_serve_num_http_requests_total"
    labels = {"route": "/a", "application": "app"}
    assert value(samples, requests, method="GET", status_code="200", **labels) == 1
    assert value(samples, requests, method="OTHER", status_code="200", **labels) == 1
    assert value(samples, requests, method="GET", status_code="499", **labels) == 1
    assert value(samples, "ray_serve_num_http_error_requests_total",
                 route="/a", application="app", method="POST", error_code="503") == 1  # fmt: skip
    assert value(samples, "ray_serve_num_deployment_http_error_requests_total", deployment="D",
                 route="/a", application="app", method="POST", error_code="503") == 1  # fmt: skip
    assert value(samples, "ray_serve_http_request_latency_ms_bucket",
                 method="GET", status_code="200", le="5.0", **labels) == 1  # fmt: skip
    assert value(samples, "ray_serve_num_ongoing_http_requests") == 0


def test_event_counts_read_the_log_through_the_controllers_db_worker() -> None:
    from trioserve.core.metrics import _event_counts
    from trioserve.store import EventLog

    events = history()
    log = EventLog.open("sqlite://")  # in memory: one connection, shared by the threads
    log.append(events)
    loop_thread = threading.get_ident()
    used: list[int] = []

    class Controller:
        """What :func:`_event_counts` uses of a controller."""

        journal = types.SimpleNamespace(seq=len(events), log=log)

        async def _db(self, fn: Callable[[], T]) -> T:
            def run() -> T:
                used.append(threading.get_ident())
                return fn()

            return await anyio.to_thread.run_sync(run)

    families = trio.run(_event_counts, Controller())
    assert used and loop_thread not in used  # never on the loop's thread, beside the _db one
    samples = samples_of(render(families))
    assert value(samples, "trioserve_controller_events_total", kind="ReplicaStarting") == 5
