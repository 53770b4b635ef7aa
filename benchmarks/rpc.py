"""The actor RPC's performance figures, each beside a baseline measured in the same run.

Run ``python -m benchmarks.rpc`` (``--help`` for the sizes). It starts a
server in a subprocess (under asyncio, as replicas are; ``--server-backend``
to change it), so that the client and the server each have a core, and
measures from a client under trio and under asyncio, over TCP on 127.0.0.1.
It prints a Markdown table of:

* **sequential calls** - round trips/s of a no-op ``Connection.call``, one
  call at a time, beside a bare length-prefixed echo of a message the size of
  a no-op call frame, one message at a time.
* **100 calls in flight** - no-op calls/s with 100 tasks calling at once on
  one connection, beside the bare echo pipelined 100 deep (a writer task sends
  while fewer than 100 messages are unanswered, a reader task reads the
  answers).
* **100 MB echo** - MB/s of a 100 MB ``bytes`` value passed to ``call`` and
  returned by the server (100 MB over the round trip, 1 MB = 10^6 bytes),
  beside the bare echo of the same 100 MB as one length-prefixed message.

The baseline is a plain socket echo with the same event loop, written on the
same anyio socket streams trioserve's RPC is built on (both ends, TCP_NODELAY
as the RPC sets it, the same read size), so the difference is the RPC's own
cost: the handshake is not timed, but framing, msgpack, the call table and
the task per call at the server are. The server process serves the RPC and
the bare echo at once; it is the same process for every figure. Each figure
is the median of several runs after a warm-up (:func:`simulations.scale.median_time`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import msgpack
import trio

from benchmarks.table import Row, markdown
from simulations.scale import median_time
from trioserve.core import rpc

__all__ = ["BareFrames", "Row", "main", "run", "serve"]

BACKENDS = ("trio", "asyncio")
SEQUENTIAL_CALLS = 2000
IN_FLIGHT = 100
IN_FLIGHT_CALLS = 5000
BIG_MB = 100
RUNS = 5
"""Each call figure is the median of this many runs."""
BIG_RUNS = 3
"""Each 100 MB figure is the median of this many runs."""
MB = 1_000_000
_HEADER_SIZE = 4


# ------------------------------------------------------------------ the baseline


def _nodelay(stream: anyio.abc.SocketStream) -> None:
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BareFrames:
    """Length-prefixed messages over a socket stream, and nothing else."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def read(self) -> bytes:
        buf = self._buf
        while len(buf) < _HEADER_SIZE:
            buf += await self.stream.receive(rpc.READ_SIZE)
        end = _HEADER_SIZE + int.from_bytes(buf[:_HEADER_SIZE], "big")
        while len(buf) < end:
            buf += await self.stream.receive(max(rpc.READ_SIZE, end - len(buf)))
        body = bytes(buf[_HEADER_SIZE:end])
        del buf[:end]
        return body

    async def write(self, body: bytes) -> None:
        header = len(body).to_bytes(_HEADER_SIZE, "big")
        if len(body) < 65536:
            await self.stream.send(header + body)
        else:
            await self.stream.send(header)
            await self.stream.send(body)


async def _bare_echo(stream: anyio.abc.SocketStream) -> None:
    _nodelay(stream)
    frames = BareFrames(stream)
    async with stream:
        try:
            while True:
                await frames.write(await frames.read())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


# ---------------------------------------------------------------------- the server


def _noop() -> None:
    return None


def _echo(value: Any) -> Any:
    return value


async def serve(secret: bytes) -> None:
    """Serve the RPC and the bare echo; print both addresses; stop at end of stdin."""
    server = rpc.Server({"noop": _noop, "echo": _echo}, secret, name="bench")
    async with anyio.create_task_group() as tg:
        rpc_address = await tg.start(server.serve, "tcp://127.0.0.1:0")
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def bare() -> None:
            async with listener:
                await listener.serve(_bare_echo)

        tg.start_soon(bare)
        print(json.dumps({"rpc": rpc_address, "echo": port}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        tg.cancel_scope.cancel()


@contextmanager
def _server_process(backend: str, secret: bytes) -> Iterator[dict[str, Any]]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.rpc", "--serve", "--server-backend", backend],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(secret.decode() + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark server exited with {proc.wait()}")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- measuring


async def _calls_sequential(conn: rpc.Connection, n: int) -> None:
    for _ in range(n):
        await conn.call("noop")


async def _calls_in_flight(conn: rpc.Connection, n: int, depth: int) -> None:
    async def caller(calls: int) -> None:
        for _ in range(calls):
            await conn.call("noop")

    async with anyio.create_task_group() as tg:
        for i in range(depth):
            tg.start_soon(caller, n // depth + (i < n % depth))


async def _call_echo(conn: rpc.Connection, value: bytes) -> bytes:
    result: bytes = await conn.call("echo", value)
    return result


async def _bare_sequential(frames: BareFrames, message: bytes, n: int) -> None:
    for _ in range(n):
        await frames.write(message)
        await frames.read()


async def _bare_pipelined(frames: BareFrames, message: bytes, n: int, depth: int) -> None:
    unanswered = anyio.Semaphore(depth)

    async def writer() -> None:
        for _ in range(n):
            await unanswered.acquire()
            await frames.write(message)

    async def reader() -> None:
        for _ in range(n):
            await frames.read()
            unanswered.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(reader)


async def _bare_echo_once(frames: BareFrames, value: bytes) -> bytes:
    await frames.write(value)
    return await frames.read()


async def _bare_connect(port: int) -> BareFrames:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    _nodelay(stream)
    return BareFrames(stream)


@dataclasses.dataclass(frozen=True)
class Figures:
    """One client backend's figures: seconds per run (medians), ours and the baseline's."""

    backend: str
    sequential_s: float
    bare_sequential_s: float
    in_flight_s: float
    bare_pipelined_s: float
    big_s: float
    bare_big_s: float


def _measure(
    backend: str,
    addresses: dict[str, Any],
    secret: bytes,
    *,
    sequential: int,
    in_flight: int,
    big: bytes,
    runs: int,
    big_runs: int,
) -> Figures:
    """Everything, from a client under ``backend`` (an event loop in a thread of its own)."""
    message = b"x" * len(rpc.pack([rpc.CALL, 1, "noop", (), {}, 0]))
    with (
        anyio.from_thread.start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(rpc.connect(addresses["rpc"], secret)) as conn,
    ):
        bare = portal.call(_bare_connect, addresses["echo"])

        def timed(fn: Callable[..., Any], *args: Any, n: int = runs, warm: bool = True) -> float:
            if warm:
                portal.call(fn, *args)
            seconds, _, _ = median_time(lambda: portal.call(fn, *args), n)
            return seconds

        sequential_s = timed(_calls_sequential, conn, sequential)
        bare_sequential_s = timed(_bare_sequential, bare, message, sequential)
        in_flight_s = timed(_calls_in_flight, conn, in_flight, IN_FLIGHT)
        bare_pipelined_s = timed(_bare_pipelined, bare, message, in_flight, IN_FLIGHT)

        if portal.call(_call_echo, conn, big) != big:
            raise AssertionError("the RPC echo of the big value came back different")
        if portal.call(_bare_echo_once, bare, big) != big:
            raise AssertionError("the bare echo of the big value came back different")
        # the checks above were the warm-up
        big_s = timed(_call_echo, conn, big, n=big_runs, warm=False)
        bare_big_s = timed(_bare_echo_once, bare, big, n=big_runs, warm=False)
        portal.call(bare.stream.aclose)
    return Figures(
        backend,
        sequential_s,
        bare_sequential_s,
        in_flight_s,
        bare_pipelined_s,
        big_s,
        bare_big_s,
    )


# ---------------------------------------------------------------------- the table


def _per_s(n: float, seconds: float, unit: str) -> str:
    return f"{n / seconds:,.0f} {unit}"


def _rows(f: Figures, server_backend: str, sequential: int, in_flight: int, mb: int) -> list[Row]:
    who = f"client {f.backend}, server {server_backend}"
    return [
        Row(
            what=f"no-op `call`, sequential ({who})",
            figure=(
                f"{_per_s(sequential, f.sequential_s, 'calls/s')} "
                f"({f.sequential_s / sequential * 1e6:.0f} µs each)"
            ),
            baseline=(
                f"bare echo, one at a time: {_per_s(sequential, f.bare_sequential_s, 'msg/s')} "
                f"({f.bare_sequential_s / sequential * 1e6:.0f} µs each)"
            ),
            ratio=f"{f.sequential_s / f.bare_sequential_s:.1f}x",
        ),
        Row(
            what=f"no-op `call`, {IN_FLIGHT} in flight on one connection ({who})",
            figure=_per_s(in_flight, f.in_flight_s, "calls/s"),
            baseline=(
                f"bare echo, pipelined {IN_FLIGHT} deep: "
                f"{_per_s(in_flight, f.bare_pipelined_s, 'msg/s')}"
            ),
            ratio=f"{f.in_flight_s / f.bare_pipelined_s:.1f}x",
        ),
        Row(
            what=f"{mb} MB `bytes` echoed by `call` ({who})",
            figure=f"{_per_s(mb, f.big_s, 'MB/s')} ({f.big_s:.2f} s round trip)",
            baseline=(
                f"bare echo of {mb} MB: {_per_s(mb, f.bare_big_s, 'MB/s')} ({f.bare_big_s:.2f} s)"
            ),
            ratio=f"{f.big_s / f.bare_big_s:.1f}x",
        ),
    ]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    *,
    sequential: int = SEQUENTIAL_CALLS,
    in_flight: int = IN_FLIGHT_CALLS,
    mb: int = BIG_MB,
    runs: int = RUNS,
    big_runs: int = BIG_RUNS,
    server_backend: str = "asyncio",
    client_backends: Sequence[str] = BACKENDS,
) -> str:
    """Measure everything and return the report (Markdown)."""
    started = time.perf_counter()
    secret = secrets.token_hex(32).encode()
    big = os.urandom(MB) * mb
    rows: list[Row] = []
    with _server_process(server_backend, secret) as addresses:
        for backend in client_backends:
            _say(f"measuring from the {backend} client...")
            figures = _measure(
                backend,
                addresses,
                secret,
                sequential=sequential,
                in_flight=in_flight,
                big=big,
                runs=runs,
                big_runs=big_runs,
            )
            rows.extend(_rows(figures, server_backend, sequential, in_flight, mb))
    head = (
        f"trioserve RPC benchmark - Python {platform.python_version()}, "
        f"anyio {_version('anyio')}, trio {trio.__version__}, "
        f"msgpack {'.'.join(map(str, msgpack.version))}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}; server in a subprocess ({server_backend}), TCP on 127.0.0.1"
    )
    notes = [
        f"calls: median of {runs} runs of {sequential:,} sequential calls and of "
        f"{in_flight:,} calls from {IN_FLIGHT} tasks; {mb} MB: median of {big_runs} round "
        "trips; each after a warm-up",
        f"bare echo message: {len(rpc.pack([rpc.CALL, 1, 'noop', (), {}, 0]))} bytes, "
        "the size of a no-op call frame; same anyio socket streams, same event loop",
        f"(the benchmark took {time.perf_counter() - started:.0f} s)",
    ]
    return "\n".join([head, "", markdown(rows), "", *notes])


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rpc",
        description="The actor RPC's performance figures (see the module docstring).",
    )
    parser.add_argument("--sequential", type=int, default=SEQUENTIAL_CALLS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT_CALLS)
    parser.add_argument("--mb", type=int, default=BIG_MB, help="size of the big echo, MB")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--big-runs", type=int, default=BIG_RUNS)
    parser.add_argument("--server-backend", choices=BACKENDS, default="asyncio")
    parser.add_argument("--client-backend", choices=BACKENDS, action="append", help="default: both")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:  # the subprocess: the secret comes on the first line of stdin
        secret = sys.stdin.readline().strip().encode()
        anyio.run(serve, secret, backend=args.server_backend)
        return
    print(
        run(
            sequential=args.sequential,
            in_flight=args.in_flight,
            mb=args.mb,
            runs=args.runs,
            big_runs=args.big_runs,
            server_backend=args.server_backend,
            client_backends=args.client_backend or BACKENDS,
        )
    )


if __name__ == "__main__":
    main()
