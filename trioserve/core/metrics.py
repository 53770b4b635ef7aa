"""Prometheus metrics: the shared definitions, merging, and the controller's own metrics.

Every trioserve process keeps its metrics in a :class:`prometheus_client.CollectorRegistry`
of its own (never the global default registry, which stays the user's):

- the proxy (:mod:`trioserve.proxy.metrics`): HTTP requests, latency, ongoing
  and queued requests; its ``/-/metrics`` answers its own metrics merged with
  those of every replica of the instance;
- each replica (:mod:`trioserve.replica.metrics`): requests processed,
  processing latency, ongoing requests, ``@serve.batch`` and
  ``@serve.multiplexed`` metrics, plus the metrics of the replica process's
  default registry (the user's own, and the process collectors), labelled
  with the replica; served by its ``metrics`` RPC method;
- the controller (this module): :func:`controller_families` derives replicas
  by state, targets and statuses from a :class:`~trioserve.core.state.ClusterState`;
  :class:`EventCounts` counts replica starts, failed starts, deaths, health
  check failures and autoscaling decisions from the event log itself;
  :func:`instance_metrics` is what the admin API's ``/-/metrics`` answers:
  all of the above, the proxy's and every replica's, merged.

Names follow Ray Serve's (``ray_serve_*``, as Ray exports them to Prometheus)
where Ray has the metric, so that dashboards written for Ray Serve work;
metrics Ray does not have are named ``trioserve_*``. See ``docs/metrics.md``.

Merging (:func:`merge_texts`, :func:`merge_families`) parses each exposition
with :func:`prometheus_client.parser.text_string_to_metric_families` and emits
one ``HELP``/``TYPE`` per family: samples of a family that comes from several
processes are concatenated, a sample whose name and labels were already seen
is dropped, and a family whose type differs from the first one of that name is
dropped (a scrape never fails because one source is odd).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from trioserve.core import events as ev
from trioserve.core.state import (
    REASON_START_TIMEOUT,
    AppStatus,
    ClusterState,
    DeploymentStatus,
    ReplicaState,
    app_status,
    deployment_status,
)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS_MS",
    "SCRAPE_TIMEOUT_S",
    "EventCounts",
    "controller_families",
    "fetch_replica_metrics",
    "instance_metrics",
    "merge_families",
    "merge_texts",
    "parse",
    "render",
]

log = logging.getLogger("trioserve.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of a ``/-/metrics`` answer (Prometheus text format 0.0.4)."""

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000,
    5000, 10000, 60000, 120000, 300000, 600000,
)  # fmt: skip
"""Ray Serve's ``DEFAULT_LATENCY_BUCKET_MS``: the buckets of every latency histogram."""

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""The buckets of the batch size histogram."""

SCRAPE_TIMEOUT_S = 3.0
"""How long a scrape waits for one replica's (or the proxy's) metrics before skipping it."""

REPLICA_STATES = tuple(s.value for s in ReplicaState)

# Ray Serve's numeric statuses (``ray_serve_deployment_status`` / ``ray_serve_application_status``).
DEPLOYMENT_STATUS_VALUES: Mapping[DeploymentStatus, int] = {
    DeploymentStatus.DEPLOY_FAILED: 1,
    DeploymentStatus.UNHEALTHY: 2,
    DeploymentStatus.UPDATING: 3,
    DeploymentStatus.UPSCALING: 4,
    DeploymentStatus.DOWNSCALING: 5,
    DeploymentStatus.HEALTHY: 6,
}
APP_STATUS_VALUES: Mapping[AppStatus, int] = {
    AppStatus.DEPLOY_FAILED: 1,
    AppStatus.UNHEALTHY: 2,
    AppStatus.DELETING: 4,
    AppStatus.DEPLOYING: 5,
    AppStatus.RUNNING: 6,
}
PROXY_STARTING, PROXY_HEALTHY, PROXY_UNHEALTHY = 1, 2, 3
"""``ray_serve_proxy_status`` values (Ray's numbering)."""


# ------------------------------------------------------------------------ merging


def parse(text: str | bytes) -> list[Metric]:
    """The metric families of one exposition text; ``[]`` (logged) if it does not parse."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return list(text_string_to_metric_families(text))
    except Exception as exc:  # one bad source must not fail the scrape
        log.warning("skipping metrics that do not parse: %s", exc)
        return []


def merge_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name from ``sources`` (see the module docstring for the rules)."""
    merged: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for families in sources:
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            elif target.type != family.type:
                log.warning(
                    "dropping metric family %s of type %s: already seen as %s",
                    family.name,
                    family.type,
                    target.type,
                )
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in seen:
                    continue
                seen.add(key)
                target.samples.append(sample)
    return list(merged.values())


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: Sequence[Metric]) -> bytes:
    """The exposition text of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def merge_texts(own: Iterable[Metric], texts: Iterable[str | bytes]) -> bytes:
    """``own`` families and those of the exposition ``texts``, merged into one text."""
    return render(merge_families([list(own), *(parse(t) for t in texts)]))


async def fetch_replica_metrics(addresses: Iterable[str], secret: bytes) -> list[str]:
    """The exposition texts of the replicas at ``addresses`` (their ``metrics`` RPC
    method), fetched concurrently; a replica that does not answer within
    :data:`SCRAPE_TIMEOUT_S` is skipped."""
    from trioserve.core import rpc

    texts: list[str] = []

    async def one(address: str) -> None:
        try:
            with anyio.fail_after(SCRAPE_TIMEOUT_S):
                async with rpc.connect(address, secret, timeout=SCRAPE_TIMEOUT_S) as conn:
                    text = await conn.call("metrics")
        except Exception as exc:
            log.debug("no metrics from the replica at %s: %r", address, exc)
            return
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if isinstance(text, str):
            texts.append(text)

    async with anyio.create_task_group() as tg:
        for address in dict.fromkeys(addresses):
            tg.start_soon(one, address)
    return texts


# ------------------------------------------------------------------------ controller


def controller_families(state: ClusterState) -> list[Metric]:
    """The controller's gauges, derived from ``state`` alone (pure).

    ``trioserve_replicas`` (replicas by application, deployment and state; every
    state is present, 0 included), ``trioserve_deployment_target_replicas`` (the
    goal), ``ray_serve_autoscaling_target_replicas`` (the goal of autoscaling
    deployments), ``ray_serve_deployment_replica_healthy`` (per running replica),
    ``ray_serve_deployment_status``, ``ray_serve_application_status`` and
    ``ray_serve_proxy_status``.
    """
    replicas = GaugeMetricFamily(
        "trioserve_replicas",
        "Replicas by application, deployment and state.",
        labels=["application", "deployment", "state"],
    )
    target = GaugeMetricFamily(
        "trioserve_deployment_target_replicas",
        "How many replicas of the current version each deployment should run now.",
        labels=["application", "deployment"],
    )
    autoscaling = GaugeMetricFamily(
        "ray_serve_autoscaling_target_replicas",
        "Target number of replicas the autoscaler is trying to reach.",
        labels=["application", "deployment"],
    )
    healthy = GaugeMetricFamily(
        "ray_serve_deployment_replica_healthy",
        "Health of each running replica: 1 healthy, 0 failing health checks.",
        labels=["application", "deployment", "replica"],
    )
    dstatus = GaugeMetricFamily(
        "ray_serve_deployment_status",
        "Deployment status: 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 UPDATING, 4 UPSCALING, "
        "5 DOWNSCALING, 6 HEALTHY.",
        labels=["application", "deployment"],
    )
    astatus = GaugeMetricFamily(
        "ray_serve_application_status",
        "Application status: 1 DEPLOY_FAILED, 2 UNHEALTHY, 4 DELETING, 5 DEPLOYING, 6 RUNNING.",
        labels=["application"],
    )
    proxy = GaugeMetricFamily(
        "ray_serve_proxy_status",
        "HTTP proxy status: 1 STARTING, 2 HEALTHY, 3 UNHEALTHY.",
    )
    for app in state.apps.values():
        astatus.add_metric([app.name], APP_STATUS_VALUES.get(app_status(app)[0], 0))
        for dep in app.deployments.values():
            labels = [app.name, dep.name]
            counts = dict.fromkeys(REPLICA_STATES, 0)
            for r in dep.replicas.values():
                counts[r.state.value] += 1
                if r.state is ReplicaState.RUNNING:
                    healthy.add_metric([*labels, r.id], 0 if r.health_failures else 1)
            for name, n in counts.items():
                replicas.add_metric([*labels, name], n)
            target.add_metric(labels, dep.goal)
            if dep.spec.config.autoscaling_config is not None:
                autoscaling.add_metric(labels, dep.goal)
            dstatus.add_metric(labels, DEPLOYMENT_STATUS_VALUES.get(deployment_status(dep)[0], 0))
    if state.proxy_pid is not None:
        proxy.add_metric([], PROXY_HEALTHY)
    elif state.proxy_error:
        proxy.add_metric([], PROXY_UNHEALTHY)
    elif state.proxy_starts == 0 and not state.proxy_url:
        proxy.add_metric([], PROXY_STARTING)
    return [replicas, target, autoscaling, healthy, dstatus, astatus, proxy]


_COUNTER_HELP = {
    "ray_serve_deployment_replica_starts": "Replicas started (including restarts).",
    "trioserve_replica_start_failures": (
        "Replicas that failed to start (constructor error, start timeout, or died while starting)."
    ),
    "trioserve_replica_deaths": "Running or draining replicas whose process died unasked.",
    "ray_serve_health_check_failures": "Failed health checks.",
    "trioserve_autoscaling_decisions": "Autoscaling decisions, by direction (up or down).",
}


class EventCounts:
    """Counters derived from the event log: fold events in with :meth:`add`.

    Counted per application and deployment: replica starts (``ReplicaStarting``),
    failed starts (``ReplicaStartFailed``, a ``ReplicaDied`` or a start-timeout
    ``ReplicaStopping`` of a replica that never ran), deaths (``ReplicaDied`` of a
    replica that ran), health check failures and autoscaling decisions; and
    every event by kind (``trioserve_controller_events``). Counts start from
    the first event of the log, so they survive a controller restart.
    """

    def __init__(self) -> None:
        self.seq = 0
        """The seq of the last event folded in."""
        self.counts: dict[tuple[str, str, str], float] = {}
        """(metric, application, deployment) -> count; for decisions the deployment
        is ``deployment/direction``."""
        self.kinds: dict[str, float] = {}
        self._replicas: dict[str, tuple[str, str, bool]] = {}
        """Live replica id -> (application, deployment, has run)."""

    def _inc(self, metric: str, app: str, dep: str) -> None:
        key = (metric, app, dep)
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, event: ev.Event, seq: int | None = None) -> None:
        """Count one event (``seq``: its position in the log, if known)."""
        if seq is not None:
            self.seq = seq
        self.kinds[event.KIND] = self.kinds.get(event.KIND, 0) + 1
        if isinstance(event, ev.ReplicaStarting):
            self._replicas[event.replica] = (event.app, event.deployment, False)
            self._inc("ray_serve_deployment_replica_starts", event.app, event.deployment)
            return
        if isinstance(event, ev.AutoscaleDecision):
            direction = "up" if event.to_replicas > event.from_replicas else "down"
            self._inc(
                "trioserve_autoscaling_decisions", event.app, f"{event.deployment}/{direction}"
            )
            return
        replica = getattr(event, "replica", None)
        known = self._replicas.get(replica) if isinstance(replica, str) else None
        if known is None:
            return
        app, dep, ran = known
        if isinstance(event, ev.ReplicaRunning):
            self._replicas[event.replica] = (app, dep, True)
        elif isinstance(event, ev.ReplicaStartFailed):
            self._inc("trioserve_replica_start_failures", app, dep)
        elif isinstance(event, ev.ReplicaDied):
            name = "trioserve_replica_deaths" if ran else "trioserve_replica_start_failures"
            self._inc(name, app, dep)
        elif isinstance(event, ev.ReplicaStopping):
            if not ran and event.reason == REASON_START_TIMEOUT:
                self._inc("trioserve_replica_start_failures", app, dep)
        elif isinstance(event, ev.HealthCheckFailed):
            self._inc("ray_serve_health_check_failures", app, dep)
        elif isinstance(event, ev.ReplicaExited):
            del self._replicas[event.replica]

    def families(self) -> list[Metric]:
        """The counters as metric families."""
        out: dict[str, CounterMetricFamily] = {}
        for name, help_text in _COUNTER_HELP.items():
            labels = ["application", "deployment"]
            if name == "trioserve_autoscaling_decisions":
                labels.append("direction")
            out[name] = CounterMetricFamily(name, help_text, labels=labels)
        for (name, app, dep), n in sorted(self.counts.items()):
            if name == "trioserve_autoscaling_decisions":
                out[name].add_metric([app, *dep.split("/", 1)], n)
            else:
                out[name].add_metric([app, dep], n)
        kinds = CounterMetricFamily(
            "trioserve_controller_events",
            "Events recorded in the event log, by kind.",
            labels=["kind"],
        )
        for kind, n in sorted(self.kinds.items()):
            kinds.add_metric([kind], n)
        return [*out.values(), kinds]

    def catch_up(self, events: Iterable[tuple[int, ev.Event]]) -> None:
        """Fold in ``(seq, event)`` pairs (those after :attr:`seq`)."""
        for seq, event in events:
            if seq > self.seq:
                self.add(event, seq)


_counts: weakref.WeakKeyDictionary[Any, EventCounts] = weakref.WeakKeyDictionary()


async def _event_counts(controller: Any) -> list[Metric]:
    """The counters of ``controller``'s log, read incrementally since the last scrape.

    The read goes through the controller's ``_db`` (its one database worker
    thread), as every other use of the log's connection does: an in-memory
    SQLite log has a single connection, which two threads must never use at once.
    """
    counts = _counts.get(controller)
    if counts is None:
        counts = _counts[controller] = EventCounts()
    journal = controller.journal
    upto = int(journal.seq)
    if upto > counts.seq:
        event_log = journal.log
        after = counts.seq

        def read() -> list[tuple[int, ev.Event]]:
            return [(s.seq, s.event) for s in event_log.read(after=after, upto=upto)]

        try:
            pairs: list[tuple[int, ev.Event]] = await controller._db(read)
            counts.catch_up(pairs)
        except Exception as exc:
            log.warning("cannot read the event log for metrics: %s", exc)
    return counts.families()


async def _proxy_text(url: str) -> str | None:
    if not url:
        return None
    import httpx

    try:
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
            response = await client.get(url.rstrip("/") + "/-/metrics", params={"scope": "proxy"})
        if response.status_code == 200:
            return response.text
    except Exception as exc:
        log.debug("no metrics from the proxy at %s: %r", url, exc)
    return None


async def instance_metrics(controller: Any) -> bytes:
    """What the admin API's ``/-/metrics`` answers (content type :data:`CONTENT_TYPE`).

    ``controller`` is a running :class:`~trioserve.core.controller.Controller`;
    call this on its event loop. The answer merges :func:`controller_families`
    of its state, the :class:`EventCounts` of its log, the proxy's own metrics
    (``/-/metrics?scope=proxy`` on the proxy) and those of every RUNNING or
    DRAINING replica (their ``metrics`` RPC method), fetched concurrently; a
    process that does not answer within :data:`SCRAPE_TIMEOUT_S` is left out.
    """
    state: ClusterState = controller.state
    own = controller_families(state)
    addresses = [
        r.address
        for r in state.replicas.values()
        if r.address and r.state in (ReplicaState.RUNNING, ReplicaState.DRAINING)
    ]
    proxy_url = state.proxy_url if state.proxy_pid is not None else ""
    counters = await _event_counts(controller)
    texts: list[str] = []

    async def proxy() -> None:
        text = await _proxy_text(proxy_url)
        if text is not None:
            texts.append(text)

    replica_texts: list[str] = []

    async def replicas() -> None:
        replica_texts.extend(await fetch_replica_metrics(addresses, controller.secret))

    async with anyio.create_task_group() as tg:
        tg.start_soon(proxy)
        tg.start_soon(replicas)
    return merge_texts([*own, *counters], [*texts, *replica_texts])
