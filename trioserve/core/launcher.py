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
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from trioserve.core import runtime_env as runtime_env_mod

__all__ = [
    "ADOPTED_POLL_S",
    "AdoptedProcess",
    "FoundProcess",
    "find_instance_processes",
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
        runtime_env: Mapping[str, Any] | None = None,
    ) -> LaunchedProcess:
        """Start the replica ``replica``, told to call the controller at ``controller``.

        ``gpu_ids`` are the GPUs it was placed on: it sees only those. ``None``
        or ``()`` (it asked for none) leaves its environment as it is.
        ``runtime_env`` is the deployment's (``ray_actor_options``), prepared
        before the process starts; the controller passes it only when set.
        """

    async def start_proxy(self, controller: str, options: Mapping[str, object]) -> LaunchedProcess:
        """Start the HTTP proxy with ``options`` (``HTTPOptions.to_dict()``)."""

    def find_processes(self) -> list[FoundProcess]:
        """The processes of this instance still running from an earlier controller."""

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


ADOPTED_POLL_S = 0.2
"""How often an adopted process (not a child of this one) is checked for its exit."""


@dataclasses.dataclass(frozen=True)
class FoundProcess:
    """A process of this instance that an earlier controller started (daemon mode)."""

    pid: int
    kind: str
    """``"replica"`` or ``"proxy"``."""
    argv: tuple[str, ...]
    started: int
    """Its start time in clock ticks since boot (``/proc/<pid>/stat``), so that a pid
    reused by another process later is told apart."""

    def option(self, name: str) -> str | None:
        """The value of the command-line option ``name`` (``--replica``), if given."""
        argv = list(self.argv)
        if name in argv[:-1]:
            return argv[argv.index(name) + 1]
        return None


def find_instance_processes(secret_file: str | os.PathLike[str]) -> list[FoundProcess]:
    """The replica and proxy processes on this machine started with ``secret_file``.

    Only the instance's own processes carry its secret file's path on their
    command line, so this finds what a controller of the same instance started,
    and nothing of another instance.
    """
    wanted = str(secret_file)
    found: list[FoundProcess] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = tuple(part.decode() for part in f.read().split(b"\0") if part)
            started = _start_ticks(int(entry))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if started is None or "--secret-file" not in argv or wanted not in argv:
            continue
        kind = next(
            (k for k in ("replica", "proxy") if f"trioserve.{k}" in argv),
            None,
        )
        if kind is not None:
            found.append(FoundProcess(int(entry), kind, argv, started))
    return found


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


class AdoptedProcess:
    """A process an earlier controller started, taken over by this one.

    It is not this process's child, so its exit code is unknown (``wait``
    returns None) and its exit is noticed by polling every
    :data:`ADOPTED_POLL_S`. Signals are sent only while the pid still belongs
    to the process that was adopted.
    """

    def __init__(self, found: FoundProcess) -> None:
        self.found = found

    @property
    def pid(self) -> int:
        return self.found.pid

    def alive(self) -> bool:
        """Whether the adopted process still runs."""
        return _start_ticks(self.found.pid) == self.found.started

    async def wait(self) -> int | None:
        while self.alive():
            await anyio.sleep(ADOPTED_POLL_S)
        return None

    def _signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.found.pid, signum)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


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
        # Absolute: children run in other folders (a runtime_env working_dir).
        self.run_dir = Path(run_dir).absolute()
        self.log_dir = self.run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.secret_file = os.path.abspath(secret_file)
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
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> LaunchedProcess:
        """Start ``argv`` as the process ``name``, output appended to its log file.

        ``env`` holds variables set for this process on top of the launcher's;
        ``cwd`` is its current directory (default: the launcher's).
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
                cwd=cwd,
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
        runtime_env: Mapping[str, Any] | None = None,
    ) -> LaunchedProcess:
        """Start the replica process; with ``gpu_ids`` it sees only those GPUs.

        ``runtime_env`` (see :mod:`trioserve.core.runtime_env`) is prepared
        first, cancellably, its output in the replica's log file: a
        pip environment's interpreter runs the replica, the working dir is its
        current directory and first ``sys.path`` entry, ``env_vars`` are set.
        A runtime env that cannot be prepared raises ``RuntimeEnvError``.
        """
        name = f"replica-{replica}"
        env = self.gpu_env(gpu_ids)
        python = self.python
        cwd = None
        if runtime_env:
            prepared = await self._prepare_runtime_env(name, runtime_env)
            user = dict(prepared.env_vars)
            pythonpath = runtime_env_mod.child_pythonpath(
                self.env.get("PYTHONPATH"), prepared, user.pop("PYTHONPATH", None)
            )
            env = {**user, **env}
            if pythonpath is not None:
                env["PYTHONPATH"] = pythonpath
            python = prepared.python or python
            cwd = prepared.working_dir
        return await self.start(
            name,
            [
                python,
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
            env=env,
            cwd=cwd,
        )

    async def _prepare_runtime_env(
        self, name: str, runtime_env: Mapping[str, Any]
    ) -> runtime_env_mod.PreparedEnv:
        # On the event loop, cancellably: a shutdown during a pip build kills pip.
        with open(self.log_file(name), "a") as log:
            try:
                return await runtime_env_mod.prepare_async(runtime_env, python=self.python, log=log)
            except runtime_env_mod.RuntimeEnvError as exc:
                first = str(exc).splitlines()[0] if str(exc) else "failed"
                log.write(f"ERROR runtime_env -- {first} (the replica does not start)\n")
                raise

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

    def find_processes(self) -> list[FoundProcess]:
        """The replica and proxy processes started with this launcher's secret file."""
        return find_instance_processes(self.secret_file)

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
