"""The replica process: ``python -m trioserve.replica --controller ADDR --replica ID ...``.

Started by a launcher, never by hand. In order, it:

1. serves its RPC methods (see :mod:`trioserve.replica.host`) on a port of
   127.0.0.1 (or a Unix socket);
2. asks the controller for its deployment (``replica_spec``), fetches the
   code and init-argument blobs, and constructs the user object;
3. reports ``replica_running(id, address, pid)``, or ``replica_start_failed(id,
   traceback)`` and exits with code 1 when the constructor raised;
4. reports its ongoing-request count to the controller every
   :data:`LOAD_REPORT_PERIOD_S` (reconnecting when the controller is away;
   the replica keeps serving meanwhile), with the ids of the models it holds
   once it uses ``@serve.multiplexed``: at once when they change (at most
   every :data:`MODEL_REPORT_GAP_S`);
5. on SIGTERM or SIGINT drains (unless already drained), unloads its
   multiplexed models and exits 0; when
   started with ``--lifeline-fd`` it also exits when the pipe's other end, held
   by the process that started it, closes: so in embedded mode no replica
   outlives its controller, even one killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import signal
import sys
import threading
import traceback
from typing import Any

import anyio

from trioserve.core import logs, rpc
from trioserve.core.config import DeploymentConfig
from trioserve.core.launcher import asyncio_backend_options, watch_lifeline
from trioserve.core.routing import InstanceAddress, set_current_instance
from trioserve.replica import multiplex
from trioserve.replica.host import ReplicaHost, current_request, load_source

__all__ = ["LOAD_REPORT_PERIOD_S", "MODEL_REPORT_GAP_S", "main"]

log = logging.getLogger("trioserve.replica")

LOAD_REPORT_PERIOD_S = float(os.environ.get("TRIOSERVE_LOAD_REPORT_PERIOD_S", "1.0"))
MODEL_REPORT_GAP_S = 0.1
"""The shortest time between two reports made because the model ids changed
(Ray Serve pushes them at most every 0.1 s too)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trioserve.replica")
    p.add_argument("--controller", required=True, help="the controller's RPC address")
    p.add_argument("--replica", required=True, help="this replica's id")
    p.add_argument("--secret-file", required=True, help="the instance secret")
    p.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--listen", default="tcp://127.0.0.1:0", help="where to serve RPC")
    p.add_argument("--lifeline-fd", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run a replica until it is told to stop; exits the process."""
    args = _parse(argv)
    app, deployment, _ = ["", "", *args.replica.rsplit("#", 2)][-3:]
    logs.setup(
        "replica",
        {"application": app, "deployment": deployment, "replica": args.replica},
        current_request,
        file_name=f"replica-{_file_name(args.replica)}.log",
    )
    if args.lifeline_fd is not None:
        threading.Thread(
            target=watch_lifeline, args=(args.lifeline_fd, "replica"), daemon=True
        ).start()
    code = 0
    try:
        if args.loop == "asyncio":
            code = anyio.run(
                _run, args, backend="asyncio", backend_options=asyncio_backend_options()
            )
        else:
            code = anyio.run(_run, args, backend="trio")
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        log.exception("the replica failed")
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running finalizers: the user's __del__ has been called
    # already, and must not run a second time at interpreter exit.
    os._exit(code)


async def _run(args: argparse.Namespace) -> int:
    secret = rpc.load_secret(args.secret_file, create=False)
    # Handles in this replica (model composition) talk to the same instance.
    set_current_instance(InstanceAddress(args.controller, secret))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_signals, stop)
        async with rpc.connect(args.controller, secret) as ctl:
            info = await ctl.call("replica_spec", args.replica)
            if info is None:
                log.error("the controller does not know this replica; exiting")
                tg.cancel_scope.cancel()
                return 1
            config = DeploymentConfig.from_dict(info["config"])
            _apply_logging_config(config)
            host = ReplicaHost(args.replica, info["app"], info["deployment"], config)
            host.task_group = tg
            server = rpc.Server(host.rpc_methods(), secret, name=f"replica {args.replica}")
            address = await tg.start(server.serve, args.listen)
            try:
                source = info["source"]
                blob = (
                    await ctl.call("get_blob", source[5:]) if source.startswith("blob:") else None
                )
                target = load_source(source, blob)
                init: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
                if info.get("init_args"):
                    init = pickle.loads(await ctl.call("get_blob", info["init_args"]))
                await host.construct(target, tuple(init[0]), dict(init[1]))
                await host.start_lifespan(tg)
            except Exception:
                error = traceback.format_exc()
                log.error("the constructor failed:\n%s", error)
                await ctl.call("replica_start_failed", args.replica, error)
                tg.cancel_scope.cancel()
                return 1
            await ctl.call("replica_running", args.replica, address, os.getpid())
            log.info("running at %s", address)
        tg.start_soon(_report_load, args.controller, secret, host)
        await stop.wait()
        await host.drain()  # at once if the controller had it drained already
        await multiplex.unload_all()
        log.info("stopped after %d request(s)", host.processed)
        tg.cancel_scope.cancel()
    return 0


def _apply_logging_config(config: DeploymentConfig) -> None:
    """Honour ``logging_config`` (level, encoding, access log, logs_dir: see
    :func:`trioserve.core.logs.apply_logging_config`)."""
    logs.apply_logging_config(config.logging_config)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()


async def _report_load(controller: str, secret: bytes, host: ReplicaHost) -> None:
    """Tell the controller the ongoing-request count, and the multiplexed model
    ids once there are any, reconnecting as needed."""
    while True:
        try:
            async with rpc.connect(controller, secret) as ctl:
                while True:
                    seen = multiplex.changes()
                    if multiplex.in_use():
                        models = multiplex.model_ids()
                        await ctl.call("report_load", host.replica_id, host.ongoing, models)
                    else:  # the two-argument form: no model ids to tell
                        await ctl.call("report_load", host.replica_id, host.ongoing)
                    with anyio.move_on_after(LOAD_REPORT_PERIOD_S):
                        await multiplex.wait_changed(seen)
                        await anyio.sleep(MODEL_REPORT_GAP_S)
        except (OSError, rpc.RpcError) as exc:
            log.debug("cannot report load to the controller: %s", exc)
        await anyio.sleep(LOAD_REPORT_PERIOD_S)
