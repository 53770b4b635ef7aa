"""Model multiplexing end to end: real replicas, the controller's model lists, routing.

The deployments live in this module, which replicas import by name. Replicas
report their model ids every ``TRIOSERVE_LOAD_REPORT_PERIOD_S`` (shortened
here; they also report at once when the ids change).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

import trioserve as serve
from trioserve.core import rpc
from trioserve.core.controller import VERSION_SHIFT
from trioserve.core.routing import current_instance, replicas_key
from trioserve.handle import DeploymentHandle
from trioserve.replica import multiplex

DEADLINE_S = 60.0
MODELS = ("a", "b", "c")


@serve.deployment(num_replicas=3)
class Models:
    """Loads models by id (at most 2 per replica); says where a request ran."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads.append(model_id)
        return f"model {model_id}"

    async def __call__(self, *args: Any) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return {
            "replica": serve.get_replica_context().replica_id,
            "model_id": model_id,
            "model": model,
            "loads": list(self.loads),
            "held": multiplex.model_ids(),
        }

    async def hold(self, seconds: float) -> str:
        await self.get_model(serve.get_multiplexed_model_id())
        await anyio.sleep(seconds)
        return serve.get_replica_context().replica_id


@pytest.fixture
def served(serve_home: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An embedded instance whose replicas report their load every 0.2 s."""
    monkeypatch.setenv("TRIOSERVE_LOAD_REPORT_PERIOD_S", "0.2")
    serve.start()
    try:
        yield
    finally:
        serve.shutdown()


def published(app: str, deployment: str, version: int = 0) -> tuple[int, Any]:
    """The controller's long-poll value of a deployment's replica set (newer than ``version``)."""
    instance = current_instance()

    async def main() -> tuple[int, Any]:
        async with rpc.connect(instance.controller, instance.secret) as ctl:
            got = await ctl.call("listen", {replicas_key(app, deployment): version}, 10.0)
        return tuple(got.get(replicas_key(app, deployment), (version, None)))  # type: ignore[return-value]

    return anyio.run(main)


def models_by_replica(value: Any) -> dict[str, list[str]]:
    return {r["id"]: r["models"] for r in value["replicas"]}


def test_requests_for_a_model_go_to_the_replica_that_holds_it(served: None) -> None:
    handle: DeploymentHandle = serve.run(Models.bind(), name="mux", route_prefix="/mux")
    handles = {m: handle.options(multiplexed_model_id=m) for m in MODELS}
    recent: dict[str, collections.deque[str]] = {m: collections.deque(maxlen=10) for m in MODELS}
    deadline = time.monotonic() + DEADLINE_S
    # Sequential requests, round robin over the models, until each model's
    # last ten requests ran on one replica (the first ones may run before the
    # replicas' reports reach the router).
    while True:
        for m in MODELS:
            reply = handles[m].remote().result(timeout_s=DEADLINE_S)
            assert (reply["model_id"], reply["model"]) == (m, f"model {m}")
            recent[m].append(reply["replica"])
        if all(len(q) == q.maxlen and len(set(q)) == 1 for q in recent.values()):
            break
        assert time.monotonic() < deadline, f"requests keep moving: {recent}"
    where = {m: recent[m][-1] for m in MODELS}
    # Models spread over the replicas (fewest models first): one each.
    assert len(set(where.values())) == 3, where

    # The controller publishes each replica's models: each model on one replica.
    version, value = published("mux", "Models")
    while True:
        held = models_by_replica(value)
        if all(held[where[m]] == [m] for m in MODELS):
            break
        assert time.monotonic() < deadline, f"published: {held}, routed: {where}"
        version, value = published("mux", "Models", version)
    for m in MODELS:
        assert sum(m in models for models in held.values()) == 1

    # A model-list change is published at once, without a log event: a version
    # just above the last one. Deleting the app is a log event: a new seq.
    reply = handle.options(multiplexed_model_id="d").remote().result(timeout_s=DEADLINE_S)
    assert reply["loads"][-1] == "d"
    newer, value = published("mux", "Models", version)
    while "d" not in models_by_replica(value)[reply["replica"]]:
        assert time.monotonic() < deadline
        newer, value = published("mux", "Models", newer)
    assert newer > version
    assert newer % (1 << VERSION_SHIFT) != 0  # no log event made it
    serve.delete("mux")
    gone, value = published("mux", "Models", newer)
    assert gone > newer
    assert gone % (1 << VERSION_SHIFT) == 0  # the log event's seq


def test_a_model_goes_to_another_replica_when_its_holder_is_full(served: None) -> None:
    handle = serve.run(
        Models.options(name="Narrow", num_replicas=2, max_ongoing_requests=1).bind(),
        name="narrow",
        route_prefix=None,
    ).options(multiplexed_model_id="x")
    assert handle.hold.remote(0).result(timeout_s=DEADLINE_S)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: handle.hold.remote(1.0).result(timeout_s=DEADLINE_S))
        time.sleep(0.2)
        second = pool.submit(lambda: handle.hold.remote(0).result(timeout_s=DEADLINE_S))
        assert first.result() != second.result()


def test_the_http_header_names_the_model(served: None) -> None:
    serve.run(Models.bind(), name="web", route_prefix="/web")
    url = serve.status().http_url
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        replies = [
            client.get("/web", headers={"serve_multiplexed_model_id": "h1"}).json()
            for _ in range(5)
        ]
        assert {(r["model_id"], r["model"]) for r in replies} == {("h1", "model h1")}
        # The proxy's router sent each of them to the replica that loaded h1.
        assert len({r["replica"] for r in replies}) == 1
        assert replies[-1]["loads"] == ["h1"]
        plain = client.get("/web")  # no model id: the model id is "" and loading fails
        assert plain.status_code == 500
