"""Handle call rates, each beside the bare RPC to the same replica in the same run.

Run ``python -m benchmarks.handles``. It starts an embedded instance with one
replica of a no-op deployment (and a two-deployment composition) and prints
a Markdown table of:

* **sync sequential** - ``handle.remote().result()`` calls/s from a plain
  synchronous driver (the request is routed on the background loop), beside
  sequential ``Connection.call("handle_request", ...)`` to the same replica
  from a trio loop: the RPC floor without routing, response objects or the
  thread hop.
* **asyncio, 1,000 in flight** (in the suite only, :func:`records`) - the same
  from an asyncio program.
* **trio, 1,000 in flight** - calls/s of 1,000 tasks awaiting
  ``handle.remote()`` at once in a trio program, beside 1,000 bare RPC calls
  in flight on one connection.
* **two hops, sync sequential** - an ingress deployment awaiting a model
  deployment, beside the one-hop sync figure.

Each figure is the median of several runs after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Callable

import anyio
import trio

import trioserve as serve
from benchmarks.records import Record
from benchmarks.table import Row, markdown
from simulations.scale import median_time
from trioserve.core import rpc
from trioserve.core.routing import current_instance
from trioserve.handle import DeploymentHandle

__all__ = ["main", "records"]


@serve.deployment(max_ongoing_requests=1000)
class NoOp:
    async def __call__(self) -> None:
        return None


@serve.deployment(max_ongoing_requests=1000)
class Front:
    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model

    async def __call__(self) -> None:
        return await self.model.remote()  # type: ignore[no-any-return]


def _replica_address(app: str, deployment: str) -> str:
    instance = current_instance()

    async def find() -> str:
        async with rpc.connect(instance.controller, instance.secret) as conn:
            status = await conn.call("status")
        replicas = status["applications"][app]["deployments"][deployment]["replicas"]
        return str(replicas[0]["address"])

    return trio.run(find)


def _sync_sequential(handle: DeploymentHandle, n: int) -> None:
    for _ in range(n):
        handle.remote().result()


def _bare_sequential(address: str, n: int) -> None:
    secret = current_instance().secret

    async def go() -> None:
        async with rpc.connect(address, secret) as conn:
            for _ in range(n):
                await conn.call("handle_request", {"method": "__call__"}, (), {})

    trio.run(go)


def _trio_in_flight(handle: DeploymentHandle, n: int, depth: int) -> None:
    async def go() -> None:
        limiter = trio.CapacityLimiter(depth)

        async def one() -> None:
            async with limiter:
                await handle.remote()

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    trio.run(go)


def _bare_in_flight(address: str, n: int, depth: int) -> None:
    secret = current_instance().secret

    async def go() -> None:
        limiter = anyio.CapacityLimiter(depth)
        async with rpc.connect(address, secret) as conn:

            async def one() -> None:
                async with limiter:
                    await conn.call("handle_request", {"method": "__call__"}, (), {})

            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)

    trio.run(go)


def _asyncio_in_flight(handle: DeploymentHandle, n: int, depth: int) -> None:
    async def go() -> None:
        limiter = asyncio.Semaphore(depth)

        async def one() -> None:
            async with limiter:
                await handle.remote()

        await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(go())


def records(quick: bool = False) -> list[Record]:
    """The suite's handle figures, each beside the bare RPC (or one hop) in the same run."""
    sequential, in_flight, depth, runs = (500, 2000, 1000, 1) if quick else (2000, 5000, 1000, 3)
    os.environ.setdefault("TRIOSERVE_HOME", tempfile.mkdtemp(prefix="trioserve-bench-"))
    try:
        handle = serve.run(NoOp.bind(), name="noop", route_prefix=None)
        front = serve.run(Front.bind(NoOp.bind()), name="two", route_prefix=None)
        address = _replica_address("noop", "NoOp")
        _sync_sequential(handle, 200)  # warm-up: connections, routers
        _bare_sequential(address, 200)
        _trio_in_flight(handle, depth, depth)
        _asyncio_in_flight(handle, depth, depth)
        _sync_sequential(front, 200)

        def rate(fn: Callable[[], None], n: int) -> float:
            seconds, _, _ = median_time(fn, runs)
            return n / seconds

        sync = rate(lambda: _sync_sequential(handle, sequential), sequential)
        bare = rate(lambda: _bare_sequential(address, sequential), sequential)
        trio_flight = rate(lambda: _trio_in_flight(handle, in_flight, depth), in_flight)
        aio_flight = rate(lambda: _asyncio_in_flight(handle, in_flight, depth), in_flight)
        bare_flight = rate(lambda: _bare_in_flight(address, in_flight, depth), in_flight)
        two = rate(lambda: _sync_sequential(front, sequential), sequential)
    finally:
        serve.shutdown()
    note = f"{in_flight:,} calls, median of {runs}"
    return [
        Record(
            "Handles",
            "sync driver, sequential `.remote().result()`",
            sync,
            "calls/s",
            "bare RPC call to the replica, sequential",
            bare,
            target="> 2,000 calls/s",
            met=sync > 2000,
            key="handle_sync_sequential",
        ),
        Record(
            "Handles",
            f"asyncio driver, {depth:,} in flight",
            aio_flight,
            "calls/s",
            f"bare RPC, {depth:,} in flight on one connection",
            bare_flight,
            target="> 5,000 calls/s",
            met=aio_flight > 5000,
            note=note,
            key="handle_async_in_flight",
        ),
        Record(
            "Handles",
            f"trio driver, {depth:,} in flight",
            trio_flight,
            "calls/s",
            f"bare RPC, {depth:,} in flight on one connection",
            bare_flight,
            target="> 5,000 calls/s",
            met=trio_flight > 5000,
            note=note,
        ),
        Record(
            "Handles",
            "two hops (ingress awaits model), sync sequential",
            two,
            "calls/s",
            "one hop, sync sequential",
            sync,
            key="handle_two_hops_sequential",
        ),
    ]


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} calls/s"


def run(sequential: int, in_flight: int, depth: int, runs: int) -> list[Row]:
    handle = serve.run(NoOp.bind(), name="noop", route_prefix=None)
    front = serve.run(Front.bind(NoOp.bind()), name="two", route_prefix=None)
    address = _replica_address("noop", "NoOp")
    _sync_sequential(handle, 200)  # warm-up: connections, routers
    _bare_sequential(address, 200)
    _trio_in_flight(handle, depth, depth)
    _sync_sequential(front, 200)

    sync_s, _, _ = median_time(lambda: _sync_sequential(handle, sequential), runs)
    bare_s, _, _ = median_time(lambda: _bare_sequential(address, sequential), runs)
    flight_s, _, _ = median_time(lambda: _trio_in_flight(handle, in_flight, depth), runs)
    bare_flight_s, _, _ = median_time(lambda: _bare_in_flight(address, in_flight, depth), runs)
    two_s, _, _ = median_time(lambda: _sync_sequential(front, sequential), runs)
    return [
        Row(
            "sync driver, sequential `.remote().result()`",
            _rate(sequential, sync_s),
            f"bare RPC call, sequential: {_rate(sequential, bare_s)}",
            f"{sync_s / bare_s:.2f}x",
            "> 2,000 calls/s",
        ),
        Row(
            f"trio driver, {depth:,} in flight",
            _rate(in_flight, flight_s),
            f"bare RPC, {depth:,} in flight: {_rate(in_flight, bare_flight_s)}",
            f"{flight_s / bare_flight_s:.2f}x",
            "> 5,000 calls/s",
        ),
        Row(
            "two hops (ingress awaits model), sync sequential",
            _rate(sequential, two_s),
            f"one hop, sync sequential: {_rate(sequential, sync_s)}",
            f"{two_s / sync_s:.2f}x",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handles", description=__doc__)
    p.add_argument("--sequential", type=int, default=2000)
    p.add_argument("--in-flight", type=int, default=5000)
    p.add_argument("--depth", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("TRIOSERVE_HOME", tempfile.mkdtemp(prefix="trioserve-bench-"))
    try:
        rows = run(args.sequential, args.in_flight, args.depth, args.runs)
    finally:
        serve.shutdown()
    print(f"## Handles ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
