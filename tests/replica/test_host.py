"""ReplicaHost in-process: calls, admission, threads, reconfigure, streaming, drain, health.

The host is built directly and its RPC methods are awaited as coroutines, on
both event loops a replica can run (``anyio.run`` with each backend inside sync
tests). Calls are held in flight with files in a ``flags`` folder or with
thread events, never with sleeps.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
import sniffio

import trioserve.replica.host as host_module
from tests.apps.basic import Echo, plain_function
from trioserve.core.config import DeploymentConfig
from trioserve.exceptions import RayServeException, ReplicaRejected
from trioserve.replica import ReplicaHost, get_replica_context
from trioserve.replica.host import load_source

DEADLINE_S = 30.0
BACKENDS = ["asyncio", "trio"]


# --------------------------------------------------------------------------- helpers


class FlagEcho(Echo):
    """Echo whose ``wait_for_flag`` polls with anyio, so that it runs on trio too.

    (``Echo.wait_for_flag`` sleeps with ``asyncio.sleep``: asyncio only.)
    """

    async def wait_for_flag(self, name: str) -> str:
        assert self.flags is not None
        with anyio.fail_after(DEADLINE_S * 2):
            while not (self.flags / name).exists():
                await anyio.sleep(0.01)
        return name


class Blocker:
    """A sync method that blocks its worker thread until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.health_checks = 0
        self.del_calls = 0

    def block(self) -> int:
        self.entered.set()
        if not self.release.wait(DEADLINE_S * 2):
            raise TimeoutError("the test never released the blocked call")
        return threading.get_ident()

    async def ping(self) -> str:
        return "pong"

    def check_health(self) -> None:
        self.health_checks += 1

    def __del__(self) -> None:
        self.del_calls += 1


class AsyncInit:
    async def __init__(self, value: int) -> None:  # type: ignore[misc]
        await anyio.sleep(0)
        self.value = value
        self.loop = sniffio.current_async_library()

    async def __call__(self) -> dict[str, Any]:
        return {"value": self.value, "loop": self.loop}


class Generators:
    def __init__(self) -> None:
        self.closed = False

    def numbers(self, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                yield i * 10
        finally:
            self.closed = True

    def _secret(self) -> str:
        return "private"

    def whoami(self) -> str:
        return get_replica_context().replica_id


class NoReconfigure:
    async def __call__(self) -> str:
        return "ok"


class CountingEcho(FlagEcho):
    def __init__(self, flags: str | None = None) -> None:
        super().__init__(flags)
        self.reconfigure_calls: list[Any] = []
        self.del_calls = 0

    def reconfigure(self, user_config: Any) -> None:
        self.reconfigure_calls.append(user_config)
        super().reconfigure(user_config)

    def __del__(self) -> None:
        self.del_calls += 1
        super().__del__()


class Wrapper:
    """Looks like a ``Deployment``: wraps the user's code in ``func_or_class``."""

    def __init__(self, func_or_class: Any) -> None:
        self.func_or_class = func_or_class


WRAPPED = Wrapper(plain_function)


class Loop:
    """Runs an async test body on one event loop."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, body: Callable[[], Awaitable[Any]]) -> Any:
        return anyio.run(body, backend=self.backend)


@pytest.fixture(params=BACKENDS)
def run(request: pytest.FixtureRequest) -> Loop:
    return Loop(request.param)


@pytest.fixture(autouse=True)
def no_replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts outside any replica (construct sets a process-wide context)."""
    monkeypatch.setattr(host_module, "_context", None)


@pytest.fixture
def flags(tmp_path: Path) -> Path:
    path = tmp_path / "flags"
    path.mkdir()
    return path


def make_host(**config: Any) -> ReplicaHost:
    return ReplicaHost("r-1", "app", "Echo", DeploymentConfig(**config))


async def built(target: Any, *args: Any, config: dict[str, Any] | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    host = make_host(**(config or {}))
    await host.construct(target, args, kwargs)
    return host


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(DEADLINE_S):
        while not predicate():
            await anyio.sleep(0.01)
    assert predicate(), what


async def call(host: ReplicaHost, method: str, *args: Any, **kwargs: Any) -> Any:
    return await host.handle_request({"method": method}, args, kwargs)


async def stream(host: ReplicaHost, method: str, *args: Any) -> list[Any]:
    return [item async for item in host.handle_request_streaming({"method": method}, args, {})]


# --------------------------------------------------------------------------- calls


def test_call_and_named_method_return_values(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags), tag="v7")

        assert await host.handle_request({}, ("hi",)) == {
            "value": "hi",
            "pid": os.getpid(),
            "tag": "v7",
        }
        assert await call(host, "__call__", value=3) == {
            "value": 3,
            "pid": os.getpid(),
            "tag": "v7",
        }
        assert await call(host, "aloop_name") == run.backend
        assert host.stats() == {"replica": "r-1", "ongoing": 0, "accepting": True, "processed": 3}

    run(body)


def test_function_deployment_is_called_through_call(run: Loop) -> None:
    async def body() -> None:
        host = await built(plain_function)

        assert await call(host, "__call__", 41) == 42
        assert await host.handle_request({}, (), {"x": 1}) == 2
        with pytest.raises(AttributeError, match=r"is a function; it has no method 'predict'"):
            await call(host, "predict", 1)
        assert await host.check_health() == host.stats()

    run(body)


def test_unknown_and_private_methods_are_refused() -> None:
    async def body() -> None:
        host = await built(Generators)

        with pytest.raises(AttributeError, match=r"has no method 'missing'"):
            await call(host, "missing")
        # _secret exists, but private and dunder names are not callable from outside.
        for name in ("_secret", "_x", "__init__", "__del__"):
            with pytest.raises(AttributeError, match=rf"has no method '{name}'"):
                await call(host, name)
        assert host.stats()["ongoing"] == 0

    anyio.run(body)


# --------------------------------------------------------------------------- admission


def test_admission_rejects_beyond_max_ongoing_requests(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(FlagEcho, flags=str(flags), config={"max_ongoing_requests": 2})
        results: list[str] = []

        async def waiting() -> None:
            results.append(await call(host, "wait_for_flag", "go"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            tg.start_soon(waiting)
            await wait_until(lambda: host.stats()["ongoing"] == 2, "two calls in flight")

            with pytest.raises(ReplicaRejected, match=r"max_ongoing_requests=2"):
                await call(host, "__call__", 1)
            assert host.stats()["ongoing"] == 2
            assert results == []

            (flags / "go").touch()
        assert results == ["go", "go"]
        assert host.stats()["ongoing"] == 0
        assert host.stats()["processed"] == 2

        assert (await call(host, "__call__", 1))["value"] == 1
        assert host.stats()["processed"] == 3

    run(body)


# --------------------------------------------------------------------------- threads


def test_sync_method_runs_in_a_worker_thread(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags))

        ids = await call(host, "blocking", 0)

        assert ids["main"] == threading.main_thread().ident
        assert ids["thread"] != threading.get_ident()
        assert ids["thread"] != ids["main"]

    run(body)


def test_event_loop_stays_responsive_while_a_sync_method_blocks(run: Loop) -> None:
    async def body() -> None:
        host = await built(Blocker, config={"max_ongoing_requests": 3})
        blocker: Blocker = host.obj
        result: list[int] = []

        async def blocked() -> None:
            result.append(await call(host, "block"))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked)
                await wait_until(blocker.entered.is_set, "the sync call started")

                # The blocked worker thread does not hold up other calls.
                assert await call(host, "ping") == "pong"
                assert (await host.check_health())["ongoing"] == 1
                assert result == []
                assert host.stats()["ongoing"] == 1

                blocker.release.set()
        finally:
            blocker.release.set()
        assert result[0] != threading.get_ident()

    run(body)


def test_health_check_and_drain_are_not_stuck_behind_busy_sync_calls(run: Loop) -> None:
    """With every request slot taken by a blocked sync call, the user's sync
    ``check_health`` and ``__del__`` still run (they do not queue for the
    threads of requests), so a busy replica is not declared unhealthy and a
    drain that timed out still returns."""

    async def body() -> None:
        host = await built(
            Blocker, config={"max_ongoing_requests": 1, "graceful_shutdown_timeout_s": 0.2}
        )
        blocker: Blocker = host.obj
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, host, "block")
                await wait_until(blocker.entered.is_set, "the sync call started")

                with anyio.fail_after(DEADLINE_S):
                    assert (await host.check_health())["ongoing"] == 1
                assert blocker.health_checks == 1

                with anyio.fail_after(DEADLINE_S):
                    stats = await host.drain()
                assert stats["timed_out"] is True
                assert blocker.del_calls == 1

                blocker.release.set()
        finally:
            blocker.release.set()

    run(body)


def test_async_init_is_awaited(run: Loop) -> None:
    async def body() -> None:
        host = await built(AsyncInit, 5)

        assert isinstance(host.obj, AsyncInit)
        assert await call(host, "__call__") == {"value": 5, "loop": run.backend}

    run(body)


def test_sync_constructor_error_propagates(run: Loop) -> None:
    from tests.apps.basic import FailingConstructor

    async def body() -> None:
        host = make_host()
        with pytest.raises(ValueError, match="model weights not found"):
            await host.construct(FailingConstructor, (), {})

    run(body)


# --------------------------------------------------------------------------- reconfigure


def test_user_config_is_applied_at_construction(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags), config={"user_config": {"threshold": 0.5}})

        assert await call(host, "get_user_config") == {"threshold": 0.5}
        assert (flags / f"reconfigured.{os.getpid()}").read_text() == repr({"threshold": 0.5})

    run(body)


def test_user_config_without_reconfigure_is_a_clear_error() -> None:
    async def body() -> None:
        host = make_host(user_config={"a": 1})
        with pytest.raises(
            TypeError, match=r"has a user_config, so it must be a class that defines reconfigure"
        ):
            await host.construct(NoReconfigure, (), {})

    anyio.run(body)


def test_reconfigure_calls_user_reconfigure_only_when_user_config_changed(
    run: Loop, flags: Path
) -> None:
    async def body() -> None:
        config = DeploymentConfig(user_config={"v": 1})
        host = ReplicaHost("r-1", "app", "Echo", config)
        await host.construct(CountingEcho, (), {"flags": str(flags)})
        assert host.obj.reconfigure_calls == [{"v": 1}]

        await host.reconfigure(dataclasses.replace(config, user_config={"v": 2}).to_dict())
        assert host.obj.reconfigure_calls == [{"v": 1}, {"v": 2}]
        assert await call(host, "get_user_config") == {"v": 2}

        # Another in-place field changes; user_config does not: no user call.
        await host.reconfigure(
            dataclasses.replace(config, user_config={"v": 2}, health_check_period_s=3).to_dict()
        )
        assert host.obj.reconfigure_calls == [{"v": 1}, {"v": 2}]
        assert host.config.health_check_period_s == 3

    run(body)


def test_reconfigure_changes_the_admission_limit(run: Loop, flags: Path) -> None:
    async def body() -> None:
        config = DeploymentConfig(max_ongoing_requests=1)
        host = ReplicaHost("r-1", "app", "Echo", config)
        await host.construct(FlagEcho, (), {"flags": str(flags)})
        done: list[str] = []

        async def waiting(name: str) -> None:
            done.append(await call(host, "wait_for_flag", name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting, "a")
            await wait_until(lambda: host.stats()["ongoing"] == 1, "one call in flight")
            with pytest.raises(ReplicaRejected, match=r"max_ongoing_requests=1"):
                await call(host, "__call__")

            await host.reconfigure(dataclasses.replace(config, max_ongoing_requests=2).to_dict())
            tg.start_soon(waiting, "b")
            await wait_until(lambda: host.stats()["ongoing"] == 2, "two calls in flight")
            with pytest.raises(ReplicaRejected, match=r"max_ongoing_requests=2"):
                await call(host, "__call__")

            (flags / "a").touch()
            (flags / "b").touch()
        assert sorted(done) == ["a", "b"]

    run(body)


# --------------------------------------------------------------------------- streaming


def test_streaming_an_async_generator_method(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags))

        assert await stream(host, "count", 5) == [0, 1, 2, 3, 4]
        assert host.stats()["ongoing"] == 0

        # Counted as ongoing while the stream is open, released when closed early.
        agen = host.handle_request_streaming({"method": "count"}, (100,), {})
        assert await agen.__anext__() == 0
        assert host.stats()["ongoing"] == 1
        await agen.aclose()
        assert host.stats()["ongoing"] == 0

    run(body)


def test_streaming_a_sync_generator_method(run: Loop) -> None:
    async def body() -> None:
        host = await built(Generators)

        assert await stream(host, "numbers", 4) == [0, 10, 20, 30]
        assert host.obj.closed
        assert host.stats() == {"replica": "r-1", "ongoing": 0, "accepting": True, "processed": 1}

    run(body)


def test_generator_without_stream_and_stream_without_generator_are_errors(
    run: Loop, flags: Path
) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags))

        with pytest.raises(TypeError, match=r"returned a generator.*stream=True"):
            await call(host, "count", 3)
        with pytest.raises(TypeError, match=r"did not return a generator.*stream=True"):
            await stream(host, "__call__", 1)
        assert host.stats()["ongoing"] == 0

    run(body)


# --------------------------------------------------------------------------- drain


def test_drain_waits_for_calls_in_flight_then_deletes(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(CountingEcho, flags=str(flags))
        deleted = flags / f"deleted.{os.getpid()}"
        order: list[str] = []
        drained: list[dict[str, Any]] = []

        async def in_flight() -> None:
            result = await call(host, "wait_for_flag", "finish")
            order.append(f"call returned {result}")

        async def drain() -> None:
            drained.append(await host.drain())
            order.append("drain returned")

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await wait_until(lambda: host.stats()["ongoing"] == 1, "one call in flight")
            tg.start_soon(drain)
            await wait_until(lambda: not host.stats()["accepting"], "draining started")

            with pytest.raises(ReplicaRejected, match="draining"):
                await call(host, "__call__", 1)
            with pytest.raises(ReplicaRejected, match="draining"):
                await stream(host, "count", 1)
            assert order == []
            assert not deleted.exists()
            assert host.obj.del_calls == 0

            (flags / "finish").touch()

        assert order == ["call returned finish", "drain returned"]
        assert drained[0]["timed_out"] is False
        assert drained[0]["ongoing"] == 0
        assert drained[0]["accepting"] is False
        assert deleted.exists()
        assert host.obj.del_calls == 1

        # Draining again, or deleting again, does not call __del__ a second time.
        await host.drain()
        await host.delete()
        assert host.obj.del_calls == 1

    run(body)


def test_drain_times_out_with_a_call_that_never_finishes(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(FlagEcho, flags=str(flags), config={"graceful_shutdown_timeout_s": 0.2})
        results: list[str] = []

        async def stuck() -> None:
            results.append(await call(host, "wait_for_flag", "release"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await wait_until(lambda: host.stats()["ongoing"] == 1, "one call in flight")

            stats = await host.drain()

            assert stats["timed_out"] is True
            assert stats["ongoing"] == 1
            assert (flags / f"deleted.{os.getpid()}").exists()
            assert results == []
            (flags / "release").touch()
        assert results == ["release"]

    run(body)


def test_drain_of_an_idle_function_deployment(run: Loop) -> None:
    async def body() -> None:
        host = await built(plain_function)
        stats = await host.drain()
        assert stats["timed_out"] is False
        with pytest.raises(ReplicaRejected, match="draining"):
            await call(host, "__call__", 1)

    run(body)


# --------------------------------------------------------------------------- health


def test_check_health_returns_stats_and_raises_when_unhealthy(run: Loop, flags: Path) -> None:
    async def body() -> None:
        host = await built(Echo, flags=str(flags))

        assert await host.check_health() == {
            "replica": "r-1",
            "ongoing": 0,
            "accepting": True,
            "processed": 0,
        }

        unhealthy = flags / f"unhealthy.{os.getpid()}"
        unhealthy.touch()
        with pytest.raises(RuntimeError, match="the test made this replica unhealthy"):
            await host.check_health()

        unhealthy.unlink()
        assert (await host.check_health())["replica"] == "r-1"

    run(body)


# --------------------------------------------------------------------------- context


def test_replica_context(run: Loop) -> None:
    with pytest.raises(RayServeException, match="may only be called from within"):
        get_replica_context()

    async def body() -> None:
        host = ReplicaHost("app#Gen#abc", "app", "Gen", DeploymentConfig())
        await host.construct(Generators, (), {})

        context = get_replica_context()
        assert (context.app_name, context.deployment, context.replica_id) == (
            "app",
            "Gen",
            "app#Gen#abc",
        )
        assert context.replica_tag == "app#Gen#abc"
        assert context.servable_object is host.obj
        # User code sees it too, also from a worker thread.
        assert await call(host, "whoami") == "app#Gen#abc"

    run(body)


# --------------------------------------------------------------------------- load_source


def test_load_source() -> None:
    assert load_source("import:tests.apps.basic:Echo") is Echo
    assert load_source("import:tests.replica.test_host:WRAPPED") is plain_function

    def triple(x: int) -> int:
        return 3 * x

    loaded = load_source("blob:abc123", cloudpickle.dumps(triple))
    assert loaded(5) == 15

    with pytest.raises(ValueError, match="missing"):
        load_source("blob:abc123")
    with pytest.raises(ValueError, match="unknown deployment source 'http://x'"):
        load_source("http://x")


def test_construct_rejects_what_is_neither_class_nor_function() -> None:
    async def body() -> None:
        with pytest.raises(TypeError, match="must be a class or a function"):
            await make_host().construct(42, (), {})

    anyio.run(body)
