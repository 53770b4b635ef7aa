"""``@serve.batch`` in real replicas: concurrent handle calls are batched.

Sixteen calls go out at once from a trio program; the replica's batched method
records the size of each batch it runs, and another method reports them. The
deployment's batches form by size only (a long ``batch_wait_timeout_s``), so
the sizes are exact whatever the timing. Both replica event loops are covered.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

import trioserve as serve
from tests.apps.batching import BatchedDoubler
from trioserve.handle import DeploymentHandle

DEADLINE_S = 60.0


def call_concurrently(handle: DeploymentHandle, n: int) -> dict[int, Any]:
    """``await handle.remote(i)`` for ``i < n``, all at once, from a trio program."""

    async def main() -> dict[int, Any]:
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await handle.remote(i)

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
        return results

    return trio.run(main)


def stream_concurrently(handle: DeploymentHandle, ns: list[int]) -> dict[int, list[Any]]:
    async def main() -> dict[int, list[Any]]:
        results: dict[int, list[Any]] = {}

        async def one(n: int) -> None:
            results[n] = [x async for x in handle.options(stream=True).count_to.remote(n)]

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for n in ns:
                    nursery.start_soon(one, n)
        return results

    return trio.run(main)


@pytest.mark.parametrize("event_loop", ["asyncio", "trio"])
def test_concurrent_calls_are_batched_in_the_replica(serve_instance, event_loop: str) -> None:
    handle = serve.run(
        BatchedDoubler.options(event_loop=event_loop, user_config={"max_batch_size": 4}).bind(),
        name=f"batching-{event_loop}",
        route_prefix=None,
    )
    assert handle.event_loop.remote().result(timeout_s=DEADLINE_S) == event_loop

    assert call_concurrently(handle, 16) == {i: 2 * i for i in range(16)}
    assert handle.batch_sizes.remote().result(timeout_s=DEADLINE_S) == [4, 4, 4, 4]

    assert stream_concurrently(handle, [1, 2, 3, 4]) == {
        1: [0],
        2: [0, 1],
        3: [0, 1, 2],
        4: [0, 1, 2, 3],
    }
    assert handle.batch_sizes.remote().result(timeout_s=DEADLINE_S) == [4]


def test_reconfigure_changes_the_batch_size_of_running_replicas(serve_instance) -> None:
    app = BatchedDoubler.options(user_config={"max_batch_size": 4})
    handle = serve.run(app.bind(), name="reconfigured", route_prefix=None)
    pid = handle.pid.remote().result(timeout_s=DEADLINE_S)
    assert call_concurrently(handle, 8) == {i: 2 * i for i in range(8)}
    assert handle.batch_sizes.remote().result(timeout_s=DEADLINE_S) == [4, 4]

    # Only user_config changes: the replica stays and its reconfigure() calls
    # set_max_batch_size on the batched method.
    serve.run(
        app.options(user_config={"max_batch_size": 8}).bind(),
        name="reconfigured",
        route_prefix=None,
    )
    # serve.run returns once the new config is decided; the replica applies it
    # a moment later.
    deadline = time.monotonic() + DEADLINE_S
    while handle.max_batch_size.remote().result(timeout_s=DEADLINE_S) != 8:
        assert time.monotonic() < deadline, "the replica never applied max_batch_size=8"
        time.sleep(0.02)
    assert handle.pid.remote().result(timeout_s=DEADLINE_S) == pid
    assert call_concurrently(handle, 16) == {i: 2 * i for i in range(16)}
    assert handle.batch_sizes.remote().result(timeout_s=DEADLINE_S) == [8, 8]
