"""Ray Serve's key-concepts examples, run as users run them: plain scripts in a fresh process.

The scripts in ``examples/`` differ from Ray Serve's only in their imports.
Their classes live in ``__main__``, so their code travels to the replicas
by value; each script exits 0 with every replica gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import pid_alive
from trioserve.store import EventLog

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "script",
    ["key_concepts_deployment.py", "key_concepts_composition.py"],
)
def test_example_runs_as_a_plain_script(script: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "TRIOSERVE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hello world!"
    # The run's log outlives the script, and every replica it started is gone.
    with EventLog.open(home / "latest" / "events.db", create=False) as log:
        running = [e.event for e in log.read() if e.kind == "ReplicaRunning"]
    assert running
    assert not [e.pid for e in running if pid_alive(e.pid)]


def test_blocking_run_serves_until_ctrl_c_then_shuts_down(tmp_path: Path) -> None:
    import signal

    home = tmp_path / "home"
    env = {**os.environ, "TRIOSERVE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.blocking_driver"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "press Ctrl-C to stop" in line, line + proc.stderr.read()
        with EventLog.open(home / "latest" / "events.db", create=False) as log:
            pids = [e.event.pid for e in log.read() if e.kind == "ReplicaRunning"]
        assert pids and all(pid_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"
    assert not [pid for pid in pids if pid_alive(pid)]
