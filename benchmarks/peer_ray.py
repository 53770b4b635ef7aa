"""Ray Serve under the suite's workloads: run by the python of an environment with Ray Serve.

NOT RUN BY CI, AND UNTESTED HERE (no Ray installed where it was written).
:mod:`benchmarks.peer` starts it as ``$TRIOSERVE_BENCH_RAY_PYTHON
benchmarks/peer_ray.py PORT [--quick]``. It imports nothing from trioserve
or from this repository (that environment need not have them). It starts
Ray Serve with its HTTP proxy on 127.0.0.1:PORT and the same deployments as
the suite (a no-op at ``/``, an ingress awaiting a model at ``/two``, a no-op
with ``max_ongoing_requests=1000`` for handles), measures the handle figures
in-process, prints one JSON line (``{"url": ..., "handles": {...}}``), and
then waits: the suite runs its HTTP load client against ``url`` and closes
this process's stdin when done, and Ray Serve is shut down.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

from ray import serve  # type: ignore[import-not-found]
from ray.serve.handle import DeploymentHandle  # type: ignore[import-not-found]


@serve.deployment(max_ongoing_requests=100)
class Noop:
    async def __call__(self) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=100)
class Model:
    async def __call__(self) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=100)
class Ingress:
    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model

    async def __call__(self) -> str:
        return await self.model.remote()  # type: ignore[no-any-return]


@serve.deployment(max_ongoing_requests=1000)
class NoOpHandle:
    async def __call__(self) -> None:
        return None


def _median_rate(fn: Any, n: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    port = int(sys.argv[1])
    quick = "--quick" in sys.argv
    sequential, in_flight, depth, runs = (500, 2000, 1000, 1) if quick else (2000, 5000, 1000, 3)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Noop.bind(), name="noop", route_prefix="/")
    serve.run(Ingress.bind(Model.bind()), name="two", route_prefix="/two")
    handle = serve.run(NoOpHandle.bind(), name="handle", route_prefix="/handle")
    front = serve.get_app_handle("two")

    def sync_sequential(h: Any, n: int) -> None:
        for _ in range(n):
            h.remote().result()

    def async_in_flight(n: int) -> None:
        async def go() -> None:
            limiter = asyncio.Semaphore(depth)

            async def one() -> None:
                async with limiter:
                    await handle.remote()

            await asyncio.gather(*(one() for _ in range(n)))

        asyncio.run(go())

    sync_sequential(handle, 200)
    sync_sequential(front, 200)
    async_in_flight(depth)
    handles = {
        "handle_sync_sequential": _median_rate(
            lambda: sync_sequential(handle, sequential), sequential, runs
        ),
        "handle_async_in_flight": _median_rate(lambda: async_in_flight(in_flight), in_flight, runs),
        "handle_two_hops_sequential": _median_rate(
            lambda: sync_sequential(front, sequential), sequential, runs
        ),
    }
    print(json.dumps({"url": f"http://127.0.0.1:{port}", "handles": handles}), flush=True)
    sys.stdin.read()
    serve.shutdown()


if __name__ == "__main__":
    main()
