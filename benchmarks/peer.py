"""The optional peer run: Ray Serve under the same HTTP and handle workloads, same run.

Set ``TRIOSERVE_BENCH_RAY_PYTHON`` to the python executable of an environment
with ``ray[serve]``; ``python -m benchmarks`` then runs
:mod:`benchmarks.peer_ray` with it (Ray Serve's HTTP proxy on a free port,
handle figures measured there), points the suite's HTTP load client at Ray
Serve's proxy (no-op c=32, c=1 p50/p99, two hops), and reports each figure
beside trioserve's from the same suite run (ratio = trioserve / Ray Serve).
Without the variable it reports one row saying it was skipped.

UNTESTED against a real Ray Serve: no Ray was installed where it was written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.cold_start import _free_port
from benchmarks.http import DURATION_S, QUICK_DURATION_S, WARMUP, Point, _sample
from benchmarks.records import Record

__all__ = ["ENV", "records"]

ENV = "TRIOSERVE_BENCH_RAY_PYTHON"
HERE = Path(__file__).resolve().parent

FIGURES = {
    "http_rps_c32": ("HTTP no-op, c=32", "req/s"),
    "http_p50_c1": ("HTTP no-op, c=1: p50 latency", "ms"),
    "http_p99_c1": ("HTTP no-op, c=1: p99 latency", "ms"),
    "http_two_hops_rps_c32": ("HTTP two hops, c=32", "req/s"),
    "handle_sync_sequential": ("handle, sync sequential", "calls/s"),
    "handle_async_in_flight": ("handle, asyncio driver, 1,000 in flight", "calls/s"),
    "handle_two_hops_sequential": ("handle, two hops, sync sequential", "calls/s"),
}


def records(quick: bool = False) -> list[Record]:
    python = os.environ.get(ENV)
    if not python:
        return [
            Record(
                "Peer: Ray Serve",
                f"skipped: set {ENV} to the python of an environment with ray[serve]",
                math.nan,
                "",
            )
        ]
    duration = QUICK_DURATION_S if quick else DURATION_S
    runs = 1 if quick else 3
    proc = subprocess.Popen(
        [python, str(HERE / "peer_ray.py"), str(_free_port())] + (["--quick"] if quick else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer_ray.py exited with {proc.wait()}")
        started = json.loads(line)
        url = started["url"]
        points = {
            "c32": Point("proxy", "asyncio", 32, name="Ray Serve"),
            "c1": Point("proxy", "asyncio", 1, name="Ray Serve"),
            "two32": Point("proxy", "asyncio", 32, name="Ray Serve two hops"),
        }
        for _ in range(runs):
            _sample(points["c32"], url, WARMUP, duration)
            _sample(points["c1"], url, WARMUP, duration)
            _sample(points["two32"], url + "/two", WARMUP, duration)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ray = {
        "http_rps_c32": points["c32"].rps,
        "http_p50_c1": points["c1"].p50_ms,
        "http_p99_c1": points["c1"].p99_ms,
        "http_two_hops_rps_c32": points["two32"].rps,
        **started["handles"],
    }
    print(f"  Ray Serve: {ray}", file=sys.stderr, flush=True)
    return [
        Record(
            "Peer: Ray Serve",
            name,
            math.nan,  # trioserve's figure from the same suite run, filled in by the runner
            unit,
            "Ray Serve",
            float(ray[key]),
            key="peer:" + key,
        )
        for key, (name, unit) in FIGURES.items()
    ]
