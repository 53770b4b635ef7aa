"""The metrics of one replica process, in a registry of its own.

The host (:mod:`trioserve.replica.host`) names the replica with
:func:`set_identity` and records every request it admits with
:func:`request_done`; ``@serve.batch`` records each batch with
:func:`batch_run`, ``@serve.multiplexed`` each model load and unload with
:func:`model_loaded` / :func:`model_unloaded`. :func:`exposition` is what the
replica's ``metrics`` RPC method answers: these metrics, plus those of the
process's default Prometheus registry (the user's own metrics, and the
``process_*`` / ``python_*`` collectors) with ``application``, ``deployment``
and ``replica`` labels added, so that the same metric from two replicas stays
two series. Label children are cached by their label values, so recording a
request costs a dict lookup, a counter increment and a histogram observation.

Outside a replica (a batched function called in a driver) the functions still
work, with empty identity labels; nothing reads them there.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from trioserve.core.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_MS, merge_families, render

__all__ = [
    "batch_run",
    "exposition",
    "model_loaded",
    "model_unloaded",
    "registry",
    "request_done",
    "set_identity",
    "set_ongoing",
]

log = logging.getLogger("trioserve.replica")

registry = CollectorRegistry(auto_describe=True)
"""This process's trioserve metrics (never the default registry, which is the user's)."""

_IDENTITY = ["application", "deployment", "replica"]
_identity: tuple[str, str, str] = ("", "", "")

_requests = Counter(
    "ray_serve_deployment_request_counter",
    "Requests processed by the replica.",
    [*_IDENTITY, "route", "method"],
    registry=registry,
)
_errors = Counter(
    "ray_serve_deployment_error_counter",
    "Requests that raised (or answered HTTP 5xx) in the replica.",
    [*_IDENTITY, "route", "method"],
    registry=registry,
)
_latency = Histogram(
    "ray_serve_deployment_processing_latency_ms",
    "Request processing time in the replica, in milliseconds.",
    [*_IDENTITY, "route", "method"],
    buckets=LATENCY_BUCKETS_MS,
    registry=registry,
)
_ongoing = Gauge(
    "ray_serve_replica_processing_queries",
    "Requests being processed by the replica.",
    _IDENTITY,
    registry=registry,
)
_batch_size = Histogram(
    "ray_serve_actual_batch_size",
    "Requests in each batch a @serve.batch function ran.",
    [*_IDENTITY, "function_name"],
    buckets=BATCH_SIZE_BUCKETS,
    registry=registry,
)
_batch_wait = Histogram(
    "ray_serve_batch_wait_time_ms",
    "How long the first request of each batch waited for the batch to form, in milliseconds.",
    [*_IDENTITY, "function_name"],
    buckets=LATENCY_BUCKETS_MS,
    registry=registry,
)
_batch_execution = Histogram(
    "ray_serve_batch_execution_time_ms",
    "How long each batch took to run, in milliseconds.",
    [*_IDENTITY, "function_name"],
    buckets=LATENCY_BUCKETS_MS,
    registry=registry,
)
_model_loads = Counter(
    "ray_serve_multiplexed_models_load_counter",
    "Models loaded by @serve.multiplexed functions.",
    _IDENTITY,
    registry=registry,
)
_model_load_latency = Histogram(
    "ray_serve_multiplexed_model_load_latency_ms",
    "Time to load a model, in milliseconds.",
    _IDENTITY,
    buckets=LATENCY_BUCKETS_MS,
    registry=registry,
)
_model_unloads = Counter(
    "ray_serve_multiplexed_models_unload_counter",
    "Models unloaded (evicted) by @serve.multiplexed functions.",
    _IDENTITY,
    registry=registry,
)
_model_unload_latency = Histogram(
    "ray_serve_multiplexed_model_unload_latency_ms",
    "Time to unload a model, in milliseconds.",
    _IDENTITY,
    buckets=LATENCY_BUCKETS_MS,
    registry=registry,
)
_models = Gauge(
    "ray_serve_num_multiplexed_models",
    "Models the replica holds.",
    _IDENTITY,
    registry=registry,
)

_request_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
_batch_children: dict[str, tuple[Any, Any, Any]] = {}
_model_children: tuple[Any, Any, Any, Any] | None = None


def set_identity(app: str, deployment: str, replica: str) -> None:
    """Name this replica in the labels of its metrics (the host calls it once)."""
    global _identity, _model_children
    _identity = (app, deployment, replica)
    _request_children.clear()
    _batch_children.clear()
    _model_children = None
    _models.labels(*_identity).set_function(_count_models)


def set_ongoing(ongoing: Any) -> None:
    """Report ``ongoing()`` as the replica's ongoing requests (read at scrape time)."""
    _ongoing.labels(*_identity).set_function(ongoing)


def _count_models() -> float:
    from trioserve.replica import multiplex

    return float(multiplex.model_count())


def request_done(route: str, method: str, failed: bool, elapsed_s: float) -> None:
    """Record one request the replica processed."""
    key = (route, method)
    children = _request_children.get(key)
    if children is None:
        labels = (*_identity, route, method)
        children = (_requests.labels(*labels), _errors.labels(*labels), _latency.labels(*labels))
        _request_children[key] = children
    children[0].inc()
    if failed:
        children[1].inc()
    children[2].observe(elapsed_s * 1000.0)


def batch_run(function_name: str, size: int, wait_s: float, execution_s: float) -> None:
    """Record one batch of ``size`` requests, formed in ``wait_s`` and run in ``execution_s``."""
    children = _batch_children.get(function_name)
    if children is None:
        labels = (*_identity, function_name)
        children = (
            _batch_size.labels(*labels),
            _batch_wait.labels(*labels),
            _batch_execution.labels(*labels),
        )
        _batch_children[function_name] = children
    children[0].observe(size)
    children[1].observe(max(wait_s, 0.0) * 1000.0)
    children[2].observe(max(execution_s, 0.0) * 1000.0)


def _model_metrics() -> tuple[Any, Any, Any, Any]:
    global _model_children
    if _model_children is None:
        _model_children = (
            _model_loads.labels(*_identity),
            _model_load_latency.labels(*_identity),
            _model_unloads.labels(*_identity),
            _model_unload_latency.labels(*_identity),
        )
    return _model_children


def model_loaded(elapsed_s: float) -> None:
    """Record one model load that succeeded."""
    loads, latency, _, _ = _model_metrics()
    loads.inc()
    latency.observe(elapsed_s * 1000.0)


def model_unloaded(elapsed_s: float) -> None:
    """Record one model unloaded (evicted, or at shutdown)."""
    _, _, unloads, latency = _model_metrics()
    unloads.inc()
    latency.observe(elapsed_s * 1000.0)


def _labelled(family: Metric) -> Metric:
    """``family`` with the replica's identity added to each sample's labels (the
    sample's own labels win)."""
    extra = dict(zip(_IDENTITY, _identity, strict=True))
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = [s._replace(labels={**extra, **s.labels}) for s in family.samples]
    return copy


def exposition() -> str:
    """The text the ``metrics`` RPC method answers (see the module docstring)."""
    own = list(registry.collect())
    try:
        user = [_labelled(f) for f in REGISTRY.collect()]
    except Exception:  # a broken user collector must not hide the replica's metrics
        log.exception("collecting the default Prometheus registry failed")
        user = []
    return render(merge_families([own, user])).decode()
