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


def json_lines(path: Path, needle: str) -> list[dict[str, Any]]:
    """The JSON records of the log file ``path`` whose line holds ``needle``."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{") and needle in line]
    return [json.loads(line) for line in lines]


def proxy_counted(base_url: str, app: str) -> float:
    """How many requests to ``app`` the proxy has answered, by its own metrics.

    The proxy counts a request and then, in the same step (no await between),
    logs its access line or not: once counted, its line is in the file or never
    will be.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/-/metrics?scope=proxy", timeout=DEADLINE_S).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ray_serve_num_http_requests_total" and s.labels.get("application") == app
    )


def test_serve_start_logging_config_is_the_proxys(serve_home: Path) -> None:
    serve.start(logging_config={"encoding": "JSON"})
    try:
        serve.run(apps.Chatty.bind(), name="sj", route_prefix="/sj")
        r = httpx.get(f"{url()}/sj", headers={"x-request-id": "start-json-1"}, timeout=DEADLINE_S)
        assert r.status_code == 200
        (line,) = wait_for(
            lambda: json_lines(log_file(serve_home, "proxy"), "start-json-1"),
            "the proxy's JSON access line",
            lambda: log_file(serve_home, "proxy").read_text(),
        )
        assert line["component_name"] == "proxy" and line["status"] == 200
        assert (line["application"], line["route"]) == ("sj", "/sj")
        # The instance's config is the proxy's: the application's replicas keep theirs (TEXT).
        text = wait_for(log_once(serve_home, "sj", "Chatty", "GET /sj"), "the replica's line")
        mine = lines_with(text, "start-json-1")
        assert mine and not [line for line in mine if line.startswith("{")], mine
    finally:
        serve.shutdown()


def test_enable_access_log_false_silences_the_proxy(serve_home: Path) -> None:
    serve.start(logging_config={"enable_access_log": False})
    try:
        serve.run(apps.Chatty.bind(), name="sq", route_prefix="/sq")
        base = url()
        headers = {"x-request-id": "proxy-quiet-1"}
        assert httpx.get(f"{base}/sq", headers=headers, timeout=DEADLINE_S).status_code == 200
        wait_for(lambda: proxy_counted(base, "sq") >= 1, "the proxy counting the request")
        text = log_file(serve_home, "proxy").read_text()
        assert "proxy-quiet-1" not in text, text
        assert "listening at" in text  # the proxy's other lines stay
        # The replicas keep their access lines (their own logging_config).
        wait_for(log_once(serve_home, "sq", "Chatty", "proxy-quiet-1"), "the replica's line")
    finally:
        serve.shutdown()


def test_a_bad_logging_config_of_serve_start_is_refused(serve_home: Path) -> None:
    with pytest.raises(ValueError, match="logging_config encoding must be TEXT or JSON"):
        serve.start(logging_config={"encoding": "XML"})
    assert not (serve_home / "latest").exists()  # nothing was started


def test_trioserve_run_gives_the_files_logging_config_to_the_proxy(tmp_path: Path) -> None:
    from tests.e2e.test_cli_run import Run

    home = tmp_path / "home"
    config = tmp_path / "serve.yaml"
    config.write_text(
        "http_options: {host: 127.0.0.1, port: 0}\n"
        "logging_config: {encoding: JSON}\n"
        "applications:\n"
        "  - name: greet\n"
        "    route_prefix: /greet\n"
        "    import_path: tests.apps.configured:greeter\n"
    )
    run = Run([str(config)], home)
    try:
        base = run.urls()["greet"]
        r = httpx.get(base, headers={"x-request-id": "run-json-1"}, timeout=DEADLINE_S)
        assert r.status_code == 200
        proxy_log = home / "latest" / "logs" / "proxy.log"
        (line,) = wait_for(
            lambda: json_lines(proxy_log, "run-json-1"),
            "the proxy's JSON access line",
            lambda: proxy_log.read_text() if proxy_log.exists() else "(no proxy.log)",
        )
        assert line["component_name"] == "proxy" and line["application"] == "greet"
        assert run.stop() == 0
    finally:
        run.kill()


def test_deploying_a_file_to_the_daemon_changes_the_proxys_logging_live(
    daemon_home: Path, tmp_path: Path
) -> None:
    from tests.e2e.test_daemon import cli, running
    from trioserve.core.launcher import find_instance_processes

    home = daemon_home
    started = cli(home, "start", "--admin-port", "0", "--http-port", "0")
    assert started.returncode == 0, started.stderr
    config = tmp_path / "serve.yaml"
    app = (
        "applications:\n"
        "  - name: hello\n"
        "    route_prefix: /hello\n"
        "    import_path: tests.apps.daemon_app:app\n"
    )
    config.write_text("logging_config: {encoding: JSON}\n" + app)
    deployed = cli(home, "deploy", str(config))
    assert deployed.returncode == 0, deployed.stderr
    doc = wait_for(lambda: running(home, "hello", 1), "hello RUNNING")
    base = doc["http_url"]
    proxy_log = home / "daemon" / "logs" / "proxy.log"

    def proxies() -> set[int]:
        secret = home / "daemon" / "secret"
        return {p.pid for p in find_instance_processes(secret) if p.kind == "proxy"}

    (proxy,) = proxies()
    headers = {"x-request-id": "daemon-json-1"}
    assert httpx.get(f"{base}/hello", headers=headers, timeout=DEADLINE_S).status_code == 200
    (line,) = wait_for(
        lambda: json_lines(proxy_log, "daemon-json-1"),
        "the proxy's JSON access line",
        lambda: proxy_log.read_text() if proxy_log.exists() else "(no proxy.log)",
    )
    assert line["application"] == "hello" and line["status"] == 200

    # Another top-level logging_config: the running proxy takes it (the
    # application's replicas too, as their default).
    config.write_text("logging_config: {encoding: JSON, enable_access_log: false}\n" + app)
    again = cli(home, "deploy", str(config))
    assert again.returncode == 0, again.stderr
    wait_for(
        lambda: [
            r
            for r in json_lines(proxy_log, "logging_config:")
            if '"enable_access_log": false' in r["message"]
        ],
        "the proxy applying the new logging_config",
        lambda: proxy_log.read_text(),
    )
    headers = {"x-request-id": "daemon-quiet-1"}
    assert httpx.get(f"{base}/hello", headers=headers, timeout=DEADLINE_S).status_code == 200
    wait_for(lambda: proxy_counted(base, "hello") >= 2, "the proxy counting the request")
    assert "daemon-quiet-1" not in proxy_log.read_text()
    assert proxies() == {proxy}  # applied live: the same proxy process
