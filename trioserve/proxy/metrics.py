"""The HTTP proxy's metrics, and what its ``/-/metrics`` answers.

:class:`ProxyMetrics` keeps the proxy's metrics in a registry of its own:

- ``ray_serve_num_http_requests_total`` {route, method, application, status_code}
  and ``ray_serve_http_request_latency_ms`` {same} for every request the proxy
  answered (the proxy's own ``/-/`` paths excepted); a request refused before
  it matched a route (404, 503 while the route table is unknown) has
  ``route`` and ``application`` empty; a client that left before the response
  ended counts as ``499``;
- ``ray_serve_num_http_error_requests_total`` {route, error_code, method,
  application} and ``ray_serve_num_deployment_http_error_requests_total``
  {deployment, error_code, method, route, application} for answers of 4xx/5xx;
- ``ray_serve_num_ongoing_http_requests`` (a gauge read at scrape time);
- ``ray_serve_deployment_queued_queries`` {application, deployment}: requests
  waiting in the proxy's routers for a replica (the number the routers report
  to the controller for autoscaling), read at scrape time.

:meth:`ProxyMetrics.scrape` is the ``/-/metrics`` body: the proxy's metrics
merged with those of every replica of the instance. The replicas are those the
controller's ``status`` lists as RUNNING or DRAINING (so replicas of
deployments the proxy never routed to are included); when the controller does
not answer, the replicas the proxy's routers know. Each replica is asked over
RPC, concurrently, within :data:`~trioserve.core.metrics.SCRAPE_TIMEOUT_S`; one
that does not answer is left out. ``/-/metrics?scope=proxy`` answers the
proxy's own metrics only (what the admin API's ``/-/metrics`` merges with the
replicas it asks itself).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trioserve.core import rpc
from trioserve.core.metrics import (
    LATENCY_BUCKETS_MS,
    SCRAPE_TIMEOUT_S,
    fetch_replica_metrics,
    merge_texts,
)
from trioserve.core.routing import Routers

__all__ = ["CLIENT_GONE_STATUS", "ProxyMetrics"]

log = logging.getLogger("trioserve.proxy")

CLIENT_GONE_STATUS = "499"
"""The ``status_code`` label of a request whose client left before the response ended."""

_LABELS = ["route", "method", "application", "status_code"]
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "WEBSOCKET")
)
"""The ``method`` label values; any other method a client sends counts as ``OTHER``
(so that clients cannot make series without end)."""


class ProxyMetrics:
    """The proxy's metrics; ``routers`` gives the queued requests and, as a
    fallback, the replica addresses."""

    def __init__(self, routers: Routers | None = None) -> None:
        self.routers = routers
        self.registry = CollectorRegistry(auto_describe=True)
        self.ongoing = 0
        """HTTP requests (and WebSockets) the proxy is answering now."""
        self._requests = Counter(
            "ray_serve_num_http_requests",
            "HTTP requests processed by the proxy.",
            _LABELS,
            registry=self.registry,
        )
        self._latency = Histogram(
            "ray_serve_http_request_latency_ms",
            "End-to-end HTTP request latency at the proxy, in milliseconds.",
            _LABELS,
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self._errors = Counter(
            "ray_serve_num_http_error_requests",
            "HTTP requests the proxy answered with a 4xx or 5xx status.",
            ["route", "error_code", "method", "application"],
            registry=self.registry,
        )
        self._deployment_errors = Counter(
            "ray_serve_num_deployment_http_error_requests",
            "HTTP requests answered with a 4xx or 5xx status, by ingress deployment.",
            ["deployment", "error_code", "method", "route", "application"],
            registry=self.registry,
        )
        self.registry.register(_Gauges(self))
        self._children: dict[tuple[str, str, str, str, str], tuple[Any, Any, Any, Any]] = {}

    def observe(
        self,
        route: str,
        application: str,
        deployment: str,
        method: str,
        status: int | str,
        elapsed_s: float,
    ) -> None:
        """Record one request the proxy answered (``status``: the code sent, or
        ``"cancelled"`` when the client left)."""
        code = str(status) if isinstance(status, int) else CLIENT_GONE_STATUS
        if method not in _METHODS:
            method = "OTHER"
        key = (route, application, deployment, method, code)
        children = self._children.get(key)
        if children is None:
            labels = (route, method, application, code)
            error = code[0] in "45"
            children = (
                self._requests.labels(*labels),
                self._latency.labels(*labels),
                self._errors.labels(route, code, method, application) if error else None,
                (
                    self._deployment_errors.labels(deployment, code, method, route, application)
                    if error and deployment
                    else None
                ),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed_s * 1000.0)
        if children[2] is not None:
            children[2].inc()
        if children[3] is not None:
            children[3].inc()

    def own(self) -> bytes:
        """The proxy's own metrics, as exposition text."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """The proxy's metrics and those of every replica, merged (see the module doc)."""
        own = list(self.registry.collect())
        if self.routers is None:
            return merge_texts(own, [])
        instance = self.routers.instance
        addresses = await self._replica_addresses()
        texts = await fetch_replica_metrics(addresses, instance.secret)
        return merge_texts(own, texts)

    async def _replica_addresses(self) -> list[str]:
        assert self.routers is not None
        instance = self.routers.instance
        try:
            with anyio.fail_after(SCRAPE_TIMEOUT_S):
                async with rpc.connect(
                    instance.controller, instance.secret, timeout=SCRAPE_TIMEOUT_S
                ) as ctl:
                    status = await ctl.call("status")
            return [
                r["address"]
                for app in status.get("applications", {}).values()
                for dep in app.get("deployments", {}).values()
                for r in dep.get("replicas", ())
                if r.get("address") and r.get("state") in ("RUNNING", "DRAINING")
            ]
        except Exception as exc:
            log.info(
                "metrics: the controller did not list the replicas (%r); using the routers'", exc
            )
            return [r.address for router in self.routers.all() for r in router.replicas.values()]


class _Gauges(Collector):
    """The gauges read at scrape time: ongoing HTTP requests, queued requests."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        ongoing = GaugeMetricFamily(
            "ray_serve_num_ongoing_http_requests",
            "HTTP requests the proxy is processing now.",
        )
        ongoing.add_metric([], self._metrics.ongoing)
        yield ongoing
        queued = GaugeMetricFamily(
            "ray_serve_deployment_queued_queries",
            "Requests waiting at the proxy for a replica of the deployment.",
            labels=["application", "deployment"],
        )
        routers = self._metrics.routers
        if routers is not None:
            for router in routers.all():
                queued.add_metric([router.app, router.deployment], router.queued)
        yield queued
