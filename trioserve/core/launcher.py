"""Launchers start the processes the controller supervises.

A :class:`Launcher` starts a replica (and, later, the proxy) and hands back a
:class:`LaunchedProcess` the controller can wait on, terminate and kill. The
:class:`LocalProcessLauncher` runs them as child processes of this machine;
launchers for other machines plug in behind the same protocol.

Embedded and daemon mode
------------------------
In **embedded** mode (``serve.run`` from a script, tests) every child gets the
read end of a *lifeline* pipe whose write end only this process holds. When
this process ends, however it ends (SIGKILL included), the kernel closes the
write end, each child reads end-of-file and stops itself. A pipe rather than
``PR_SET_PDEATHSIG``, because the latter fires when the *thread* that forked
exits, and processes are spawned from worker threads.

In **daemon** mode there is no lifeline: children outlive a controller crash so
that the next controller can adopt them. In both modes children run in their
own session, so a Ctrl-C at the terminal reaches the driver, not its replicas.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc

__all__ = ["LaunchedProcess", "Launcher", "LocalProcessLauncher", "describe_exit"]


class LaunchedProcess(Protocol):
    """A process a launcher started."""

    @property
    def pid(self) -> int:
        """The process id."""

    async def wait(self) -> int | None:
        """Wait until the process exits; its exit code (negative: killed by that signal)."""

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM)."""

    def kill(self) -> None:
        """Stop the process now (SIGKILL)."""


class Launcher(Protocol):
    """What the controller needs to start replicas."""

    async def start_replica(
        self, replica: str, controller: str, *, event_loop: str = "asyncio"
    ) -> LaunchedProcess:
        """Start the replica ``replica``, told to call the controller at ``controller``."""

    def close(self) -> None:
        """Release the launcher; in embedded mode its children stop."""


def describe_exit(code: int | None) -> str:
    """``exited with code 1`` / ``killed by signal 9 (SIGKILL)`` / ``exited``."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


class _Child:
    """A child process started through anyio."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int | None:
        return await self._process.wait()

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class LocalProcessLauncher:
    """Starts replicas as child processes, each logging to its own file.

    ``run_dir`` is the instance's run folder: logs go to ``run_dir/logs``.
    ``secret_file`` is the instance secret the children authenticate with.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        secret_file: str | os.PathLike[str],
        *,
        embedded: bool = True,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.secret_file = str(secret_file)
        self.embedded = embedded
        self.python = python
        self.env = dict(os.environ if env is None else env)
        # Children import the user's modules as this process does.
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        extra = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join([*paths, *([extra] if extra else [])])
        self._lifeline: tuple[int, int] | None = os.pipe() if embedded else None

    def log_file(self, name: str) -> Path:
        """Where the process ``name`` writes its output."""
        return self.log_dir / f"{_file_name(name)}.log"

    async def start(self, name: str, argv: Sequence[str]) -> LaunchedProcess:
        """Start ``argv`` as the process ``name``, output appended to its log file."""
        if self.embedded and self._lifeline is None:
            raise RuntimeError("the launcher is closed")
        pass_fds: tuple[int, ...] = ()
        args = list(argv)
        if self._lifeline is not None:
            pass_fds = (self._lifeline[0],)
            args += ["--lifeline-fd", str(self._lifeline[0])]
        with open(self.log_file(name), "ab") as out:
            process = await anyio.open_process(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        return _Child(process)

    async def start_replica(
        self, replica: str, controller: str, *, event_loop: str = "asyncio"
    ) -> LaunchedProcess:
        return await self.start(
            f"replica-{replica}",
            [
                self.python,
                "-m",
                "trioserve.replica",
                "--controller",
                controller,
                "--replica",
                replica,
                "--secret-file",
                self.secret_file,
                "--loop",
                event_loop,
            ],
        )

    def close(self) -> None:
        """Close the lifeline: in embedded mode, every child stops itself."""
        if self._lifeline is not None:
            for fd in self._lifeline:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._lifeline = None
