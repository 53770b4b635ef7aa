"""The benchmark suite's runner produces its table (a smoke test: no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_suite_prints_a_table() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRIOSERVE_BENCH_RAY_PYTHON", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "cold_start", "peer_ray"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("| Group | Figure | trioserve |")
    assert any(line.startswith("| Cold start |") for line in lines)
    assert any("skipped" in line for line in lines if line.startswith("| Peer: Ray Serve |"))
