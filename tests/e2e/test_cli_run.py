"""``trioserve run`` as a user runs it: a real process, real HTTP, Ctrl-C to stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.conftest import pid_alive, proxy_pids

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 90.0
"""Generous: polled, so a test waits only as long as the system needs."""

READY = re.compile(r"Application '([^']+)' is ready at (http://\S+?)\.?$")


class Run:
    """A ``trioserve run`` process whose combined output is collected line by line."""

    def __init__(self, args: Sequence[str], home: Path, cwd: Path = REPO) -> None:
        env = {**os.environ, "TRIOSERVE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        self.home = home
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trioserve.cli", "run", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``count`` output lines match ``pattern``; fail showing the output."""
        deadline = time.monotonic() + DEADLINE_S
        regex = re.compile(pattern)
        while True:
            found = [m for line in list(self.lines) if (m := regex.search(line))]
            if len(found) >= count:
                return found
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"trioserve run exited ({self.process.returncode}) before printing "
                    f"{pattern!r}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} after {DEADLINE_S} s:\n{self.output}")
            time.sleep(0.05)

    def urls(self, count: int = 1) -> dict[str, str]:
        """The URL of each application, from the lines ``run`` prints when they are ready."""
        matches = self.wait_for(READY.pattern, count)
        return {m.group(1): m.group(2) for m in matches}

    def exit_code(self) -> int:
        try:
            code = self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"trioserve run did not exit:\n{self.output}") from None
        self._reader.join(timeout=DEADLINE_S)
        return code

    def stop(self) -> int:
        """Ctrl-C, then the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.exit_code()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=DEADLINE_S)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def started(home: Path) -> Iterator[list[Run]]:
    """Runs a test starts; any still running at the end is killed."""
    runs: list[Run] = []
    yield runs
    for run in runs:
        run.kill()


def start(runs: list[Run], args: Sequence[str], home: Path, cwd: Path = REPO) -> Run:
    run = Run(args, home, cwd)
    runs.append(run)
    return run


def replica_pids(home: Path) -> set[int]:
    """The pids of the replicas the latest instance in ``home`` ran (from its event log)."""
    from trioserve.core import events as ev
    from trioserve.store import EventLog

    with EventLog.open(home / "latest" / "events.db", create=False) as log:
        return {s.event.pid for s in log.read() if isinstance(s.event, ev.ReplicaRunning)}


def assert_processes_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = sorted(pid for pid in pids if pid_alive(pid))
            raise AssertionError(f"processes left running after Ctrl-C: {left}")
        time.sleep(0.05)


def get(url: str, **params: str) -> httpx.Response:
    return httpx.get(url, params=params, timeout=DEADLINE_S)


def test_run_serves_an_import_path_until_ctrl_c(home: Path, started: list[Run]) -> None:
    run = start(started, ["tests.apps.configured:greeter", "--port", "0"], home)
    url = run.urls()["default"]
    assert get(url, name="ada").text == "hello, ada!"
    pids = replica_pids(home)
    proxies = set(proxy_pids(home))
    assert pids and all(pid_alive(pid) for pid in pids)
    assert proxies and all(pid_alive(pid) for pid in proxies)

    assert run.stop() == 0
    assert "Stopped." in run.output
    assert_processes_gone(pids | proxies)
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=5)


def test_run_serves_every_application_of_a_config_file(
    tmp_path: Path, home: Path, started: list[Run]
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "http_options:\n"
        "  host: 127.0.0.1\n"
        "  port: 0\n"
        "applications:\n"
        "  - name: calc\n"
        "    route_prefix: /calculator\n"
        "    import_path: tests.apps.configured:app\n"
        "    runtime_env:\n"
        "      env_vars: {CALC_MODE: fast}\n"
        "    deployments:\n"
        "      - name: Multiplier\n"
        "        num_replicas: 2\n"
        "        user_config: {factor: 3}\n"
        "  - name: greet\n"
        "    route_prefix: /greet\n"
        "    import_path: tests.apps.configured:build_greeter\n"
        "    args: {greeting: howdy}\n"
    )
    run = start(started, [str(config)], home)
    urls = run.urls(2)
    assert urls["calc"].endswith("/calculator") and urls["greet"].endswith("/greet")
    # 4 * factor 3 (from the file) + 10 (bound in the code); the app's env_vars are set.
    assert get(urls["calc"], value="4").json() == {"result": 22, "mode": "fast"}
    assert get(urls["greet"]).text == "howdy, world!"
    assert len(replica_pids(home)) == 5  # Multiplier x2 (from the file), Adder, Calculator, Greeter
    pids = replica_pids(home)

    assert run.stop() == 0
    assert_processes_gone(pids)


def test_run_passes_key_value_args_to_a_builder(home: Path, started: list[Run]) -> None:
    run = start(
        started,
        ["tests.apps.configured:build_greeter", "greeting=bonjour", "--port", "0"],
        home,
    )
    url = run.urls()["default"]
    assert get(url).text == "bonjour, world!"
    assert run.stop() == 0


def test_a_failing_constructor_exits_1_with_its_traceback(home: Path, started: list[Run]) -> None:
    run = start(started, ["tests.apps.configured:broken", "--port", "0"], home)
    assert run.exit_code() == 1
    output = run.output
    assert "Traceback" in output
    assert "RuntimeError: the model file weights.bin is missing" in output
    assert "Fix the error and run again." in output
    assert output.rstrip().endswith("Stopped.")


def test_a_bad_config_file_exits_2_naming_the_line_and_starts_nothing(
    tmp_path: Path, home: Path, started: list[Run]
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n"
        "  - name: calc\n"
        "    import_path: tests.apps.configured:app\n"
        "    deployments:\n"
        "      - name: Multiplier\n"
        "        num_replicas: many\n"
    )
    run = start(started, [str(config)], home)
    assert run.exit_code() == 2
    assert f"{config}:6: applications[0].deployments[0].num_replicas: must be" in run.output
    assert not home.exists()


def test_a_port_in_use_exits_1_with_a_hint(home: Path, started: list[Run]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = start(started, ["tests.apps.configured:greeter", "--port", str(port)], home)
        assert run.exit_code() == 1
    assert "Pick another port with --port" in run.output


def test_reload_redeploys_when_a_file_changes(
    tmp_path: Path, home: Path, started: list[Run]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    module = project / "reloadable_hello.py"
    helper = project / "reloadable_helper.py"
    source = (
        "import trioserve as serve\n"
        "import reloadable_helper\n\n"
        "@serve.deployment\n"
        "class Hello:\n"
        "    def __call__(self, request) -> str:\n"
        "        return 'version one, ' + reloadable_helper.ANSWER\n\n"
        "app = Hello.bind()\n"
    )
    module.write_text(source)
    helper.write_text("ANSWER = 'helper one'\n")
    run = start(started, ["reloadable_hello:app", "--port", "0", "--reload"], home, cwd=project)
    url = run.urls()["default"]
    assert get(url).text == "version one, helper one"
    run.wait_for("Watching")

    def wait_for_answer(old: str, new: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while (text := get(url).text) != new:
            assert text == old  # the old version serves until the new one is up
            assert time.monotonic() < deadline, run.output
            time.sleep(0.1)

    module.write_text(source.replace("version one", "version two"))
    run.wait_for("Reloaded")
    wait_for_answer("version one, helper one", "version two, helper one")

    # An edit of a module the app imports (not the deployment's own) rolls the replicas too.
    helper.write_text("ANSWER = 'helper two'\n")
    run.wait_for("Reloaded", count=2)
    wait_for_answer("version two, helper one", "version two, helper two")

    # A broken edit keeps the running version and says what is wrong.
    module.write_text(source.replace("return 'version one, '", "return version one"))
    run.wait_for("still serving the previous version")
    assert "SyntaxError" in run.output
    assert get(url).text == "version two, helper two"
    assert run.stop() == 0


def test_a_relative_state_dir_serves_an_app_in_a_working_dir(
    tmp_path: Path, started: list[Run]
) -> None:
    project = tmp_path / "project"
    code = project / "code"
    code.mkdir(parents=True)
    (code / "wd_hello.py").write_text(
        "import trioserve as serve\n\n"
        "@serve.deployment\n"
        "class Hello:\n"
        "    def __call__(self, request) -> str:\n"
        "        return 'hello from the working dir'\n\n"
        "app = Hello.bind()\n"
    )
    # TRIOSERVE_HOME=state, relative to the folder trioserve runs in; replicas run in code/.
    run = start(
        started,
        ["wd_hello:app", "--working-dir", "code", "--port", "0"],
        Path("state"),
        cwd=project,
    )
    url = run.urls()["default"]
    assert get(url).text == "hello from the working dir"
    assert (project / "state" / "latest" / "events.db").exists()
    assert not (code / "state").exists()
    assert run.stop() == 0
