"""DeploymentHandle, DeploymentResponse and DeploymentResponseGenerator with real replicas.

Handles are used the three ways users use them: from synchronous code (the
background loop), from a trio program and from an asyncio program (each
routing on its own loop), and inside replicas (composition).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import time
from pathlib import Path

import anyio
import pytest

import trioserve as serve
from tests.apps import concepts
from trioserve.exceptions import (
    BackPressureError,
    ReplicaDiedError,
    RequestCancelledError,
)
from trioserve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

DEADLINE_S = 60.0


def wait_until(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def marker(base: Path, name: str) -> Path:
    """The marker file ``name`` of a ``concepts.Gated.hold(base)`` call."""
    return base.with_name(f"{base.name}.{name}")


def wait_for_marker(base: Path, name: str, what: str) -> None:
    wait_until(marker(base, name).exists, what)


async def await_marker(base: Path, name: str, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not marker(base, name).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


@pytest.fixture
def worker(serve_instance) -> DeploymentHandle:
    return serve.run(concepts.Worker.options(num_replicas=2).bind(), name="w")


@pytest.fixture
def gated(serve_instance) -> DeploymentHandle:
    return serve.run(concepts.Gated.bind(), name="g")


def test_remote_returns_a_response_and_result_waits(worker):
    response = worker.remote({"x": [1, 2]})
    assert isinstance(response, DeploymentResponse)
    assert response.result(timeout_s=DEADLINE_S) == {"x": [1, 2]}
    assert worker.add.remote(2, b=3).result() == 5


def test_method_attributes_and_options(worker):
    assert worker.options(method_name="add").remote(1, 1).result() == 2
    assert worker.add.remote(4, 4).result() == 8
    assert worker.options(multiplexed_model_id="m7").whoami.remote().result()["model"] == "m7"
    with pytest.raises(TypeError):
        worker.options(method="add")  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="no method 'missing'"):
        worker.missing.remote().result()


def test_user_exceptions_arrive_with_their_type(worker):
    with pytest.raises(ValueError, match="bad input"):
        worker.fail.remote("bad input").result()


def test_result_timeout_raises_timeout_error(gated, tmp_path: Path):
    call = tmp_path / "call"
    response = gated.hold.remote(str(call), "done")  # held until the gate opens
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.1)
    # Only the wait timed out: the request goes on once let through.
    marker(call, "gate").touch()
    assert response.result(timeout_s=DEADLINE_S) == "done"


def test_requests_are_sent_eagerly_without_waiting_for_results(worker, tmp_path: Path):
    flag = tmp_path / "done"
    worker.sleep_then_flag.remote(0.0, str(flag))  # never awaited
    wait_until(flag.exists, "the request to run without anyone fetching its result")


def test_cancel_stops_the_call_in_the_replica(gated, tmp_path: Path):
    call = tmp_path / "call"
    response = gated.hold.remote(str(call))
    wait_for_marker(call, "started", "the call to run in the replica")
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=DEADLINE_S)
    wait_for_marker(call, "cancelled", "the call to be cancelled in the replica")
    assert not marker(call, "finished").exists()


def test_responses_passed_as_arguments_are_resolved_first(worker):
    first = worker.add.remote(1, 2)
    second = worker.add.remote(first, 10)
    assert second.result() == 13


def test_calls_spread_over_replicas(worker):
    pids = {worker.pid.remote().result() for _ in range(40)}
    assert len(pids) == 2


def test_streaming_with_for(worker):
    gen = worker.options(stream=True).count.remote(5)
    assert isinstance(gen, DeploymentResponseGenerator)
    assert list(gen) == [0, 1, 2, 3, 4]


def test_cancelling_or_dropping_a_stream_stops_the_generator_in_the_replica(worker, tmp_path):
    cancelled, dropped = tmp_path / "cancelled", tmp_path / "dropped"
    gen = worker.options(stream=True).endless.remote(str(cancelled))
    assert [next(gen), next(gen)] == [0, 1]
    gen.cancel()
    wait_until(cancelled.exists, "the cancelled generator's finally block")
    gen = worker.options(stream=True).endless.remote(str(dropped))
    assert next(gen) == 0
    del gen
    wait_until(dropped.exists, "the dropped generator's finally block")


def test_a_replica_dying_mid_request_is_a_clear_error_and_the_next_call_works(serve_instance):
    handle = serve.run(concepts.Worker.options(num_replicas=2).bind(), name="d")
    with pytest.raises(ReplicaDiedError, match="died while handling the request"):
        handle.die.remote().result(timeout_s=DEADLINE_S)
    assert handle.add.remote(1, 1).result(timeout_s=DEADLINE_S) == 2


def test_max_queued_requests_raises_back_pressure(serve_instance, tmp_path: Path):
    handle = serve.run(
        concepts.Gated.options(max_ongoing_requests=1, max_queued_requests=1).bind(), name="bp"
    )
    handle.add.remote(0, 0).result()  # the router knows the replica set
    busy_call = tmp_path / "busy"
    busy = handle.hold.remote(str(busy_call), "first")
    wait_for_marker(busy_call, "started", "the first request to occupy the replica")
    # The replica is full: of the next two requests one waits in the queue and
    # the other finds the queue full. Which one is the scheduler's choice, so
    # the refusal is whichever finishes first (the queued one cannot finish
    # before the gate opens).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            futures = {  # each waits longer than the wait below: its timeout is no outcome
                pool.submit(handle.remote(value).result, timeout_s=2 * DEADLINE_S): value
                for value in ("second", "third")
            }
            done, waiting = concurrent.futures.wait(
                futures, timeout=DEADLINE_S, return_when=concurrent.futures.FIRST_COMPLETED
            )
            assert len(done) == 1, f"expected one request refused and one queued, got {done}"
            [refused] = done
            with pytest.raises(BackPressureError, match="max_queued_requests=1"):
                refused.result()
        finally:
            marker(busy_call, "gate").touch()  # on failure too: let the queued one end
        assert busy.result(timeout_s=DEADLINE_S) == "first"
        [queued] = waiting
        assert queued.result(timeout=DEADLINE_S) == futures[queued]


def test_sync_methods_in_replicas_can_block_on_results(serve_instance):
    handle = serve.run(concepts.SyncCaller.bind(concepts.double.bind()), name="sc")
    assert handle.remote(21).result() == 42
    message = handle.result_in_loop.remote(1).result()
    assert "should not be called from within an event loop" in message


def test_result_inside_an_event_loop_is_refused(worker):
    async def main():
        response = worker.add.remote(1, 2)
        with pytest.raises(RuntimeError, match="Use `await response` instead"):
            response.result()
        return await response

    assert asyncio.run(main()) == 3


def test_await_on_asyncio(worker):
    async def main():
        results = await asyncio.gather(*[worker.add.remote(i, i) for i in range(20)])
        items = [i async for i in worker.options(stream=True).count.remote(3)]
        return results, items

    results, items = asyncio.run(main())
    assert results == [2 * i for i in range(20)]
    assert items == [0, 1, 2]


def test_await_on_trio(worker):
    import trio

    async def main():
        out = []

        async def one(i):
            out.append(await worker.add.remote(i, 1))

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
        items = [i async for i in worker.options(stream=True).count.remote(4)]
        return sorted(out), items

    assert trio.run(main) == (list(range(1, 11)), [0, 1, 2, 3])


def test_cancelling_the_awaiting_task_cancels_the_request(gated, tmp_path: Path):
    call = tmp_path / "call"

    async def main():
        async with anyio.create_task_group() as tg:

            async def wait_for_the_result():
                await gated.hold.remote(str(call))

            tg.start_soon(wait_for_the_result)
            await await_marker(call, "started", "the call to run in the replica")
            tg.cancel_scope.cancel()

    anyio.run(main, backend="asyncio")
    wait_for_marker(call, "cancelled", "the call to be cancelled in the replica")
    assert not marker(call, "finished").exists()


@pytest.mark.parametrize("library", ["asyncio", "trio"])
# The routers' tasks that the ending loop cancels before they ever ran warn so.
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_request_still_pending_when_its_loop_ends_is_cancelled(gated, tmp_path, library):
    # The program returns right after .remote(): the loop ends before the
    # request's task (or even the handle's routers) ever ran.
    async def main():
        return gated.hold.remote(str(tmp_path / "call"))

    response = anyio.run(main, backend=library)
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=DEADLINE_S)


def test_handle_pickles_by_name():
    handle = DeploymentHandle("Model", "app").options(method_name="predict", stream=True)
    again = pickle.loads(pickle.dumps(handle))
    assert again == handle
    assert (again.deployment_name, again.app_name) == ("Model", "app")
    assert "Model" in repr(again)


def test_remote_without_an_instance_is_a_clear_error(serve_home):
    with pytest.raises(serve.RayServeException, match="no running trioserve instance"):
        DeploymentHandle("Model", "app").remote()
