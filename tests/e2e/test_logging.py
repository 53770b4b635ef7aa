"""Replica and proxy logs on real processes: formats, request context, logging_config."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trioserve as serve
from tests.apps import logging_app as apps
from tests.conftest import poll_until

DEADLINE_S = 60.0


def log_file(home: Path, name: str) -> Path:
    return home / "latest" / "logs" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".log")


def replica_log(home: Path, app: str, deployment: str) -> str:
    (replica,) = serve.status().applications[app].deployments[deployment].replicas
    return log_file(home, f"replica-{replica.replica_id}").read_text(errors="replace")


def wait_for(produce: Callable[[], Any], what: str, on_fail: Callable[[], str] = str) -> Any:
    """Poll ``produce`` until it returns something truthy; that value."""
    return poll_until(produce, what, on_fail, DEADLINE_S)


def log_once(home: Path, app: str, deployment: str, needle: str) -> Callable[[], str]:
    """A probe for :func:`wait_for`: the replica's log once it holds ``needle``."""

    def probe() -> str:
        text = replica_log(home, app, deployment)
        return text if needle in text else ""

    return probe


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.fixture
def client(serve_instance: Any) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=DEADLINE_S) as c:
        yield c


def url() -> str:
    return str(serve.status().http_url)


def test_json_logs_carry_the_request_context(client: httpx.Client, serve_home: Path) -> None:
    serve.run(
        apps.Chatty.bind(),
        name="jsonapp",
        route_prefix="/json",
        logging_config={"encoding": "JSON"},
    )
    r = client.get(f"{url()}/json", params={"tag": "j1"}, headers={"x-request-id": "json-req-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "json-req-1"

    def records() -> list[dict[str, Any]]:
        text = replica_log(serve_home, "jsonapp", "Chatty")
        out = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return out if any(rec.get("method") == "GET" for rec in out) else []

    found = wait_for(
        records, "the access line", lambda: replica_log(serve_home, "jsonapp", "Chatty")
    )
    text = replica_log(serve_home, "jsonapp", "Chatty")
    # After the config is known every line is JSON (only the first lines may not be).
    body = text.splitlines()[-len(found) :]
    assert all(line.startswith("{") for line in body), body
    (user,) = [r for r in found if r["message"] == "user info line j1"]
    assert user["logger"] == "my_app" and user["levelname"] == "INFO"
    assert user["request_id"] == "json-req-1"
    assert (user["application"], user["deployment"]) == ("jsonapp", "Chatty")
    assert user["replica"].startswith("jsonapp#Chatty#")
    assert user["route"] == "/json"
    (access,) = [r for r in found if r.get("method") == "GET"]
    assert access["request_id"] == "json-req-1" and access["status"] == 200
    assert access["latency_ms"] >= 0 and access["message"].startswith("GET /json 200 ")


def test_text_logs_attach_the_request_id_to_the_users_lines(
    client: httpx.Client, serve_home: Path
) -> None:
    serve.run(apps.Chatty.bind(), name="textapp", route_prefix="/text")
    client.get(f"{url()}/text", params={"tag": "t1"}, headers={"x-request-id": "text-req-1"})
    text = wait_for(
        log_once(serve_home, "textapp", "Chatty", "GET /text 200"),
        "the access line",
    )
    (user,) = lines_with(text, "user info line t1")
    assert re.match(r"^INFO \S+ \S+ textapp Chatty textapp#Chatty#\S+ text-req-1 -- ", user), user
    (access,) = lines_with(text, "GET /text 200")
    assert " text-req-1 -- GET /text 200 " in access and access.endswith("ms")

    # A sync method in a worker thread, called through a handle, logging on "trioserve".
    handle = serve.run(apps.SyncChatty.bind(), name="sync", route_prefix=None)
    response = handle.remote("s1")
    assert response.result(timeout_s=DEADLINE_S) == "s1"
    text = wait_for(
        log_once(serve_home, "sync", "SyncChatty", "CALL __call__"),
        "the handle call's access line",
    )
    (line,) = lines_with(text, "sync user line s1")
    assert f" {response.request_id} -- sync user line s1" in line
    (call,) = lines_with(text, "CALL __call__ OK")
    assert response.request_id in call


def test_access_log_off_keeps_the_users_lines(client: httpx.Client, serve_home: Path) -> None:
    serve.run(
        apps.Chatty.options(logging_config={"enable_access_log": False}).bind(),
        name="quiet",
        route_prefix="/quiet",
    )
    for n in (1, 2):
        r = client.get(
            f"{url()}/quiet", params={"tag": f"q{n}"}, headers={"x-request-id": f"q-{n}"}
        )
        assert r.status_code == 200
    text = wait_for(
        log_once(serve_home, "quiet", "Chatty", "line q2"),
        "the user's lines",
    )
    (user,) = lines_with(text, "user info line q1")
    assert " q-1 -- user info line q1" in user
    assert "GET /quiet" not in text
    # The proxy still logs its own line (its access log is its own setting).
    proxy = wait_for(
        lambda: lines_with(log_file(serve_home, "proxy").read_text(), "q-2 GET /quiet"),
        "the proxy's line",
    )
    assert re.search(r"q-2 GET /quiet\S* -> quiet/Chatty 200 [\d.]+ms$", proxy[0]), proxy


def test_log_level_warning_drops_the_users_info_lines(
    client: httpx.Client, serve_home: Path
) -> None:
    serve.run(
        apps.Chatty.bind(),
        name="warn",
        route_prefix="/warn",
        logging_config={"log_level": "WARNING"},
    )
    client.get(f"{url()}/warn", params={"tag": "w1"})
    text = wait_for(
        log_once(serve_home, "warn", "Chatty", "warning line w1"),
        "the user's warning",
    )
    assert "user info line w1" not in text
    assert "GET /warn" not in text  # access lines are INFO too


def test_the_proxy_logs_json_when_its_environment_says_so(
    serve_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOSERVE_PROXY_LOGGING_CONFIG", json.dumps({"encoding": "JSON"}))
    serve.start()
    try:
        serve.run(apps.Chatty.bind(), name="pj", route_prefix="/pj")
        r = httpx.get(f"{url()}/pj", headers={"x-request-id": "proxy-json-1"}, timeout=DEADLINE_S)
        assert r.status_code == 200

        def access() -> list[dict[str, Any]]:
            text = log_file(serve_home, "proxy").read_text()
            return [
                json.loads(line)
                for line in text.splitlines()
                if line.startswith("{") and "proxy-json-1" in line
            ]

        (line,) = wait_for(access, "the proxy's access line")
        assert line["request_id"] == "proxy-json-1" and line["status"] == 200
        assert (line["application"], line["deployment"], line["route"]) == ("pj", "Chatty", "/pj")
        assert line["component_name"] == "proxy" and line["latency_ms"] >= 0
    finally:
        serve.shutdown()
