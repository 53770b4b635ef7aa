"""Daemon mode through the CLI: start, deploy, status, config, delete, shutdown, and
controller recovery after SIGKILL while traffic flows (real processes, real HTTP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import pid_alive, poll_until
from trioserve.core.launcher import find_instance_processes

DEADLINE_S = 120.0
"""Generous: every wait polls and ends as soon as its condition holds."""


def cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``trioserve ARGS`` for the state dir ``home``."""
    env = {**os.environ, "TRIOSERVE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "trioserve.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        input=stdin if stdin is not None else "",
        timeout=DEADLINE_S * 2,
        check=False,
    )


def status(home: Path) -> dict[str, Any]:
    result = cli(home, "status")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    return document


def wait_until(what: str, predicate: Any) -> Any:
    return poll_until(predicate, what)


def running(home: Path, app: str, replicas: int) -> dict[str, Any] | None:
    doc = status(home)
    a = doc["applications"].get(app)
    if a is None or a["status"] != "RUNNING" or doc["proxies"].get("local") != "HEALTHY":
        return None
    counts = [d["replica_states"].get("RUNNING", 0) for d in a["deployments"].values()]
    return doc if sum(counts) == replicas else None


def replica_pids_of(doc: dict[str, Any], app: str) -> set[int]:
    return {
        r["pid"]
        for d in doc["applications"][app]["deployments"].values()
        for r in d["replicas"]
        if r["state"] == "RUNNING"
    }


def daemon_pid(home: Path) -> int:
    info = json.loads((home / "daemon" / "daemon.json").read_text())
    return int(info["pid"])


def write_config(path: Path, apps: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"applications": apps}, sort_keys=False))
    return path


@pytest.fixture
def home(daemon_home: Path) -> Path:
    """A state dir whose daemon (and every process of it) is gone after the test."""
    return daemon_home


def start(home: Path) -> subprocess.CompletedProcess[str]:
    result = cli(home, "start", "--admin-port", "0", "--http-port", "0")
    assert result.returncode == 0, result.stderr
    return result


def test_start_deploy_status_config_delete_shutdown(home: Path, tmp_path: Path) -> None:
    first = start(home)
    assert "started" in first.stderr
    again = start(home)
    assert "already running" in again.stderr
    pid = daemon_pid(home)

    config = write_config(
        tmp_path / "serve.yaml",
        [
            {"name": "plain", "route_prefix": "/plain", "import_path": "tests.apps.daemon_app:app"},
            {
                "name": "built",
                "route_prefix": "/built",
                "import_path": "tests.apps.daemon_app:greeter",
                "args": {"greeting": "bonjour"},
                "deployments": [{"name": "Hello", "num_replicas": 2}],
            },
        ],
    )
    deployed = cli(home, "deploy", str(config))
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed: plain, built" in deployed.stderr
    doc = wait_until("both applications RUNNING", lambda: running(home, "built", 2))
    assert doc["applications"]["built"]["deployments"]["Hello"]["target_replicas"] == 2
    url = doc["http_url"]
    assert httpx.get(f"{url}/built").json()["greeting"] == "bonjour"
    wait_until("plain RUNNING", lambda: running(home, "plain", 1))
    assert httpx.get(f"{url}/plain").json()["greeting"] == "hello"

    # The same file again changes nothing: same replica processes, nothing deployed.
    pids = replica_pids_of(status(home), "built")
    redeployed = cli(home, "deploy", str(config))
    assert redeployed.returncode == 0, redeployed.stderr
    assert "unchanged: plain, built" in redeployed.stderr
    assert replica_pids_of(status(home), "built") == pids

    one = cli(home, "status", "-n", "plain")
    assert list(yaml.safe_load(one.stdout)["applications"]) == ["plain"]

    shown = cli(home, "config")
    assert shown.returncode == 0, shown.stderr
    apps = list(yaml.safe_load_all(shown.stdout))
    assert [a["name"] for a in apps] == ["plain", "built"]
    assert apps[1]["args"] == {"greeting": "bonjour"}

    deleted = cli(home, "delete", "plain")
    assert deleted.returncode == 0, deleted.stderr
    wait_until("plain deleted", lambda: "plain" not in status(home)["applications"])
    missing = cli(home, "delete", "plain")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr

    refused = cli(home, "shutdown")  # no terminal to confirm on
    assert refused.returncode == 2
    assert "-y" in refused.stderr
    done = cli(home, "shutdown", "-y")
    assert done.returncode == 0, done.stderr
    wait_until("the daemon gone", lambda: not pid_alive(pid))
    wait_until(
        "every replica and the proxy gone",
        lambda: not find_instance_processes(home / "daemon" / "secret"),
    )
    after = cli(home, "status")
    assert after.returncode == 1
    assert "trioserve start" in after.stderr

    # A shut down daemon's applications were deleted: a new start serves none.
    start(home)
    assert status(home)["applications"] == {}


def test_commands_without_a_daemon_say_how_to_start_one(home: Path) -> None:
    for args in (("status",), ("config",), ("delete", "x"), ("shutdown", "-y")):
        result = cli(home, *args)
        assert result.returncode == 1, args
        assert "start one with `trioserve start`" in result.stderr


def test_admin_api_needs_the_instance_secret(home: Path) -> None:
    start(home)
    info = json.loads((home / "daemon" / "daemon.json").read_text())
    url = info["admin_url"]
    assert httpx.get(f"{url}/-/healthz").text == "success"
    anonymous = httpx.get(f"{url}/api/serve/applications/")
    assert anonymous.status_code == 401
    assert "Bearer" in anonymous.json()["error"]
    wrong = httpx.get(
        f"{url}/api/serve/applications/", headers={"authorization": "Bearer not-the-secret"}
    )
    assert wrong.status_code == 401
    secret = (home / "daemon" / "secret").read_text().strip()
    ok = httpx.get(f"{url}/api/serve/applications/", headers={"authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    assert ok.json()["applications"] == {}
    bad = httpx.put(
        f"{url}/api/serve/applications/",
        headers={"authorization": f"Bearer {secret}"},
        content=b"{not json",
    )
    assert bad.status_code == 400
    assert status(home)["applications"] == {}


class Traffic:
    """Requests one after another from a thread, counting answers and failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)

    def wait_for_more(self, n: int) -> None:
        target = self.ok + n
        wait_until(f"{n} more answers", lambda: self.ok >= target or self.failures)


def test_sigkill_of_the_controller_under_traffic_loses_no_request(
    home: Path, tmp_path: Path
) -> None:
    start(home)
    config = write_config(
        tmp_path / "serve.yaml",
        [
            {
                "name": "app",
                "route_prefix": "/",
                "import_path": "tests.apps.daemon_app:app",
                "deployments": [{"name": "Hello", "num_replicas": 2}],
            }
        ],
    )
    assert cli(home, "deploy", str(config)).returncode == 0
    doc = wait_until("the app RUNNING", lambda: running(home, "app", 2))
    pids = replica_pids_of(doc, "app")
    proxy = [
        p.pid for p in find_instance_processes(home / "daemon" / "secret") if p.kind == "proxy"
    ]
    assert len(proxy) == 1

    with Traffic(doc["http_url"] + "/") as traffic:
        traffic.wait_for_more(20)
        first = daemon_pid(home)
        os.kill(first, signal.SIGKILL)
        wait_until("the daemon gone", lambda: not pid_alive(first))
        traffic.wait_for_more(50)  # served with no controller at all

        start(home)
        assert daemon_pid(home) != first
        doc = wait_until("the app RUNNING again", lambda: running(home, "app", 2))
        assert replica_pids_of(doc, "app") == pids
        now = [p.pid for p in find_instance_processes(home / "daemon" / "secret")]
        assert proxy[0] in now
        traffic.wait_for_more(50)
    assert traffic.failures == []

    # A replica that dies while the controller is down is replaced by the next.
    second = daemon_pid(home)
    os.kill(second, signal.SIGKILL)
    wait_until("the daemon gone", lambda: not pid_alive(second))
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until("the replica gone", lambda: not pid_alive(victim))
    start(home)
    doc = wait_until(
        "a replacement RUNNING",
        lambda: (
            d
            if (d := running(home, "app", 2)) and victim not in replica_pids_of(d, "app")
            else None
        ),
    )
    assert max(pids) in replica_pids_of(doc, "app")
    with Traffic(doc["http_url"] + "/") as traffic:
        traffic.wait_for_more(50)
    assert traffic.failures == []

    # `latest` is the daemon's folder since its start: no --log needed.
    shown = cli(home, "log", "show", "--kind", "ReplicaAdopted")
    assert shown.stdout.count("ReplicaAdopted") == 3  # two, then the survivor again
    verified = cli(home, "log", "verify", "--log", str(home / "daemon"))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def can_bind(sock: socket.socket, port: int) -> bool:
    """Bind ``sock`` to ``port``; False while the kernel still holds the port."""
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_start_that_cannot_listen_stops_nothing_it_would_adopt(
    home: Path, tmp_path: Path
) -> None:
    admin_port = free_port()
    started = cli(home, "start", "--admin-port", str(admin_port), "--http-port", "0")
    assert started.returncode == 0, started.stderr
    config = write_config(
        tmp_path / "serve.yaml",
        [{"name": "app", "route_prefix": "/", "import_path": "tests.apps.daemon_app:app"}],
    )
    assert cli(home, "deploy", str(config)).returncode == 0
    doc = wait_until("the app RUNNING", lambda: running(home, "app", 1))
    survivors = {p.pid for p in find_instance_processes(home / "daemon" / "secret")}
    first = daemon_pid(home)
    os.kill(first, signal.SIGKILL)
    wait_until("the daemon gone", lambda: not pid_alive(first))

    with socket.socket() as squatter:  # another program takes the admin port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_until("the admin port free", lambda: can_bind(squatter, admin_port))
        squatter.listen()
        refused = cli(home, "start")
        assert refused.returncode == 1
        assert "--admin-port" in refused.stderr
        assert httpx.get(doc["http_url"] + "/").status_code == 200
        assert survivors <= {p.pid for p in find_instance_processes(home / "daemon" / "secret")}

    again = cli(home, "start")  # the same admin port as before, free again
    assert again.returncode == 0, again.stderr
    doc = wait_until("the app RUNNING", lambda: running(home, "app", 1))
    assert survivors == {p.pid for p in find_instance_processes(home / "daemon" / "secret")}


def test_start_reports_a_proxy_that_cannot_listen(home: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = cli(home, "start", "--admin-port", "0", "--http-port", str(taken))
    assert result.returncode == 1
    assert "HTTP proxy cannot serve" in result.stderr
    assert "--http-port" in result.stderr


def test_the_next_start_serves_as_the_last_one_asked(home: Path) -> None:
    port = free_port()
    first = cli(home, "start", "--admin-port", "0", "--http-port", str(port))
    assert first.returncode == 0, first.stderr
    assert f"HTTP proxy at http://127.0.0.1:{port}" in first.stderr
    assert cli(home, "shutdown", "-y").returncode == 0
    again = cli(home, "start")
    assert again.returncode == 0, again.stderr
    assert f"HTTP proxy at http://127.0.0.1:{port}" in again.stderr


def test_the_admin_api_refuses_an_ingress_that_is_not_a_deployment(home: Path) -> None:
    start(home)
    from tests.apps.daemon_app import app
    from trioserve.core.deployment import build_app
    from trioserve.daemon import AdminClient, DaemonError, deploy_payload

    payload = deploy_payload({"applications": []}, [build_app(app, "a", "/a")])
    payload["applications"][0]["ingress"] = "Nope"
    previous = os.environ.get("TRIOSERVE_HOME")
    os.environ["TRIOSERVE_HOME"] = str(home)
    try:
        with AdminClient() as admin, pytest.raises(DaemonError, match="'Nope' is not one of"):
            admin.deploy(payload)
    finally:
        if previous is None:
            del os.environ["TRIOSERVE_HOME"]
        else:
            os.environ["TRIOSERVE_HOME"] = previous
    assert status(home)["applications"] == {}
