"""HTTP ingress end to end: real proxy, real replicas, real HTTP with httpx.

One embedded instance serves every application of this module, each at its
own route prefix, so that the module pays for start-up once. Tests that
coordinate with a replica do it through files (see ``tests/apps/web.py``).
"""

from __future__ import annotations

import datetime
import email.utils
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trioserve as serve
from tests.apps import web
from trioserve.exceptions import DeployFailedError

DEADLINE_S = 60.0

APPS = {
    "/echo": web.Echo,
    "/echo/deeper": web.Echo.options(name="Deeper"),
    "/returns": web.Returns,
    "/noarg": web.no_argument,
    "/boom": web.Boom,
    "/slow": web.Slow,
    "/chunks": web.Chunks,
    "/gen": web.Generator,
    "/upload": web.Upload,
    "/mortal": web.Mortal,
    "/narrow": web.Narrow,
    "/firehose": web.Firehose,
}


class Served:
    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.home = home
        self.client = httpx.Client(base_url=url, timeout=DEADLINE_S)

    def replica_log(self, replica_id: str) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"replica-{replica_id}")
        return (self.home / "latest" / "logs" / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("home")
    serve.start(home=str(home), http_options={"port": 0})
    try:
        for prefix, dep in APPS.items():
            serve.run(dep.bind(), name=prefix.strip("/").replace("/", "-"), route_prefix=prefix)
        serve.run(web.Api.bind("Hi"), name="api", route_prefix="/api")
        serve.run(web.Echo.options(name="Hidden").bind(), name="hidden", route_prefix=None)
        status = serve.status()
        assert status.proxies == {"local": "HEALTHY"}
        yield Served(status.http_url, home)
    finally:
        serve.shutdown()


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------- routing


def test_routes_lists_every_exposed_application(served: Served) -> None:
    routes = served.client.get("/-/routes").json()
    assert routes["/echo"] == "echo" and routes["/api"] == "api"
    assert "hidden" not in routes.values()  # route_prefix=None: handles only
    assert len(routes) == len(APPS) + 1


def test_healthz_says_success(served: Served) -> None:
    r = served.client.get("/-/healthz")
    assert (r.status_code, r.text) == (200, "success")


def test_unknown_path_is_404_naming_routes(served: Served) -> None:
    r = served.client.get("/nowhere/at/all")
    assert r.status_code == 404
    assert "/-/routes" in r.text and "/nowhere/at/all" in r.text


def test_every_response_has_one_date_header_and_an_apps_own_is_kept(served: Served) -> None:
    for path in ("/echo", "/returns?kind=str", "/nowhere/at/all", "/-/healthz"):
        r = served.client.get(path)
        (date,) = r.headers.get_list("date")
        sent = email.utils.parsedate_to_datetime(date)
        assert sent.tzinfo is not None
        assert abs((sent - datetime.datetime.now(datetime.UTC)).total_seconds()) < 3600
    r = served.client.get("/returns?kind=dated")
    assert r.headers.get_list("date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]


def test_longest_prefix_wins_and_prefixes_match_whole_segments(served: Served) -> None:
    assert served.client.get("/echo/deeper/x").json()["replica"].startswith("echo-deeper#")
    assert served.client.get("/echo/deep").json()["replica"].startswith("echo#")
    assert served.client.get("/echo").json()["replica"].startswith("echo#")
    assert served.client.get("/echoes").status_code == 404


def test_request_reaches_the_replica_with_root_path_extended(served: Served) -> None:
    r = served.client.post("/echo/a/b?x=1", content=b"12345")
    body = r.json()
    assert r.status_code == 200
    assert body["method"] == "POST"
    assert body["path"] == "/echo/a/b" and body["root_path"] == "/echo"
    assert body["query"] == {"x": "1"} and body["body_bytes"] == 5


# ---------------------------------------------------------- return values


@pytest.mark.parametrize(
    ("kind", "status", "content_type", "body"),
    [
        ("str", 200, "text/plain; charset=utf-8", "héllo".encode()),
        ("bytes", 200, None, b"\x00\x01raw"),
        ("none", 200, None, b""),
        ("dict", 200, "application/json", b'{"a":[1,2],"b":null}'),
        ("response", 418, None, b"teapot"),
    ],
)
def test_return_values_become_responses_as_in_ray_serve(
    served: Served, kind: str, status: int, content_type: str | None, body: bytes
) -> None:
    r = served.client.get("/returns", params={"kind": kind})
    assert r.status_code == status
    assert json.loads(r.content) == json.loads(body) if kind == "dict" else r.content == body
    if content_type is not None:
        assert r.headers["content-type"] == content_type
    if kind == "response":
        assert r.headers["x-made-by"] == "user"


def test_call_without_a_request_argument(served: Served) -> None:
    assert served.client.get("/noarg").text == "no request needed"


def test_user_exception_is_500_with_details_only_in_the_replica_log(served: Served) -> None:
    r = served.client.get("/boom", headers={"x-request-id": "boom-1"})
    assert r.status_code == 500
    assert "ValueError" in r.text and "Boom" in r.text
    assert "secret detail" not in r.text
    replica = next(iter(serve.status().applications["boom"].deployments["Boom"].replicas))
    log = served.replica_log(replica.replica_id)
    assert "secret detail" in log and "boom-1" in log
    assert served.client.get("/echo").status_code == 200  # the server keeps serving


# ------------------------------------------------------------ request ids


def test_request_id_is_honoured_returned_and_logged_by_the_replica(served: Served) -> None:
    r = served.client.get("/echo", headers={"x-request-id": "my-id-42"})
    assert r.headers["x-request-id"] == "my-id-42"
    assert r.json()["request_id"] == "my-id-42"
    replica = r.json()["replica"]
    wait_for(lambda: "my-id-42" in served.replica_log(replica), "the replica's log line")
    line = next(li for li in served.replica_log(replica).splitlines() if "my-id-42" in li)
    assert "GET /echo 200" in line


def test_request_id_is_generated_when_absent(served: Served) -> None:
    r1, r2 = served.client.get("/echo"), served.client.get("/echo")
    ids = {r1.headers["x-request-id"], r2.headers["x-request-id"]}
    assert len(ids) == 2 and all(len(i) >= 16 for i in ids)
    assert r1.json()["request_id"] == r1.headers["x-request-id"]


# -------------------------------------------------------------- streaming


@pytest.mark.parametrize("sse", [False, True])
def test_streaming_response_arrives_chunk_by_chunk(
    served: Served, tmp_path: Path, sse: bool
) -> None:
    gate = tmp_path / "gate"
    params = {"gate": str(gate), "sse": "1" if sse else "0"}
    with served.client.stream("GET", "/chunks", params=params) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        first = next(chunks)
        # The replica is still waiting for the gate: the last chunk does not exist yet.
        assert first == (b"data: first\n\n" if sse else b"first;")
        gate.touch()
        rest = b"".join(chunks)
    assert rest == (b"data: last\n\n" if sse else b"last")
    if sse:
        assert r.headers["content-type"].startswith("text/event-stream")


def test_a_streaming_response_starts_before_its_first_chunk(served: Served, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    params = {"gate": str(gate), "before": str(gate)}
    # The replica waits for the gate before its first chunk: the status and
    # headers reach the client without waiting for it.
    with served.client.stream("GET", "/chunks", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        gate.touch()
        assert r.read() == b"first;last"


def test_a_returned_generator_streams(served: Served) -> None:
    assert served.client.get("/gen").text == "0,1,2,"


def test_chunked_request_body_reaches_the_replica_as_it_arrives(
    served: Served, tmp_path: Path
) -> None:
    mark = tmp_path / "first-chunk-arrived"

    def body() -> Iterator[bytes]:
        yield b"a" * 1000
        # The replica has the first chunk before the second one is even sent.
        wait_for(mark.exists, "the replica to receive the first chunk")
        yield b"b" * 2000

    r = served.client.post("/upload", params={"mark": str(mark)}, content=body())
    assert r.status_code == 200
    assert r.json()["total"] == 3000 and len(r.json()["chunks"]) >= 2


# --------------------------------------------------------- errors and limits


def test_client_disconnect_cancels_the_work_in_the_replica(served: Served, tmp_path: Path) -> None:
    mark = tmp_path / "slow"
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"GET /slow?s=600&mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(mark.exists, "the replica to start the request")
    wait_for(Path(f"{mark}.cancelled").exists, "the replica to cancel the request")


def test_replica_dying_mid_request_is_500_and_the_next_request_succeeds(served: Served) -> None:
    r = served.client.get("/mortal/die")
    assert r.status_code == 500
    assert "died while handling the request" in r.text
    after = served.client.get("/mortal")
    assert after.status_code == 200 and after.text.startswith("mortal#")


def test_over_max_queued_requests_is_503(served: Served, tmp_path: Path) -> None:
    mark, gate = tmp_path / "narrow", tmp_path / "gate"
    results: dict[int, int] = {}

    def send(n: int) -> None:
        params = {"mark": str(mark), "gate": str(gate), "n": str(n)}
        results[n] = served.client.get("/narrow", params=params).status_code

    first = threading.Thread(target=send, args=(1,))
    first.start()
    wait_for(Path(f"{mark}.1").exists, "the first request to run")
    # One more may wait at the proxy (max_queued_requests=1); the other is refused.
    others = [threading.Thread(target=send, args=(n,)) for n in (2, 3)]
    for t in others:
        t.start()
    wait_for(lambda: 503 in results.values(), "a request refused with 503")
    gate.touch()
    for t in [first, *others]:
        t.join(DEADLINE_S)
    assert sorted(results.values()) == [200, 200, 503]


def test_application_without_a_running_replica_is_503(served: Served) -> None:
    with pytest.raises(DeployFailedError):
        serve.run(web.Broken.bind(), name="broken", route_prefix="/broken")
    r = served.client.get("/broken")
    assert r.status_code == 503
    assert "Broken" in r.text
    serve.delete("broken")


# ---------------------------------------------------------------- FastAPI


def test_fastapi_routes_get_self_path_query_and_body(served: Served) -> None:
    c = served.client
    assert c.get("/api/hello/ada").json() == "Hi, ada!"
    assert c.get("/api/hello/ada", params={"punct": "?"}).json() == "Hi, ada?"
    r = c.post("/api/items", json={"name": "tea", "price": 2.5})
    assert (r.status_code, r.json()) == (201, {"name": "tea", "price_with_tax": 3.0})
    assert c.post("/api/items", json={"name": "tea"}).status_code == 422
    counts = [c.get("/api/count").json() for _ in range(3)]
    assert counts == sorted(counts) and counts[-1] - counts[0] == 2  # state on self


def test_fastapi_dependencies_lifespan_and_response_classes(served: Served) -> None:
    c = served.client
    assert c.get("/api/started").json() == {"started": True}
    r = c.get("/api/text")
    assert r.text == "plain text" and r.headers["content-type"].startswith("text/plain")
    assert c.get("/api/plain").json() == {"route": "not a method"}
    assert c.get("/api/root").json() == {"root_path": "/api", "path": "/api/root"}


def test_fastapi_streaming_response_arrives_chunk_by_chunk(served: Served, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with served.client.stream("GET", "/api/stream", params={"gate": str(gate)}) as r:
        chunks = r.iter_raw()
        assert next(chunks) == b"first;"
        gate.touch()
        assert b"".join(chunks) == b"last"


def test_fastapi_background_tasks_run_after_the_response(served: Served, tmp_path: Path) -> None:
    mark = tmp_path / "later"
    r = served.client.get("/api/later", params={"mark": str(mark)})
    assert r.json() == "answered"
    wait_for(mark.exists, "the background task")
    assert mark.read_text() == "ran after the response"


def test_clients_leaving_large_streams_leave_the_replica_serving(served: Served) -> None:
    for _ in range(3):
        clients = [httpx.Client(base_url=served.url, timeout=DEADLINE_S) for _ in range(4)]
        try:
            for c in clients:
                with c.stream("GET", "/firehose") as r:
                    assert len(next(r.iter_raw())) > 0  # then leave mid-stream
        finally:
            for c in clients:
                c.close()
    with served.client.stream("GET", "/firehose") as r:
        assert r.status_code == 200 and len(next(r.iter_raw())) > 0
    assert served.client.get("/echo").status_code == 200
