"""Fixtures shared by the tests of the public API: an embedded instance in a temp state dir."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Every instance a test starts (scripts in subprocesses too) serves HTTP on a
# free port, so tests never collide with each other or with `make run` on 8000.
os.environ.setdefault("TRIOSERVE_DEFAULT_HTTP_PORT", "0")


PROCESS_GONE_DEADLINE_S = 60.0
"""How long a process may take to exit after ``serve.shutdown()`` returns (a
generous deadline: it is polled, and the wait ends as soon as the process is gone)."""


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def process_state(pid: int) -> str | None:
    """The ``State`` of ``pid`` in ``/proc/<pid>/status`` (``"S (sleeping)"``,
    ``"Z (zombie)"``...), or None once there is no such process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.partition(":")[2].strip()
    return "unknown"


def pid_gone_and_reaped(pid: int) -> bool:
    """True once ``pid`` has exited and its parent has reaped it.

    Unlike :func:`pid_alive`, a zombie (exited, never waited for) is not gone:
    it means whoever started the process did not wait for it.
    """
    return process_state(pid) is None


def wait_gone_and_reaped(pids: Iterable[int], what: str) -> None:
    """Poll until every pid of ``pids`` is gone and reaped; fail naming those left."""
    pids = sorted(set(pids))
    deadline = time.monotonic() + PROCESS_GONE_DEADLINE_S
    while True:
        left = {pid: state for pid in pids if (state := process_state(pid)) is not None}
        if not left:
            return
        if time.monotonic() > deadline:
            described = ", ".join(f"{pid} (state {state})" for pid, state in left.items())
            zombie = any(state.startswith("Z") for state in left.values())
            raise AssertionError(
                f"{what} still there {PROCESS_GONE_DEADLINE_S:.0f} s after shutdown: "
                f"{described}"
                + ("; a zombie has exited but was never reaped by its parent" if zombie else "")
            )
        time.sleep(0.05)


POLL_DEADLINE_S = 120.0
"""How long :func:`poll_until` waits by default (generous: the wait ends as soon as
the condition holds)."""


def poll_until(
    produce: Callable[[], Any],
    what: str,
    on_fail: Callable[[], str] = str,
    deadline_s: float = POLL_DEADLINE_S,
) -> Any:
    """Poll ``produce`` until it returns something truthy, and return that; fail
    naming ``what`` (and ``on_fail()``, some context) after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = produce()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {deadline_s:.0f} s\n{on_fail()}")
        time.sleep(0.05)


def proxy_pids(home: Path) -> list[int]:
    """The pids of the HTTP proxies the latest instance in ``home`` started, from
    the ``ProxyStarted`` events of its event log (none if it ran no proxy)."""
    from trioserve.core import events as ev
    from trioserve.store import EventLog

    path = home / "latest" / "events.db"
    if not path.exists():
        return []
    with EventLog.open(path, create=False) as log:
        return [s.event.pid for s in log.read() if isinstance(s.event, ev.ProxyStarted)]


def replica_pids(status: Any) -> set[int]:
    """The pids of every replica ``serve.status()`` shows."""
    return {
        r.pid
        for app in status.applications.values()
        for dep in app.deployments.values()
        for r in dep.replicas
        if r.pid
    }


def assert_replicas_gone(pids: set[int]) -> None:
    """After shutdown: none of ``pids`` (replicas seen before it) may still run."""
    left = sorted(pid for pid in pids if pid != os.getpid() and pid_alive(pid))
    assert not left, f"replica processes left running after shutdown: {left}"


@pytest.fixture
def serve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir (``TRIOSERVE_HOME``) for this test."""
    home = tmp_path / "home"
    monkeypatch.setenv("TRIOSERVE_HOME", str(home))
    return home


@pytest.fixture
def serve_instance(serve_home: Path) -> Iterator[object]:
    """The embedded instance of the sync API, shut down after the test.

    After shutdown, no replica process of the test may be left running, and
    the HTTP proxy processes must be gone and reaped (not zombies).
    """
    import trioserve as serve

    serve.start()
    pids: set[int] = set()
    try:
        yield serve
        pids = replica_pids(serve.status())
    finally:
        serve.shutdown()
    assert_replicas_gone(pids)
    wait_gone_and_reaped(proxy_pids(serve_home), "HTTP proxy process(es)")
