"""The live controller with real replica processes, a real SQLite log and real RPC.

Each test starts a :class:`Controller` in the test's trio loop with a
:class:`LocalProcessLauncher`, deploys user code from ``tests/apps/basic.py``
and watches what happens through the state, the status, the event log and
calls to the replicas. After each test, no process it started may be left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import pid_alive
from trioserve.core import events as ev
from trioserve.core import rpc
from trioserve.core.config import DeploymentConfig
from trioserve.core.controller import Controller
from trioserve.core.events import DeploymentSpec
from trioserve.core.journal import verify
from trioserve.core.launcher import LocalProcessLauncher
from trioserve.core.state import ClusterState, ReplicaState
from trioserve.exceptions import ReplicaRejected
from trioserve.store import EventLog

S = ReplicaState
DEADLINE_S = 60.0


class Cluster:
    """A running controller, and what a test needs to drive it."""

    def __init__(self, controller: Controller, flags: Path, secret: bytes) -> None:
        self.controller = controller
        self.flags = flags
        self.secret = secret
        self.pids: set[int] = set()

    @property
    def state(self) -> ClusterState:
        return self.controller.state

    async def spec(
        self, name: str = "Echo", code_version: str = "v1", source: str = "", **config: Any
    ) -> DeploymentSpec:
        init = await self.controller.put_blob(pickle.dumps(((), {"flags": str(self.flags)})))
        return DeploymentSpec(
            name=name,
            code_version=code_version,
            config=DeploymentConfig(**config),
            source=source or f"import:tests.apps.basic:{name}",
            init_args=init if name == "Echo" else None,
        )

    async def wait(self, predicate: Callable[[ClusterState], bool]) -> None:
        await self.controller.wait_for(predicate, DEADLINE_S)
        self.note_pids()

    def note_pids(self) -> None:
        self.pids |= {r.pid for r in self.state.replicas.values() if r.pid}

    def running(self, app: str = "app", dep: str = "Echo") -> list[Any]:
        deployment = self.state.apps[app].deployments[dep]
        return [r for r in deployment.replicas.values() if r.state is S.RUNNING]

    def events(self) -> list[ev.Event]:
        return [stored.event for stored in self.controller.log.read()]

    async def call(self, address: str, method: str, *args: Any) -> Any:
        async with rpc.connect(address, self.secret) as conn:
            return await conn.call("handle_request", {"method": method}, args, {})


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    secret_file = tmp_path / "secret"
    secret = rpc.load_secret(secret_file)
    log = EventLog.open(tmp_path / "events.db")
    flags = tmp_path / "flags"
    flags.mkdir()
    launcher = LocalProcessLauncher(tmp_path, secret_file)
    controller = Controller(log, launcher, secret, tick_s=0.1, stop_timeout_s=5.0)
    c = Cluster(controller, flags, secret)
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        try:
            yield c
        finally:
            c.note_pids()
            tg.cancel_scope.cancel()
    # No process of the test is left, and the log is valid.
    with anyio.fail_after(DEADLINE_S):
        while alive := [p for p in c.pids if pid_alive(p)]:
            await anyio.sleep(0.05)
    assert not alive
    report = verify(log)
    assert report.ok, report.problem
    log.close()


def running_count(n: int, app: str = "app", dep: str = "Echo") -> Callable[[ClusterState], bool]:
    def check(state: ClusterState) -> bool:
        d = state.apps.get(app, None)
        if d is None or dep not in d.deployments:
            return False
        replicas = d.deployments[dep].replicas.values()
        return sum(r.state is S.RUNNING for r in replicas) == n and len(replicas) == n

    return check


async def test_three_replicas_reach_running_and_serve(cluster: Cluster) -> None:
    await cluster.controller.deploy("app", [await cluster.spec(num_replicas=3)])
    await cluster.wait(running_count(3))

    status = await cluster.controller.status()
    app = status["applications"]["app"]
    assert app["status"] == "RUNNING"
    assert app["deployments"]["Echo"]["status"] == "HEALTHY"
    assert app["deployments"]["Echo"]["replica_states"] == {"RUNNING": 3}

    pids = set()
    for replica in cluster.running():
        answer = await cluster.call(replica.address, "__call__", 7)
        assert answer["value"] == 7
        assert answer["pid"] == replica.pid
        pids.add(answer["pid"])
    assert len(pids) == 3
    assert os.getpid() not in pids


async def test_sigkilled_replica_is_replaced_without_waiting_for_a_health_check(
    cluster: Cluster,
) -> None:
    # Health checks every hour: only the process watcher can notice the death.
    await cluster.controller.deploy(
        "app", [await cluster.spec(num_replicas=3, health_check_period_s=3600)]
    )
    await cluster.wait(running_count(3))
    victim = cluster.running()[0]
    os.kill(victim.pid, signal.SIGKILL)

    await cluster.wait(
        lambda s: victim.id not in s.replicas and running_count(3)(s),
    )
    assert victim.pid not in {r.pid for r in cluster.running()}
    events = cluster.events()
    died = [e for e in events if isinstance(e, ev.ReplicaDied) and e.replica == victim.id]
    assert len(died) == 1
    assert died[0].exit_code == -signal.SIGKILL
    assert "killed by signal 9" in died[0].reason
    assert not any(isinstance(e, ev.HealthCheckFailed) for e in events)
    # The replacement was decided on the observation of the death.
    after = events[events.index(died[0]) + 1 :]
    assert any(isinstance(e, ev.ReplicaStarting) for e in after)


async def test_constructor_error_ends_in_deploy_failed_with_the_traceback(
    cluster: Cluster,
) -> None:
    await cluster.controller.deploy(
        "app", [await cluster.spec(name="FailingConstructor", num_replicas=1)]
    )
    await cluster.controller.wait_for(
        lambda s: (
            s.apps["app"].deployments["FailingConstructor"].failed
            and not s.apps["app"].deployments["FailingConstructor"].replicas
        ),
        DEADLINE_S,
    )
    status = await cluster.controller.status()
    app = status["applications"]["app"]
    assert app["status"] == "DEPLOY_FAILED"
    dep = app["deployments"]["FailingConstructor"]
    assert dep["status"] == "DEPLOY_FAILED"
    assert "ValueError: model weights not found" in dep["message"]
    assert "Traceback (most recent call last)" in dep["message"]
    failed = [e for e in cluster.events() if isinstance(e, ev.ReplicaStartFailed)]
    assert len(failed) == 3  # min(3 x 1 replica, 20) attempts
    exited = [e for e in cluster.events() if isinstance(e, ev.ReplicaExited)]
    assert len(exited) == 3


@pytest.mark.parametrize("fault", ["unhealthy", "hang"])
async def test_failing_health_check_gets_the_replica_replaced(cluster: Cluster, fault: str) -> None:
    await cluster.controller.deploy(
        "app",
        [await cluster.spec(num_replicas=2, health_check_period_s=0.2, health_check_timeout_s=1.0)],
    )
    await cluster.wait(running_count(2))
    sick, healthy = cluster.running()
    (cluster.flags / f"{fault}.{sick.pid}").touch()

    await cluster.wait(lambda s: sick.id not in s.replicas and running_count(2)(s))
    events = cluster.events()
    failures = [e for e in events if isinstance(e, ev.HealthCheckFailed) and e.replica == sick.id]
    assert [e.consecutive for e in failures] == [1, 2, 3]
    if fault == "hang":
        assert "timed out" in failures[0].error
    else:
        assert "the test made this replica unhealthy" in failures[0].error
    draining = [e for e in events if isinstance(e, ev.ReplicaDraining) and e.replica == sick.id]
    assert draining and "unhealthy" in draining[0].reason
    assert healthy.id in cluster.state.replicas  # the healthy one was left alone
    assert sick.pid not in {r.pid for r in cluster.running()}


async def test_scale_down_drains_and_in_flight_calls_finish(cluster: Cluster) -> None:
    spec = await cluster.spec(num_replicas=2, graceful_shutdown_timeout_s=60)
    await cluster.controller.deploy("app", [spec])
    await cluster.wait(running_count(2))
    replicas = {r.id: r for r in cluster.running()}

    results: dict[str, Any] = {}

    async def call(replica: Any) -> None:
        results[replica.id] = await cluster.call(replica.address, "wait_for_flag", "release")

    async with anyio.create_task_group() as tg:
        for replica in replicas.values():
            tg.start_soon(call, replica)
        with anyio.fail_after(DEADLINE_S):
            while len(list(cluster.flags.glob("release.started.*"))) < 2:
                await anyio.sleep(0.02)

        smaller = DeploymentSpec(
            name=spec.name,
            code_version=spec.code_version,
            config=DeploymentConfig(num_replicas=1, graceful_shutdown_timeout_s=60),
            source=spec.source,
            init_args=spec.init_args,
        )
        await cluster.controller.deploy("app", [smaller])
        await cluster.wait(lambda s: any(r.state is S.DRAINING for r in s.replicas.values()))
        (drained,) = [r for r in cluster.state.replicas.values() if r.state is S.DRAINING]
        async with rpc.connect(drained.address, cluster.secret) as conn:
            with anyio.fail_after(DEADLINE_S):
                while (await conn.call("stats"))["accepting"]:
                    await anyio.sleep(0.02)

        # A draining replica takes no new calls: callers go elsewhere.
        with pytest.raises(ReplicaRejected, match="draining"):
            await cluster.call(drained.address, "__call__", 1)

        (cluster.flags / "release").touch()

    # Both in-flight calls finished with their results.
    assert results == {rid: "release" for rid in replicas}
    await cluster.wait(running_count(1))
    assert drained.id not in cluster.state.replicas
    assert (cluster.flags / f"deleted.{drained.pid}").exists()  # __del__ ran
    kinds = [type(e).__name__ for e in cluster.events() if getattr(e, "replica", "") == drained.id]
    assert kinds[-3:] == ["ReplicaDraining", "ReplicaDrained", "ReplicaExited"]


async def test_config_only_change_reconfigures_in_place(cluster: Cluster) -> None:
    spec = await cluster.spec(num_replicas=1, user_config={"threshold": 1})
    await cluster.controller.deploy("app", [spec])
    await cluster.wait(running_count(1))
    (replica,) = cluster.running()
    assert await cluster.call(replica.address, "get_user_config") == {"threshold": 1}

    changed = DeploymentSpec(
        name=spec.name,
        code_version=spec.code_version,
        config=DeploymentConfig(num_replicas=1, user_config={"threshold": 2}),
        source=spec.source,
        init_args=spec.init_args,
    )
    await cluster.controller.deploy("app", [changed])
    with anyio.fail_after(DEADLINE_S):
        while await cluster.call(replica.address, "get_user_config") != {"threshold": 2}:
            await anyio.sleep(0.05)
    (same,) = cluster.running()
    assert same.pid == replica.pid  # the same process, reconfigured
    assert any(isinstance(e, ev.ReplicaReconfigured) for e in cluster.events())


async def test_replica_runs_asyncio_by_default_and_trio_by_choice(cluster: Cluster) -> None:
    await cluster.controller.deploy("a", [await cluster.spec(num_replicas=1)])
    await cluster.controller.deploy(
        "t", [await cluster.spec(num_replicas=1, event_loop="trio")], route_prefix="/t"
    )
    await cluster.wait(lambda s: running_count(1, "a")(s) and running_count(1, "t")(s))
    (on_asyncio,) = cluster.running("a")
    (on_trio,) = cluster.running("t")
    assert await cluster.call(on_asyncio.address, "aloop_name") == "asyncio"
    assert await cluster.call(on_trio.address, "aloop_name") == "trio"
    # Sync methods run in a worker thread, whatever the loop.
    for replica in (on_asyncio, on_trio):
        where = await cluster.call(replica.address, "blocking", 0)
        assert where["thread"] != where["main"]


async def test_long_poll_announces_replica_sets_and_routes(cluster: Cluster) -> None:
    controller = cluster.controller
    first = await controller.listen({"replicas/app/Echo": 0, "routes": 0}, timeout_s=0.01)
    assert first == {"routes": (first["routes"][0], {})}  # no app yet: no replica set

    await controller.deploy("app", [await cluster.spec(num_replicas=2)], route_prefix="/echo")
    await cluster.wait(running_count(2))
    got = await controller.listen({"replicas/app/Echo": 0, "routes": 0})
    version, value = got["replicas/app/Echo"]
    assert sorted(r["address"] for r in value["replicas"]) == sorted(
        r.address for r in cluster.running()
    )
    assert got["routes"][1] == {"/echo": {"app": "app", "ingress": "Echo"}}

    # A poller that holds the latest version waits until the set changes.
    async with rpc.connect(controller.address, cluster.secret) as conn:
        async with anyio.create_task_group() as tg:
            answer: dict[str, Any] = {}

            async def poll() -> None:
                answer.update(await conn.call("listen", {"replicas/app/Echo": version}, 60.0))

            tg.start_soon(poll)
            await controller.delete("app")
    newer, value = answer["replicas/app/Echo"]
    assert newer > version


async def test_restarted_controller_forgets_replicas_of_a_dead_one(tmp_path: Path) -> None:
    """A controller that finds replicas in the log it did not start records them lost."""
    secret_file = tmp_path / "secret"
    secret = rpc.load_secret(secret_file)
    path = tmp_path / "events.db"
    pids: set[int] = set()
    for round_ in range(2):
        log = EventLog.open(path)
        controller = Controller(log, LocalProcessLauncher(tmp_path, secret_file), secret)
        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            if round_ == 0:
                spec = DeploymentSpec(
                    "Echo",
                    "v1",
                    DeploymentConfig(num_replicas=2),
                    source="import:tests.apps.basic:Echo",
                )
                await controller.deploy("app", [spec])
            await controller.wait_for(running_count(2), DEADLINE_S)
            pids |= {r.pid for r in controller.state.replicas.values() if r.pid}
            tg.cancel_scope.cancel()
        log.close()
    assert len(pids) == 4  # the second controller started its own replicas
    with EventLog.open(path) as log:
        lost = [s.event for s in log.read() if isinstance(s.event, ev.ReplicaDied)]
        assert len(lost) == 2 and all("controller restarted" in e.reason for e in lost)
        assert verify(log).ok
    with anyio.fail_after(DEADLINE_S):
        while any(pid_alive(p) for p in pids):
            await anyio.sleep(0.05)


@pytest.mark.parametrize("mode", ["embedded", "daemon"])
async def test_replicas_die_with_an_embedded_controller_and_outlive_a_daemon(
    tmp_path: Path, mode: str
) -> None:
    """SIGKILL of the controller's process: embedded replicas follow it, daemon ones stay."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    driver = await anyio.open_process(
        [sys.executable, "-m", "tests.apps.controller_driver", str(tmp_path), mode],
        env=env,
        stderr=None,
    )
    replicas: list[int] = []
    try:
        assert driver.stdout is not None
        line = b""
        with anyio.fail_after(DEADLINE_S):
            while not line.endswith(b"\n"):
                line += await driver.stdout.receive(1)
        replicas = json.loads(line)["replicas"]
        assert len(replicas) == 2 and all(pid_alive(p) for p in replicas)
        driver.kill()
        await driver.wait()
        if mode == "embedded":
            with anyio.fail_after(DEADLINE_S):
                while any(pid_alive(p) for p in replicas):
                    await anyio.sleep(0.05)
        else:
            # Daemon replicas keep serving: each still answers a call after the
            # controller is gone.
            secret = rpc.load_secret(tmp_path / "secret", create=False)
            with EventLog.open(tmp_path / "events.db") as log:
                running = [s.event for s in log.read() if isinstance(s.event, ev.ReplicaRunning)]
            for event in running:
                async with rpc.connect(event.address, secret) as conn:
                    answer = await conn.call("handle_request", {"method": "__call__"}, (1,), {})
                assert answer["pid"] == event.pid
            assert all(pid_alive(p) for p in replicas)
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        await driver.aclose()
        for pid in replicas:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(DEADLINE_S):
            while any(pid_alive(p) for p in replicas):
                await anyio.sleep(0.05)


async def test_deploy_config_makes_the_apps_those_of_the_file(cluster: Cluster) -> None:
    echo = (await cluster.spec()).to_dict()
    file = {"applications": [{"name": "a"}, {"name": "b"}]}
    apps = [
        {"name": "a", "route_prefix": "/a", "ingress": "Echo", "deployments": [echo]},
        {"name": "b", "route_prefix": "/b", "ingress": "Echo", "deployments": [echo]},
    ]
    outcome = await cluster.controller.deploy_config(file, apps)
    assert outcome == {"deployed": ["a", "b"], "unchanged": [], "deleted": []}
    await cluster.wait(lambda s: running_count(1, "a")(s) and running_count(1, "b")(s))
    assert cluster.state.deployed_config == file

    # The same file again records nothing at all.
    seq = cluster.controller.journal.seq
    again = await cluster.controller.deploy_config(file, apps)
    assert again == {"deployed": [], "unchanged": ["a", "b"], "deleted": []}
    assert cluster.controller.journal.seq == seq

    # Two applications on one route prefix: refused, and nothing is recorded.
    clash = [apps[0], {**apps[1], "route_prefix": "/a"}]
    with pytest.raises(ValueError, match="Prefix /a is being used"):
        await cluster.controller.deploy_config({"applications": []}, clash)
    assert cluster.controller.journal.seq == seq

    # A file without b deletes b and leaves a's replica alone.
    (kept,) = cluster.running("a")
    outcome = await cluster.controller.deploy_config({"applications": [{"name": "a"}]}, apps[:1])
    assert outcome == {"deployed": [], "unchanged": ["a"], "deleted": ["b"]}
    await cluster.wait(lambda s: "b" not in s.apps)
    assert [r.pid for r in cluster.running("a")] == [kept.pid]
