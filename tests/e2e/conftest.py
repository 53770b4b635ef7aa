"""Fixtures of the whole-system tests."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def daemon_home(tmp_path: Path) -> Iterator[Path]:
    """A state dir for a daemon: after the test it is shut down and every process
    of it (replicas, proxy, the daemon itself) is gone."""
    from tests.e2e.test_daemon import cli, daemon_pid
    from trioserve.core.launcher import find_instance_processes

    home = tmp_path / "home"
    yield home
    if (home / "daemon" / "daemon.json").exists():
        cli(home, "shutdown", "-y")
    for process in find_instance_processes(home / "daemon" / "secret"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, ProcessLookupError):
        os.kill(daemon_pid(home), signal.SIGKILL)
