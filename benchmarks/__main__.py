"""``python -m benchmarks``: the whole suite, one Markdown table on stdout.

Each benchmark (``--only`` picks some) runs in a subprocess of its own
(``python -m benchmarks --run-one NAME``), which writes its figures as
records (:mod:`benchmarks.records`) to a JSON file; the runner collects them
and prints one table, headed by the date and the machine. Progress goes to
stderr. ``--quick`` shortens every benchmark (a smoke test: the figures are
noisy); ``--json FILE`` also writes the records.

Benchmarks: ``http`` (:mod:`benchmarks.http`), ``handles``, ``streaming``,
``cold_start``, ``memory``, ``controller`` and ``peer_ray``
(:mod:`benchmarks.peer`, Ray Serve when ``TRIOSERVE_BENCH_RAY_PYTHON`` is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.records import Record, load, markdown, save

__all__ = ["SUITES", "machine", "main"]

ROOT = Path(__file__).resolve().parent.parent

SUITES = {
    "http": "benchmarks.http",
    "handles": "benchmarks.handles",
    "streaming": "benchmarks.streaming",
    "cold_start": "benchmarks.cold_start",
    "memory": "benchmarks.memory",
    "controller": "benchmarks.controller",
    "peer_ray": "benchmarks.peer",
}
"""Each name's module; its ``records(quick)`` gives the figures. In this order."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return math.nan


def machine() -> dict[str, str]:
    """What the figures were measured on (no host names, no paths)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "memory": f"{_memory_gb():.0f} GB RAM",
        "python": f"Python {platform.python_version()}",
        "os": f"{platform.system()} {platform.machine()}",
    }


def _run_one(name: str, quick: bool, out: str) -> None:
    module = importlib.import_module(SUITES[name])
    save(module.records(quick), out)


def _run(name: str, quick: bool) -> tuple[list[Record], float]:
    """Run benchmark ``name`` in a subprocess; its records, and the seconds it took."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-suite-") as tmp:
        out = os.path.join(tmp, "records.json")
        argv = [sys.executable, "-m", "benchmarks", "--run-one", name, "--out", out]
        proc = subprocess.run(
            argv + (["--quick"] if quick else []), cwd=ROOT, stdout=sys.stderr, check=False
        )
        seconds = time.perf_counter() - started
        if proc.returncode != 0 or not os.path.exists(out):
            failed = Record(name, f"FAILED (exit code {proc.returncode}, see stderr)", math.nan, "")
            return [failed], seconds
        return load(out), seconds


def _fill_peer(records: list[Record]) -> None:
    """Put trioserve's figure beside each peer figure, with the ratio trioserve / peer."""
    ours = {r.key: r for r in records if r.key and not r.key.startswith("peer:")}
    for r in records:
        if r.key.startswith("peer:"):
            mine = ours.get(r.key.removeprefix("peer:"))
            if mine is not None:
                r.value = mine.value
                if r.baseline_value:
                    r.ratio = r.value / r.baseline_value


def report(records: list[Record], info: dict[str, str]) -> str:
    head = " · ".join(
        [info["date"], info["cpu"], info["memory"], info["python"], info["os"], info["run"]]
    )
    notes = [
        "Ratio = trioserve / baseline (above 1: more per second, or a longer time, more CPU "
        "time or more memory, than the baseline). HTTP load: one client process doing HTTP/1.1 "
        "keep-alive, one request at a time per connection, on the same machine.",
    ]
    missed = [r for r in records if r.met is False]
    if missed:
        notes.append("Targets missed: " + "; ".join(r.name for r in missed) + ".")
    return "\n".join([head, "", markdown(records), "", *notes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every benchmark; print one Markdown table (progress on stderr).",
    )
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--only", nargs="+", choices=sorted(SUITES), metavar="NAME", help="these only")
    p.add_argument("--json", metavar="FILE", help="also write the records and machine as JSON")
    p.add_argument("--run-one", choices=sorted(SUITES), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        _run_one(args.run_one, args.quick, args.out)
        return 0
    names = [n for n in SUITES if not args.only or n in args.only]
    info = machine()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    records: list[Record] = []
    for name in names:
        _say(f"== {name} ==")
        got, seconds = _run(name, args.quick)
        _say(f"== {name}: {len(got)} figures in {seconds:.0f} s")
        records.extend(got)
    _fill_peer(records)
    mode = "quick run (smoke test)" if args.quick else "full run"
    info["run"] = (
        f"{mode}, {time.perf_counter() - started:.0f} s, load average {load_before:.2f} before "
        f"and {os.getloadavg()[0]:.2f} after"
    )
    print(report(records, info))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "records": [dataclasses.asdict(r) for r in records]}, indent=1
            )
            + "\n"
        )
    return 1 if any(r.name.startswith("FAILED") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
