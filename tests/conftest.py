"""Fixtures shared by the tests of the public API: an embedded instance in a temp state dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every instance a test starts (scripts in subprocesses too) serves HTTP on a
# free port, so tests never collide with each other or with `make run` on 8000.
os.environ.setdefault("TRIOSERVE_DEFAULT_HTTP_PORT", "0")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.fixture
def serve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir (``TRIOSERVE_HOME``) for this test."""
    home = tmp_path / "home"
    monkeypatch.setenv("TRIOSERVE_HOME", str(home))
    return home


@pytest.fixture
def serve_instance(serve_home: Path) -> Iterator[object]:
    """The embedded instance of the sync API, shut down after the test.

    After shutdown, no replica process of the test may be left running.
    """
    import trioserve as serve

    serve.start()
    pids: set[int] = set()
    try:
        yield serve
        status = serve.status()
        for app in status.applications.values():
            for dep in app.deployments.values():
                pids |= {r.pid for r in dep.replicas if r.pid}
    finally:
        serve.shutdown()
    left = sorted(pid for pid in pids if pid != os.getpid() and pid_alive(pid))
    assert not left, f"replica processes left running after shutdown: {left}"
