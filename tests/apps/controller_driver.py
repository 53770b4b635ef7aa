"""A process that runs a controller with two Echo replicas, for tests that kill it.

``python -m tests.apps.controller_driver RUN_DIR embedded|daemon`` prints one
JSON line with its pid and its replicas' pids once they run, then serves
until it is killed.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

from trioserve.core import rpc
from trioserve.core.config import DeploymentConfig
from trioserve.core.controller import Controller
from trioserve.core.events import DeploymentSpec
from trioserve.core.launcher import LocalProcessLauncher
from trioserve.core.state import ReplicaState
from trioserve.store import EventLog


async def main(run_dir: str, mode: str) -> None:
    secret_file = os.path.join(run_dir, "secret")
    secret = rpc.load_secret(secret_file)
    log = EventLog.open(os.path.join(run_dir, "events.db"))
    launcher = LocalProcessLauncher(run_dir, secret_file, embedded=mode == "embedded")
    controller = Controller(log, launcher, secret)
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        spec = DeploymentSpec(
            "Echo", "v1", DeploymentConfig(num_replicas=2), source="import:tests.apps.basic:Echo"
        )
        await controller.deploy("app", [spec])
        await controller.wait_for(
            lambda s: sum(r.state is ReplicaState.RUNNING for r in s.replicas.values()) == 2
        )
        pids = [r.pid for r in controller.state.replicas.values()]
        print(json.dumps({"driver": os.getpid(), "replicas": pids}), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], backend="trio")
