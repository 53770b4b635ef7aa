"""LocalProcessLauncher with real processes: logs, exit codes, sessions, lifelines.

The children are sleepers (:mod:`tests.apps.sleeper`), which watch their
lifeline with the replica's own code. The orphan tests run a driver process
(:mod:`tests.apps.launch_driver`) that owns the launcher, SIGKILL it, and look
at what becomes of its children. Every process a test starts is killed by pid
at the end of the test, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from trioserve.core import launcher as launcher_module
from trioserve.core.launcher import (
    LaunchedProcess,
    LocalProcessLauncher,
    describe_exit,
    detect_resources,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="inspects processes through /proc"
)

DEADLINE_S = 30.0
ROOT = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-m", "tests.apps.sleeper"]
LIFELINE_MESSAGE = "the process that started this replica is gone"


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from ``/proc``, or None when there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


class Pid:
    """A process known by pid (not necessarily our child), safe against pid reuse."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        stat = _stat(pid)
        self.start_time = None if stat is None else stat[1]

    def alive(self) -> bool:
        """Running: exists, is this very process, and is not a zombie."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        stat = _stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_time

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Tracked:
    """Processes to SIGKILL at the end of the test, if they are still there."""

    def __init__(self) -> None:
        self.pids: list[Pid] = []
        self.drivers: list[anyio.abc.Process] = []


@pytest.fixture
async def tracked() -> AsyncIterator[Tracked]:
    state = Tracked()
    try:
        yield state
    finally:
        for p in state.pids:
            p.kill()
        with anyio.move_on_after(DEADLINE_S):
            for driver in state.drivers:
                await driver.aclose()


class Launched:
    """Launchers made in the test process and every child they started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.launchers: list[LocalProcessLauncher] = []
        self.children: list[LaunchedProcess] = []

    def launcher(self, *, embedded: bool = True) -> LocalProcessLauncher:
        launcher = LocalProcessLauncher(
            self.tmp_path / "run", self.tmp_path / "secret", embedded=embedded
        )
        self.launchers.append(launcher)
        return launcher

    async def sleeper(
        self, launcher: LocalProcessLauncher, name: str, *args: str
    ) -> LaunchedProcess:
        child = await launcher.start(name, [*SLEEPER, *args])
        self.children.append(child)
        return child


@pytest.fixture
async def launched(tmp_path: Path) -> AsyncIterator[Launched]:
    state = Launched(tmp_path)
    try:
        yield state
    finally:
        for child in state.children:
            child.kill()
        with anyio.move_on_after(DEADLINE_S):
            for child in state.children:
                await child.wait()
        for launcher in state.launchers:
            launcher.close()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        with anyio.fail_after(DEADLINE_S):
            while not predicate():
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within {DEADLINE_S} s: {what}")


def read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def wait_ready(launcher: LocalProcessLauncher, name: str, pid: int) -> None:
    log = launcher.log_file(name)
    await wait_until(lambda: f"sleeper {pid}: ready" in read(log), f"{name} is ready")


# --------------------------------------------------------------------------- in this process


async def test_each_process_logs_to_its_own_file(launched: Launched, tmp_path: Path) -> None:
    launcher = launched.launcher()
    a = await launched.sleeper(launcher, "replica-app#A#1", "--say", "hello from a")
    b = await launched.sleeper(launcher, "replica-app#B#2", "--say", "hello from b")
    await wait_ready(launcher, "replica-app#A#1", a.pid)
    await wait_ready(launcher, "replica-app#B#2", b.pid)

    log_a, log_b = launcher.log_file("replica-app#A#1"), launcher.log_file("replica-app#B#2")
    assert log_a.parent == tmp_path / "run" / "logs"
    assert log_a != log_b
    # stdout and stderr both go to the process's own file.
    assert f"sleeper {a.pid}: hello from a" in read(log_a)
    assert f"sleeper {a.pid}: on stderr: hello from a" in read(log_a)
    assert "hello from b" not in read(log_a)
    assert f"sleeper {b.pid}: hello from b" in read(log_b)
    assert "hello from a" not in read(log_b)

    # A process started again under the same name appends to the same file.
    a.terminate()
    with anyio.fail_after(DEADLINE_S):
        await a.wait()
    again = await launched.sleeper(launcher, "replica-app#A#1", "--say", "second run")
    await wait_ready(launcher, "replica-app#A#1", again.pid)
    text = read(log_a)
    assert text.index("hello from a") < text.index(f"sleeper {again.pid}: second run")


async def test_terminate_then_wait_gives_the_exit_code(launched: Launched) -> None:
    launcher = launched.launcher()
    child = await launched.sleeper(launcher, "sleeper", "--term-code", "3")
    await wait_ready(launcher, "sleeper", child.pid)

    child.terminate()
    with anyio.fail_after(DEADLINE_S):
        code = await child.wait()

    assert code == 3
    assert describe_exit(code) == "exited with code 3"
    assert "SIGTERM, exiting with code 3" in read(launcher.log_file("sleeper"))
    # Stopping a process that has exited already is harmless.
    child.terminate()
    child.kill()
    assert await child.wait() == 3


async def test_kill_gives_minus_nine(launched: Launched) -> None:
    launcher = launched.launcher()
    child = await launched.sleeper(launcher, "sleeper")
    await wait_ready(launcher, "sleeper", child.pid)

    child.kill()
    with anyio.fail_after(DEADLINE_S):
        code = await child.wait()

    assert code == -9
    assert describe_exit(code) == "killed by signal 9 (SIGKILL)"
    child.kill()
    child.terminate()


def test_describe_exit() -> None:
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(-15) == "killed by signal 15 (SIGTERM)"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(None) == "exited"
    assert describe_exit(-1000) == "killed by signal 1000 (unknown)"


async def test_children_run_in_their_own_session(launched: Launched) -> None:
    launcher = launched.launcher()
    child = await launched.sleeper(launcher, "sleeper")
    await wait_ready(launcher, "sleeper", child.pid)

    assert os.getsid(child.pid) == child.pid
    assert os.getsid(child.pid) != os.getsid(0)
    assert os.getpgid(child.pid) != os.getpgid(0)


async def test_close_in_embedded_mode_stops_the_children(launched: Launched) -> None:
    launcher = launched.launcher(embedded=True)
    children = [await launched.sleeper(launcher, f"sleeper-{n}") for n in range(2)]
    for n, child in enumerate(children):
        await wait_ready(launcher, f"sleeper-{n}", child.pid)
        assert "lifeline fd " in read(launcher.log_file(f"sleeper-{n}"))

    launcher.close()

    with anyio.fail_after(DEADLINE_S):
        codes = [await child.wait() for child in children]
    # The lifeline's end made each child SIGTERM itself: a clean, explained exit.
    assert codes == [0, 0]
    for n in range(2):
        assert LIFELINE_MESSAGE in read(launcher.log_file(f"sleeper-{n}"))
    with pytest.raises(RuntimeError, match="the launcher is closed"):
        await launcher.start("late", SLEEPER)
    launcher.close()  # closing twice is harmless


async def test_daemon_mode_children_have_no_lifeline(launched: Launched, tmp_path: Path) -> None:
    launcher = launched.launcher(embedded=False)
    heartbeat = tmp_path / "heartbeat"
    child = await launched.sleeper(launcher, "sleeper", "--heartbeat", str(heartbeat))
    await wait_ready(launcher, "sleeper", child.pid)
    assert f"sleeper {child.pid}: lifeline none" in read(launcher.log_file("sleeper"))

    launcher.close()
    beat = int(read(heartbeat))
    await wait_until(lambda: int(read(heartbeat) or 0) > beat, "the child keeps running")

    child.terminate()
    with anyio.fail_after(DEADLINE_S):
        assert await child.wait() == 0
    # A daemon-mode launcher can start processes after close().
    late = await launched.sleeper(launcher, "late")
    await wait_ready(launcher, "late", late.pid)


# --------------------------------------------------------------------------- GPUs

RECORDER = """#!/bin/sh
# Stands in for the replica's python: records what the replica would see, then exits.
{{ printf '%s\\n' "${{CUDA_VISIBLE_DEVICES-unset}}"; printf '%s\\n' "$*"; }} > "{out}.tmp"
mv "{out}.tmp" "{out}"
"""


async def seen_by_replica(
    launched: Launched,
    tmp_path: Path,
    env: dict[str, str],
    **options: Any,
) -> tuple[str, str]:
    """Start a replica through ``start_replica``; what its process saw:
    ``(CUDA_VISIBLE_DEVICES or "unset", its arguments)``."""
    out = tmp_path / f"seen-{len(launched.children)}"
    python = tmp_path / f"python-{len(launched.children)}"
    python.write_text(RECORDER.format(out=out))
    python.chmod(0o755)
    launcher = LocalProcessLauncher(
        tmp_path / "run", tmp_path / "secret", python=str(python), env=env
    )
    launched.launchers.append(launcher)
    child = await launcher.start_replica("app#Model#1", "tcp://127.0.0.1:1", **options)
    launched.children.append(child)
    with anyio.fail_after(DEADLINE_S):
        assert await child.wait() == 0
    devices, argv = out.read_text().splitlines()
    return devices, argv


def no_gpu_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


async def test_a_replica_placed_on_gpu_1_sees_only_gpu_1(
    launched: Launched, tmp_path: Path
) -> None:
    devices, argv = await seen_by_replica(
        launched, tmp_path, no_gpu_env(), event_loop="trio", gpu_ids=(1,)
    )
    assert devices == "1"
    assert "-m trioserve.replica --controller tcp://127.0.0.1:1 --replica app#Model#1" in argv
    assert "--loop trio" in argv

    devices, _ = await seen_by_replica(launched, tmp_path, no_gpu_env(), gpu_ids=(0, 2))
    assert devices == "0,2"


async def test_a_replica_with_no_gpu_keeps_the_environment_as_it_is(
    launched: Launched, tmp_path: Path
) -> None:
    devices, argv = await seen_by_replica(launched, tmp_path, no_gpu_env())
    assert devices == "unset"
    assert argv.startswith("-m trioserve.replica --controller tcp://127.0.0.1:1 ")
    assert "--loop asyncio" in argv
    devices, _ = await seen_by_replica(launched, tmp_path, no_gpu_env(), gpu_ids=())
    assert devices == "unset"
    limited = {**no_gpu_env(), "CUDA_VISIBLE_DEVICES": "3"}
    devices, _ = await seen_by_replica(launched, tmp_path, limited, gpu_ids=())
    assert devices == "3"
    devices, _ = await seen_by_replica(launched, tmp_path, limited, gpu_ids=None)
    assert devices == "3"


async def test_gpu_ids_index_the_launchers_own_visible_devices(
    launched: Launched, tmp_path: Path
) -> None:
    limited = {**no_gpu_env(), "CUDA_VISIBLE_DEVICES": "4,6"}
    devices, _ = await seen_by_replica(launched, tmp_path, limited, gpu_ids=(1,))
    assert devices == "6"
    devices, _ = await seen_by_replica(launched, tmp_path, limited, gpu_ids=(0, 1))
    assert devices == "4,6"


def fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return str(bin_dir)


def test_detect_resources_counts_cpus_and_memory() -> None:
    found = detect_resources()

    assert found["CPU"] == os.cpu_count()
    assert found["memory"] > 0
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    assert found["memory"] == int(meminfo[1]) * 1024
    assert found["GPU"] >= 0
    assert set(found) == {"CPU", "GPU", "memory"}
    assert all(isinstance(v, float) for v in found.values())


@pytest.mark.parametrize(
    ("visible", "gpus"), [("0,1,2", 3), ("", 0), ("GPU-8f2e,GPU-11ab", 2), ("1,-1,2", 1)]
)
def test_detect_resources_honours_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, visible: str, gpus: int
) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "echo 'GPU 0: A'; echo 'GPU 1: B'"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    assert detect_resources()["GPU"] == gpus


@pytest.mark.parametrize(
    ("body", "gpus"),
    [
        (
            "echo 'GPU 0: NVIDIA A100 (UUID: GPU-1)'; echo '  MIG 1g.5gb Device 0: (UUID: MIG-1)'"
            "; echo 'GPU 1: NVIDIA A100 (UUID: GPU-2)'",
            2,
        ),
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", 0),
        ("exec sleep 30", 0),
    ],
    ids=["two-gpus", "fails", "hangs"],
)
def test_detect_resources_asks_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str, gpus: int
) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, body))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launcher_module, "GPU_DETECT_TIMEOUT_S", 0.5)

    assert detect_resources()["GPU"] == gpus


def test_detect_resources_without_nvidia_smi_finds_no_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert detect_resources()["GPU"] == 0


# --------------------------------------------------------------------------- orphans


async def start_driver(
    tmp_path: Path, mode: str, tracked: Tracked, backend: str = "trio"
) -> tuple[anyio.abc.Process, dict[str, Any], list[Pid]]:
    """Run the driver: its process, the JSON line it printed, and its children."""
    with open(tmp_path / "driver.err", "wb") as stderr:
        driver = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "tests.apps.launch_driver",
                str(tmp_path / "run"),
                str(tmp_path / "secret"),
                mode,
                backend,
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    tracked.drivers.append(driver)
    tracked.pids.append(Pid(driver.pid))
    assert driver.stdout is not None
    buffer = b""
    with anyio.move_on_after(DEADLINE_S):
        while b"\n" not in buffer:
            try:
                buffer += await driver.stdout.receive()
            except anyio.EndOfStream:
                break
    if b"\n" not in buffer:
        pytest.fail(f"the driver printed no pids; its stderr:\n{read(tmp_path / 'driver.err')}")
    info = json.loads(buffer.split(b"\n", 1)[0])
    children = [Pid(pid) for pid in info["children"]]
    tracked.pids.extend(children)
    return driver, info, children


def heartbeats(tmp_path: Path) -> list[int]:
    return [int(read(tmp_path / "run" / f"heartbeat.{n}") or 0) for n in range(2)]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
async def test_embedded_children_stop_when_the_driver_is_killed(
    tmp_path: Path, tracked: Tracked, backend: str
) -> None:
    driver, info, children = await start_driver(tmp_path, "embedded", tracked, backend)
    await wait_until(lambda: all(heartbeats(tmp_path)), "both children are running")
    for child in children:
        assert child.alive()
        assert os.getsid(child.pid) != info["sid"]

    driver.kill()
    with anyio.fail_after(DEADLINE_S):
        assert await driver.wait() == -signal.SIGKILL

    await wait_until(
        lambda: not any(child.alive() for child in children),
        "the children of a SIGKILLed embedded driver are gone",
    )
    for n in range(2):
        assert LIFELINE_MESSAGE in read(tmp_path / "run" / "logs" / f"sleeper-{n}.log")


async def test_daemon_children_outlive_the_driver(tmp_path: Path, tracked: Tracked) -> None:
    driver, info, children = await start_driver(tmp_path, "daemon", tracked)
    await wait_until(lambda: all(heartbeats(tmp_path)), "both children are running")
    for child in children:
        assert os.getsid(child.pid) == child.pid
        assert os.getsid(child.pid) != info["sid"]

    driver.kill()
    with anyio.fail_after(DEADLINE_S):
        assert await driver.wait() == -signal.SIGKILL

    # Both children keep beating after their driver is gone.
    after_driver = heartbeats(tmp_path)
    await wait_until(
        lambda: all(
            now > then for now, then in zip(heartbeats(tmp_path), after_driver, strict=True)
        ),
        "both children keep running after the driver died",
    )
    assert all(child.alive() for child in children)
    for n in range(2):
        assert LIFELINE_MESSAGE not in read(tmp_path / "run" / "logs" / f"sleeper-{n}.log")

    for child in children:
        child.kill()
    await wait_until(
        lambda: not any(child.alive() for child in children), "the children are gone once killed"
    )
