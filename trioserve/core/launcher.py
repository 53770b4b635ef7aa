"""Launchers start the processes the controller supervises.

A :class:`Launcher` starts a replica or the HTTP proxy and hands back a
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

GPUs
----
A replica placed on GPUs (``gpu_ids``, numbered from 0 as
:mod:`trioserve.core.placement` assigns them) sees only those, through
``CUDA_VISIBLE_DEVICES``. When the launcher's own environment already limits
the GPUs with ``CUDA_VISIBLE_DEVICES``, id ``n`` is its ``n``-th entry, as
:func:`detect_resources` counted them. :func:`detect_resources` tells what this
machine has, for ``ControllerStarted``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc

__all__ = [
    "GPU_DETECT_TIMEOUT_S",
    "LIFELINE_GRACE_S",
    "asyncio_backend_options",
    "watch_lifeline",
    "LaunchedProcess",
    "Launcher",
    "LocalProcessLauncher",
    "describe_exit",
    "detect_resources",
]

LIFELINE_GRACE_S = 5.0
"""After its lifeline closes, how long a child may take to stop before it exits anyway."""
GPU_DETECT_TIMEOUT_S = 5.0
"""How long ``nvidia-smi -L`` may take before the machine is taken to have no GPU."""


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
        self,
        replica: str,
        controller: str,
        *,
        event_loop: str = "asyncio",
        gpu_ids: Sequence[int] | None = None,
    ) -> LaunchedProcess:
        """Start the replica ``replica``, told to call the controller at ``controller``.

        ``gpu_ids`` are the GPUs it was placed on: it sees only those. ``None``
        or ``()`` (it asked for none) leaves its environment as it is.
        """

    async def start_proxy(self, controller: str, options: Mapping[str, object]) -> LaunchedProcess:
        """Start the HTTP proxy with ``options`` (``HTTPOptions.to_dict()``)."""

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

    async def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> LaunchedProcess:
        """Start ``argv`` as the process ``name``, output appended to its log file.

        ``env`` holds variables set for this process on top of the launcher's.
        """
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
                env=self.env if not env else {**self.env, **env},
                start_new_session=True,
                pass_fds=pass_fds,
            )
        return _Child(process)

    def gpu_env(self, gpu_ids: Sequence[int] | None) -> dict[str, str]:
        """The variables that show a replica placed on ``gpu_ids`` only those GPUs.

        Empty for ``None`` or ``()``. Ids index the entries of the launcher's own
        ``CUDA_VISIBLE_DEVICES`` when it is set, else they are device ids.
        """
        if not gpu_ids:
            return {}
        visible = _visible_devices(self.env)
        devices = [
            visible[gpu] if visible is not None and 0 <= gpu < len(visible) else str(gpu)
            for gpu in gpu_ids
        ]
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices)}

    async def start_replica(
        self,
        replica: str,
        controller: str,
        *,
        event_loop: str = "asyncio",
        gpu_ids: Sequence[int] | None = None,
    ) -> LaunchedProcess:
        """Start the replica process; with ``gpu_ids`` it sees only those GPUs."""
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
            env=self.gpu_env(gpu_ids),
        )

    async def start_proxy(self, controller: str, options: Mapping[str, object]) -> LaunchedProcess:
        """Start the HTTP proxy process with ``options`` (an ``HTTPOptions`` dict)."""
        import json

        return await self.start(
            "proxy",
            [
                self.python,
                "-m",
                "trioserve.proxy",
                "--controller",
                controller,
                "--secret-file",
                self.secret_file,
                "--options",
                json.dumps(dict(options)),
            ],
        )

    def close(self) -> None:
        """Close the lifeline: in embedded mode, every child stops itself."""
        if self._lifeline is not None:
            for fd in self._lifeline:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._lifeline = None


def _visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` in ``env`` (None when it is not set).

    As CUDA reads it: entries up to the first empty or negative one.
    """
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    devices: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def _gpu_count() -> int:
    visible = _visible_devices(os.environ)
    if visible is not None:
        return len(visible)
    command = shutil.which("nvidia-smi")
    if command is None:
        return 0
    try:
        done = subprocess.run(
            [command, "-L"],
            capture_output=True,
            text=True,
            timeout=GPU_DETECT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    if done.returncode != 0:
        return 0
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    value, *unit = line.split()[1:]
                    scale = 1024 if unit and unit[0].lower() == "kb" else 1
                    return int(value) * scale
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def detect_resources() -> dict[str, float]:
    """What this machine has for replicas: ``{"CPU": ..., "GPU": ..., "memory": bytes}``.

    CPUs are ``os.cpu_count()``; memory is ``MemTotal`` of ``/proc/meminfo``
    (else physical pages times page size); GPUs are the entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else the devices ``nvidia-smi -L``
    lists within :data:`GPU_DETECT_TIMEOUT_S` (0 when it is missing or fails).
    """
    return {
        "CPU": float(os.cpu_count() or 1),
        "GPU": float(_gpu_count()),
        "memory": float(_memory_bytes()),
    }


# ------------------------------------------------------------- in the children


def watch_lifeline(fd: int, what: str) -> None:
    """In a child (``what``: "replica", "proxy"): block until the lifeline closes, then stop.

    Sends SIGTERM to this process, so that it drains as when the controller
    stops it, and exits after :data:`LIFELINE_GRACE_S` if it is still there.
    Run it in a daemon thread.
    """
    import logging
    import time

    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    logging.getLogger(f"trioserve.{what}").warning(
        "the process that started this %s is gone; stopping", what
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LIFELINE_GRACE_S)
    os._exit(1)


def asyncio_backend_options() -> dict[str, object]:
    """anyio's asyncio options for a child: uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
