"""A driver for the launcher's tests: ``python -m tests.apps.launch_driver``.

Usage: ``python -m tests.apps.launch_driver RUN_DIR SECRET_FILE embedded|daemon [trio|asyncio]``

Creates a :class:`~trioserve.core.launcher.LocalProcessLauncher` on ``RUN_DIR``,
starts two sleepers (:mod:`tests.apps.sleeper`) named ``sleeper-0`` and
``sleeper-1``, each writing a heartbeat to ``RUN_DIR/heartbeat.<n>``, prints
``{"driver": pid, "sid": sid, "children": [pid, pid]}`` as one JSON line, and
then waits to be killed (at most :data:`SAFETY_LIMIT_S`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio

from trioserve.core.launcher import LocalProcessLauncher

SAFETY_LIMIT_S = 600.0


async def _main(run_dir: str, secret_file: str, mode: str) -> None:
    launcher = LocalProcessLauncher(run_dir, secret_file, embedded=mode == "embedded")
    children = []
    for n in range(2):
        heartbeat = Path(run_dir) / f"heartbeat.{n}"
        argv = [sys.executable, "-m", "tests.apps.sleeper", "--heartbeat", str(heartbeat)]
        process = await launcher.start(f"sleeper-{n}", [*argv, "--say", f"child {n}"])
        children.append(process.pid)
    line = {"driver": os.getpid(), "sid": os.getsid(0), "children": children}
    print(json.dumps(line), flush=True)
    await anyio.sleep(SAFETY_LIMIT_S)


def main() -> None:
    run_dir, secret_file, mode = sys.argv[1:4]
    if mode not in ("embedded", "daemon"):
        raise SystemExit(f"mode must be embedded or daemon, got {mode!r}")
    backend = sys.argv[4] if len(sys.argv) > 4 else "trio"
    anyio.run(_main, run_dir, secret_file, mode, backend=backend)


if __name__ == "__main__":
    main()
