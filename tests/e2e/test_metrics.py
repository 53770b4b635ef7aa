"""Prometheus metrics end to end: real proxy, real replicas, ``/-/metrics`` over HTTP.

One embedded instance serves every application of this module (the
deployments live here; replicas import them by name). Each test reads the
counts of its own application only, or, for an application other tests send
requests to as well, counts its requests as the difference between a scrape
before and one after them: the tests do not depend on each other's traffic or
order.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

import trioserve as serve
from tests.conftest import poll_until
from trioserve import _loop, api
from trioserve.core.metrics import CONTENT_TYPE, instance_metrics

DEADLINE_S = 60.0


@serve.deployment
class Hello:
    async def __call__(self, request: Request) -> str:
        return "hello"


@serve.deployment
class Boom:
    def __call__(self, request: Request) -> str:
        raise ValueError("boom")


@serve.deployment(max_ongoing_requests=16)
class Batched:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=60)
    async def double(self, xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    async def __call__(self, request: Request) -> int:
        return await self.double(int(request.query_params["x"]))


@serve.deployment
class Models:
    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return f"model {model_id}"

    async def __call__(self, request: Request) -> str:
        return str(await self.get_model(serve.get_multiplexed_model_id()))


@serve.deployment
class Mortal:
    def __call__(self, request: Request) -> int:
        return os.getpid()


APPS = {
    "hello": Hello,
    "boom": Boom,
    "batched": Batched,
    "models": Models,
    "mortal": Mortal,
    "frozen": Mortal.options(name="Frozen"),
}

APPS_DEPLOYMENTS = ("Hello", "Boom", "Batched", "Models", "Mortal", "Frozen")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("home")
    serve.start(home=str(home), http_options={"port": 0})
    try:
        for name, dep in APPS.items():
            serve.run(dep.bind(), name=name, route_prefix=f"/{name}")
        yield serve.status().http_url
    finally:
        serve.shutdown()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, path: str = "/-/metrics") -> Samples:
    response = httpx.get(url + path, timeout=DEADLINE_S)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse(response.text)


def scrape_replicas(url: str, *deployments: str) -> Samples:
    """A scrape with the metrics of the replicas of ``deployments`` in it (a replica
    slower than the scrape timeout on a busy machine is left out of one scrape)."""

    def complete() -> Samples | None:
        m = scrape(url)
        seen = {s["deployment"] for s in series(m, "ray_serve_replica_processing_queries")}
        return m if set(deployments) <= seen else None

    return wait_until(complete, f"the metrics of the replicas of {deployments}")


def parse(text: str) -> Samples:
    samples: Samples = {}
    names: list[str] = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    assert len(names) == len(set(names)), "a family appears twice"
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    want = set(labels.items())
    return [dict(ls) for (n, ls), _ in samples.items() if n == name and want <= ls]


def wait_until(predicate: Any, what: str) -> Any:
    return poll_until(predicate, what, deadline_s=DEADLINE_S)


def test_http_requests_by_route_application_method_and_status(url: str) -> None:
    # Other tests of this module's instance send requests to /hello too (in any
    # order): count this test's requests as differences between two scrapes.
    before = scrape_replicas(url, "Hello", "Boom")
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        for _ in range(3):
            assert client.get("/hello").status_code == 200
        assert client.post("/hello", content=b"x").status_code == 200
        for _ in range(2):
            assert client.get("/boom").status_code == 500
    requests = "ray_serve_num_http_requests_total"
    processed = "ray_serve_deployment_request_counter_total"

    def added_in(m: Samples, name: str, **labels: str) -> float:
        return total(m, name, **labels) - total(before, name, **labels)

    def counted() -> Samples | None:
        m = scrape_replicas(url, "Hello", "Boom")
        done = (
            added_in(m, requests, route="/hello") >= 4
            and added_in(m, requests, route="/boom") >= 2
            and added_in(m, processed, deployment="Hello") >= 4
        )
        return m if done else None

    m = wait_until(counted, "the counts of this test's requests")

    def added(name: str, **labels: str) -> float:
        return added_in(m, name, **labels)

    assert added(requests, route="/hello", application="hello", method="GET") == 3
    assert added(requests, route="/hello", method="GET", status_code="200") == 3
    assert added(requests, route="/hello", method="POST", status_code="200") == 1
    assert added(requests, route="/boom", application="boom", status_code="500") == 2
    latency = "ray_serve_http_request_latency_ms_count"
    assert added(latency, route="/hello", application="hello") == 4
    assert added(latency, route="/boom", status_code="500") == 2
    assert added("ray_serve_http_request_latency_ms_bucket", route="/hello", le="+Inf") == 4
    errors = "ray_serve_num_http_error_requests_total"
    assert added(errors, route="/boom", error_code="500", application="boom") == 2
    assert added(errors, route="/hello") == 0
    assert added("ray_serve_num_deployment_http_error_requests_total", deployment="Boom") == 2
    assert ("ray_serve_num_ongoing_http_requests", frozenset()) in m

    # The replicas' own counts, with their deployment and replica labels.
    assert added(processed, application="hello", deployment="Hello", route="/hello") == 4
    assert added("ray_serve_deployment_error_counter_total", deployment="Boom") == 2
    assert added("ray_serve_deployment_error_counter_total", deployment="Hello") == 0
    assert added("ray_serve_deployment_processing_latency_ms_count", deployment="Hello") == 4
    hello_replicas = {s["replica"] for s in series(m, processed, deployment="Hello")}
    assert len(hello_replicas) == 1 and all(hello_replicas)
    assert series(m, "ray_serve_replica_processing_queries", deployment="Boom")
    # The replica process's default registry comes along, labelled with the replica.
    assert series(m, "process_cpu_seconds_total", deployment="Hello", application="hello")


def test_not_found_is_counted_without_an_application(url: str) -> None:
    before = scrape(url)
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        assert client.get("/nowhere").status_code == 404
    after = scrape(url)
    name = "ray_serve_num_http_requests_total"
    labels = {"route": "", "application": "", "status_code": "404"}
    assert total(after, name, **labels) == total(before, name, **labels) + 1


def test_batch_sizes_are_observed(url: str) -> None:
    with (
        httpx.Client(base_url=url, timeout=DEADLINE_S) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        answers = list(pool.map(lambda x: client.get("/batched", params={"x": x}), range(8)))
    assert [a.json() for a in answers] == [2 * x for x in range(8)]
    m = scrape_replicas(url, "Batched")
    size = "ray_serve_actual_batch_size"
    assert total(m, f"{size}_count", deployment="Batched") == 2  # two batches...
    assert total(m, f"{size}_sum", deployment="Batched") == 8  # ...of four
    assert total(m, f"{size}_bucket", deployment="Batched", le="4.0") == 2
    assert total(m, f"{size}_bucket", deployment="Batched", le="2.0") == 0
    (labels,) = series(m, f"{size}_count", deployment="Batched")
    assert labels["function_name"] == "Batched.double" and labels["replica"]
    assert total(m, "ray_serve_batch_wait_time_ms_count", deployment="Batched") == 2
    assert total(m, "ray_serve_batch_execution_time_ms_count", deployment="Batched") == 2


def test_model_loads_and_evictions(url: str) -> None:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        for model in ("a", "b", "a"):
            answer = client.get("/models", headers={"serve_multiplexed_model_id": model})
            assert answer.text == f"model {model}"
    m = scrape_replicas(url, "Models")
    assert total(m, "ray_serve_multiplexed_models_load_counter_total", deployment="Models") == 3
    assert total(m, "ray_serve_multiplexed_model_load_latency_ms_count", deployment="Models") == 3
    assert total(m, "ray_serve_multiplexed_models_unload_counter_total", deployment="Models") == 2
    assert total(m, "ray_serve_num_multiplexed_models", deployment="Models") == 1


def test_proxy_scope_has_no_replica_metrics(url: str) -> None:
    m = scrape(url, "/-/metrics?scope=proxy")
    assert series(m, "ray_serve_num_http_requests_total")
    assert not series(m, "ray_serve_deployment_request_counter_total")


def test_admin_metrics_merge_controller_proxy_and_replicas(url: str) -> None:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        assert client.get("/hello").status_code == 200
    instance = api._embedded.instance if api._embedded is not None else None
    assert instance is not None

    def admin() -> Samples | None:
        m = parse(_loop.run(instance_metrics, instance.controller).decode())
        # the proxy's and the replica's (either may be slow on a busy machine)
        if not total(m, "ray_serve_num_http_requests_total", route="/hello"):
            return None
        if not total(m, "ray_serve_deployment_request_counter_total", deployment="Hello"):
            return None
        return m

    m = wait_until(admin, "the admin metrics of the proxy and the replicas")
    assert total(m, "trioserve_replicas", application="hello", state="RUNNING") == 1
    assert total(m, "trioserve_replicas", application="hello", state="STARTING") == 0
    assert total(m, "trioserve_deployment_target_replicas", deployment="Hello") == 1
    assert total(m, "ray_serve_deployment_replica_starts_total", deployment="Hello") == 1
    assert total(m, "ray_serve_deployment_status", deployment="Hello") == 6  # HEALTHY
    assert total(m, "ray_serve_proxy_status") == 2  # HEALTHY
    assert total(m, "trioserve_controller_events_total", kind="AppDeployed") == len(APPS)
    assert total(m, "trioserve_replica_start_failures_total", deployment="Hello") == 0


def test_a_killed_replica_does_not_fail_the_scrape(url: str) -> None:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        assert client.get("/hello").status_code == 200
        pid = client.get("/mortal").json()
        os.kill(pid, signal.SIGKILL)
        m = scrape(url)  # at once: the controller may still list the dead replica
        assert total(m, "ray_serve_num_http_requests_total", route="/mortal") >= 1
        m = scrape_replicas(url, "Hello")
        assert total(m, "ray_serve_deployment_request_counter_total", deployment="Hello") >= 1

        # The controller replaces it; its metrics come back, from the new replica.
        def replaced() -> bool:
            answer = client.get("/mortal")
            return answer.status_code == 200 and answer.json() != pid

        wait_until(replaced, "a new replica of Mortal")
    instance = api._embedded.instance if api._embedded is not None else None
    assert instance is not None
    admin = parse(_loop.run(instance_metrics, instance.controller).decode())
    assert total(admin, "trioserve_replica_deaths_total", deployment="Mortal") == 1
    assert total(admin, "ray_serve_deployment_replica_starts_total", deployment="Mortal") == 2
    new = wait_until(
        lambda: series(
            scrape(url), "ray_serve_deployment_request_counter_total", deployment="Mortal"
        ),
        "the new replica's metrics",
    )
    assert len(new) == 1


def test_a_replica_that_does_not_answer_is_left_out(url: str) -> None:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        assert client.get("/hello").status_code == 200
        pid = client.get("/frozen").json()
    others = set(APPS_DEPLOYMENTS) - {"Frozen"}

    def scrape_without_frozen() -> Samples | None:
        m = scrape(url)  # always answers, without the replica that does not
        seen = {s["deployment"] for s in series(m, "ray_serve_replica_processing_queries")}
        assert "Frozen" not in seen
        return m if seen == others else None  # (another one may be slow on a busy machine)

    os.kill(pid, signal.SIGSTOP)  # it accepts connections, and answers nothing
    try:
        m = wait_until(scrape_without_frozen, "a scrape with every other replica")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert total(m, "ray_serve_num_http_requests_total", route="/frozen") >= 1
    # once it runs again, its metrics are back
    wait_until(
        lambda: series(
            scrape(url), "ray_serve_deployment_request_counter_total", deployment="Frozen"
        ),
        "the metrics of the replica that was stopped",
    )
