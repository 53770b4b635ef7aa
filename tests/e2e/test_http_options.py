"""The proxy's options and supervision: timeouts, body limits, ports, restarts.

Each test starts its own embedded instance, because ``http_options`` belong
to the instance.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trioserve as serve
from tests.apps import web
from trioserve.core import events as ev
from trioserve.exceptions import RayServeException
from trioserve.store import EventLog

DEADLINE_S = 60.0


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def instance(serve_home: Path) -> Iterator[Any]:
    """Start the instance with the test's options: ``instance(**http_options)``."""

    def start(**options: Any) -> str:
        serve.start(http_options={"port": 0, **options})
        serve.run(web.Slow.bind(), name="slow", route_prefix="/slow")
        serve.run(web.Echo.bind(), name="echo", route_prefix="/echo")
        return serve.status().http_url

    try:
        yield start
    finally:
        serve.shutdown()


def test_request_timeout_is_408_and_the_next_request_is_served(instance: Any) -> None:
    url = instance(request_timeout_s=0.5)
    r = httpx.get(f"{url}/slow", params={"s": "600"}, timeout=DEADLINE_S)
    assert r.status_code == 408
    assert r.text.endswith("timed out after 0.5s.")
    assert httpx.get(f"{url}/echo", timeout=DEADLINE_S).status_code == 200


def test_body_over_the_limit_is_413_declared_or_chunked(instance: Any) -> None:
    url = instance(max_request_body_bytes=1000)
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        r = c.post("/echo", content=b"x" * 2000)
        assert r.status_code == 413 and "1000 bytes" in r.text
        r = c.post("/echo", content=iter([b"x" * 600, b"y" * 600]))  # chunked, no length
        assert r.status_code == 413
        r = c.post("/echo", content=b"x" * 1000)
        assert r.status_code == 200 and r.json()["body_bytes"] == 1000


def test_proxy_location_disabled_runs_no_proxy(serve_home: Path) -> None:
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(web.Versioned.bind("v1"), name="v", route_prefix="/v")
        assert handle.remote().result() == "v1"  # handles still work
        status = serve.status()
        assert status.proxies == {} and status.http_url == ""
    finally:
        serve.shutdown()


def test_a_port_already_taken_makes_run_fail_with_a_clear_error(serve_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            serve.start(http_options={"port": port})
            with pytest.raises(RayServeException, match=f"cannot listen on 127.0.0.1:{port}"):
                serve.run(web.Echo.bind(), name="echo", route_prefix="/echo")
            assert serve.status().proxies == {"local": "UNHEALTHY"}
        finally:
            serve.shutdown()


def test_a_killed_proxy_is_restarted_and_both_events_are_in_the_log(
    instance: Any, serve_home: Path
) -> None:
    instance()
    [pid] = _proxy_pids(serve_home)
    os.kill(pid, signal.SIGKILL)

    def serving_again() -> bool:
        status = serve.status()
        return status.proxies == {"local": "HEALTHY"} and _proxy_pids(serve_home)[-1] != pid

    wait_for(serving_again, "a new proxy")
    url = serve.status().http_url  # port 0: the new proxy may listen elsewhere
    assert httpx.get(f"{url}/echo", timeout=DEADLINE_S).status_code == 200
    kinds = [(e.KIND, e.pid) for e in _proxy_events(serve_home)]
    assert kinds[:2] == [("ProxyStarted", pid), ("ProxyExited", pid)]
    assert kinds[2][0] == "ProxyStarted" and kinds[2][1] != pid


def _proxy_events(home: Path) -> list[ev.ProxyStarted | ev.ProxyExited]:
    with EventLog.open(home / "latest" / "events.db", create=False) as log:
        events = [stored.event for stored in log.read()]
    return [e for e in events if isinstance(e, (ev.ProxyStarted, ev.ProxyExited))]


def _proxy_pids(home: Path) -> list[int]:
    return [e.pid for e in _proxy_events(home) if isinstance(e, ev.ProxyStarted)]


def test_root_path_mounts_every_application_under_it(instance: Any) -> None:
    # As behind a reverse proxy that serves us at /base and strips it.
    url = instance(root_path="/base")
    serve.run(web.Api.bind("Hi"), name="api", route_prefix="/api")
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        assert c.get("/api/hello/ada").json() == "Hi, ada!"
        assert c.get("/api/root").json() == {"root_path": "/base/api", "path": "/base/api/root"}
        echo = c.get("/echo/x").json()
        assert (echo["root_path"], echo["path"]) == ("/base/echo", "/base/echo/x")


def test_idle_connections_close_after_keep_alive_timeout(instance: Any) -> None:
    # The default keep-alive is 90 s (Ray Serve's): had the option been ignored,
    # the idle connection would outlive the generous 30 s socket deadline below.
    url = instance(keep_alive_timeout_s=0.5)
    host, port = url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=30.0) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while chunk := sock.recv(65536):  # the server closes the idle connection
                received += chunk
        except TimeoutError:  # socket.timeout
            pytest.fail(
                "the proxy kept an idle connection open for 30 s although "
                f"keep_alive_timeout_s=0.5 (received so far: {received[:200]!r})"
            )
    assert received.startswith(b"HTTP/1.1 200")
    # Closed for being idle, not because the response asked for it.
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"connection: close" not in head
