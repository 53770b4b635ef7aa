"""HTTP requests/s and latency through the proxy, beside bare hypercorn in the same run.

Run ``python -m benchmarks.http`` (``--quick`` for a short run). For each of
the proxy's event loops (``trio``, and ``asyncio`` with uvloop) it starts an
embedded instance whose proxy runs on that loop, serves a no-op deployment
(one replica, ``max_ongoing_requests=100``) at ``/``, and measures
``GET /`` at concurrency 1 and 32. Beside each figure it measures the
ceiling of the HTTP stack on the same loop: a bare hypercorn serving a
hello-world ASGI app (answers ``ok``) in a subprocess, set up as the proxy
sets up hypercorn (``anyio.run`` + ``hypercorn.<loop>.serve`` on a socket it
bound itself). It prints a Markdown table of requests/s and p50/p99 latency,
with the ratio proxy/bare, and which proxy loop is faster.

The load comes from a client in a process of its own (so that it shares no
GIL with the driver, which hosts the controller): raw HTTP/1.1 over keep-alive
connections, one per concurrent request, on asyncio protocols (uvloop when
installed), each connection sending its next request as soon as the previous
answer is read. The same client measures both targets. Each run of a point
is a warm-up of ``--warmup`` requests, then a fixed duration (``--duration``);
the latency is from writing the request to reading the end of its body. Each
point is run ``--runs`` times (3; 1 with ``--quick``), the bare and the proxy
runs alternating while both servers are up, and the table shows the medians
(and the range of requests/s).

The machine is shared by everything: with the proxy, the client, the proxy
and the replica compete for the cores; with bare hypercorn, the client and
the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trioserve as serve

__all__ = ["Noop", "bare_server", "main", "run"]

LOOPS = ("trio", "asyncio")
LOOP_NAMES = {"trio": "trio", "asyncio": "asyncio/uvloop"}
CONCURRENCIES = (1, 32)
DURATION_S = 5.0
QUICK_DURATION_S = 1.5
WARMUP = 200
RUNS = 3
"""Runs per point (the table shows medians); 1 with ``--quick``."""
ROOT = Path(__file__).resolve().parent.parent


@serve.deployment(max_ongoing_requests=100)
class Noop:
    """The deployment measured: no argument (no Request is built), answers ``ok``."""

    async def __call__(self) -> str:
        return "ok"


# ------------------------------------------------------------ the bare baseline


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    """The smallest ASGI app hypercorn serves: ``ok`` to everything, and the lifespan."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"2"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def bare_server(loop: str, port_file: str) -> None:
    """Serve :func:`_hello` with hypercorn on ``loop``; write the port; stop on SIGTERM."""
    import anyio
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.keep_alive_timeout = 5.0
    config.accesslog = None
    config.loglevel = "WARNING"

    async def go() -> None:
        stop = anyio.Event()

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    stop.set()
                    return

        if loop == "trio":
            from hypercorn.trio import serve as hypercorn_serve
        else:
            from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]
        async with anyio.create_task_group() as tg:
            tg.start_soon(signals)
            tmp = port_file + ".tmp"
            Path(tmp).write_text(str(sock.getsockname()[1]))
            os.replace(tmp, port_file)
            await hypercorn_serve(_hello, config, shutdown_trigger=stop.wait, mode="asgi")
            tg.cancel_scope.cancel()

    if loop == "trio":
        anyio.run(go, backend="trio")
    else:
        anyio.run(go, backend_options=_uvloop())


def _uvloop() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@contextlib.contextmanager
def _bare(loop: str) -> Iterator[str]:
    """A bare hypercorn subprocess on ``loop``; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-http-") as tmp:
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.http", "--bare-server", loop, port_file],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(port_file):
                if proc.poll() is not None:
                    raise RuntimeError(f"the bare hypercorn ({loop}) exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bare hypercorn ({loop}) did not start")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{Path(port_file).read_text()}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the client


class _ProtocolError(Exception):
    pass


def _parse(buf: bytearray) -> tuple[int, int, bool] | None:
    """``(status, length, close)`` of the first whole response in ``buf``, or None if incomplete.

    ``close``: the server closes the connection after it (``Connection: close``;
    hypercorn does after ``keep_alive_max_requests``, 1,000 by default).
    """
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = bytes(buf[:head_end]).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    pos = head_end + 4
    if chunked:
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:  # the last chunk, then trailers (usually none) and a blank line
                if buf[pos : pos + 2] == b"\r\n":
                    return status, pos + 2, close
                trailers = buf.find(b"\r\n\r\n", pos)
                return None if trailers < 0 else (status, trailers + 4, close)
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2
    if length is None:
        raise _ProtocolError(f"a response with neither Content-Length nor chunks: {lines[0]!r}")
    if len(buf) < pos + length:
        return None
    return status, pos + length, close


class _Load:
    """What the connections share: the phase, the counts and the latencies."""

    def __init__(self, warmup: int, duration: float) -> None:
        self.warmup = warmup
        self.duration = duration
        self.done = 0
        self.t0 = 0.0
        self.end = math.inf
        self.warmed = asyncio.Event()
        self.stopping = False
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.busy = 0
        self.idle = asyncio.Event()

    def record(self, status: int, latency: float, now: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.done += 1
        if not self.warmed.is_set():
            if self.done >= self.warmup:
                self.t0 = now
                self.end = now + self.duration
                self.warmed.set()
        elif now <= self.end:
            self.latencies.append(latency)


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending one request at a time, back to back."""

    def __init__(self, load: _Load, request: bytes) -> None:
        self.load = load
        self.request = request
        self.buf = bytearray()
        self.started = 0.0
        self.transport: asyncio.Transport | None = None
        self.waiting = False
        self.failed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if not self.load.stopping:
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.waiting:
            self.waiting = True
            self.load.busy += 1
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def _done(self) -> None:
        if self.waiting:
            self.waiting = False
            self.load.busy -= 1
            if self.load.stopping and self.load.busy == 0:
                self.load.idle.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            try:
                parsed = _parse(self.buf)
            except (_ProtocolError, ValueError, IndexError) as exc:
                self.load.errors.append(f"bad response: {exc}")
                self.failed = True
                assert self.transport is not None
                self.transport.close()
                return
            if parsed is None:
                return
            status, length, close = parsed
            del self.buf[:length]
            now = time.perf_counter()
            self.load.record(status, now - self.started, now)
            if self.load.stopping or close:
                self._done()
                if close:  # the connect task opens another
                    assert self.transport is not None
                    self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting and not self.load.stopping:
            self.load.errors.append(f"connection lost: {exc or 'closed by the server'}")
            self.failed = True
        self._done()
        if not self.lost.done():
            self.lost.set_result(None)


async def _load(url: str, concurrency: int, warmup: int, duration: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    load = _Load(warmup, duration)
    connections: list[_Connection] = []

    async def connect() -> None:
        while not load.stopping:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(load, request), host, port
                )
            except OSError as exc:
                load.errors.append(f"cannot connect: {exc}")
                await asyncio.sleep(0.1)
                continue
            connections.append(conn)
            await conn.lost
            connections.remove(conn)
            if conn.failed:
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(connect()) for _ in range(concurrency)]
    await asyncio.wait_for(load.warmed.wait(), timeout=60)
    cpu0 = _cpu()
    await asyncio.sleep(duration)
    load.stopping = True
    cpu = _cpu() - cpu0
    if load.busy:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.idle.wait(), timeout=10)
    for conn in connections:
        if conn.transport is not None:
            conn.transport.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies = sorted(load.latencies)
    return {
        "requests": len(latencies),
        "seconds": duration,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "errors": load.errors[:20],
        "error_count": len(load.errors),
        "client_cpu": cpu / duration,
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def client(url: str, concurrency: int, warmup: int, duration: float) -> None:
    """Load ``url``; print the figures as one line of JSON."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_load(url, concurrency, warmup, duration))
    print(json.dumps(result), flush=True)


# -------------------------------------------------------------- measuring


@dataclasses.dataclass(frozen=True)
class Sample:
    """One run of the load client against one target at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    errors: list[str]
    error_count: int
    client_cpu: float

    @property
    def failed(self) -> int:
        return self.error_count + sum(n for s, n in self.statuses.items() if s != "200")


@dataclasses.dataclass
class Point:
    """One target at one concurrency: its samples, and their medians."""

    target: str
    loop: str
    concurrency: int
    samples: list[Sample] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        name = "proxy" if self.target == "proxy" else "bare hypercorn"
        return f"{name} ({LOOP_NAMES[self.loop]}) c={self.concurrency}"

    @property
    def rps(self) -> float:
        return statistics.median(s.rps for s in self.samples)

    @property
    def p50_ms(self) -> float:
        return statistics.median(s.p50_ms for s in self.samples)

    @property
    def p99_ms(self) -> float:
        return statistics.median(s.p99_ms for s in self.samples)

    @property
    def client_cpu(self) -> float:
        return max(s.client_cpu for s in self.samples)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.samples)

    @property
    def rps_cell(self) -> str:
        if len(self.samples) == 1:
            return f"{self.rps:,.0f}"
        low = min(s.rps for s in self.samples)
        high = max(s.rps for s in self.samples)
        return f"{self.rps:,.0f} ({low:,.0f}-{high:,.0f})"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sample(point: Point, url: str, warmup: int, duration: float) -> Sample:
    """Run the load client against ``url`` once; add the sample to ``point``."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.http",
            "--client",
            url,
            "--concurrency",
            str(point.concurrency),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the load client failed ({proc.returncode}):\n{proc.stderr}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    sample = Sample(
        r["requests"] / r["seconds"],
        r["p50_ms"],
        r["p99_ms"],
        r["statuses"],
        r["errors"],
        r["error_count"],
        r["client_cpu"],
    )
    point.samples.append(sample)
    _say(
        f"  {point.label}: {sample.rps:,.0f} req/s, p50 {sample.p50_ms:.2f} ms, "
        f"p99 {sample.p99_ms:.2f} ms, statuses {sample.statuses}, "
        f"client CPU {sample.client_cpu:.0%}"
    )
    if sample.failed:
        _say(f"  {sample.failed} failed requests: {sample.errors or sample.statuses}")
    return sample


def _proxy_log_tail(home: str, lines: int = 40) -> str:
    logs = sorted(Path(home).glob("runs/*/logs/proxy.log"))
    if not logs:
        return "(no proxy.log under the home dir)"
    text = logs[-1].read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run(*, duration: float = DURATION_S, warmup: int = WARMUP, runs: int = RUNS) -> list[Point]:
    """Every point, ``runs`` times.

    Per loop, the bare hypercorn and the instance (proxy on that loop) are up
    at once, and the load alternates between them - bare, proxy, bare,
    proxy - so that a slow spell of the machine weighs on both sides of a ratio.
    """
    points: list[Point] = []
    for loop in LOOPS:
        _say(f"{LOOP_NAMES[loop]}: bare hypercorn and proxy...")
        with (
            _bare(loop) as bare_url,
            tempfile.TemporaryDirectory(prefix="trioserve-bench-http-") as home,
        ):
            serve.start(http_options={"port": 0, "event_loop": loop}, home=home)
            try:
                serve.run(Noop.bind(), route_prefix="/")
                proxy_url = serve.status().http_url
                pairs = [(Point("bare", loop, c), Point("proxy", loop, c)) for c in CONCURRENCIES]
                for _ in range(runs):
                    for bare, proxy in pairs:
                        _sample(bare, bare_url, warmup, duration)
                        if _sample(proxy, proxy_url, warmup, duration).failed:
                            _say(f"the proxy log (last lines):\n{_proxy_log_tail(home)}")
                points.extend(p for pair in pairs for p in pair)
            finally:
                serve.shutdown()
    return points


# ----------------------------------------------------------------- the table


def _find(points: list[Point], target: str, loop: str, c: int) -> Point:
    return next(p for p in points if (p.target, p.loop, p.concurrency) == (target, loop, c))


def report(
    points: list[Point],
    duration: float,
    warmup: int,
    runs: int,
    seconds: float,
    load_before: float,
) -> str:
    head = (
        f"trioserve HTTP benchmark - Python {platform.python_version()}, "
        f"hypercorn {_version('hypercorn')}, trio {_version('trio')}, "
        f"uvloop {_version('uvloop')}, {os.cpu_count()} CPUs, {platform.machine()}; "
        "no-op deployment (1 replica) through the proxy vs bare hypercorn hello-world "
        "(one worker, as the proxy), HTTP/1.1 keep-alive on 127.0.0.1"
    )
    rps_head = "req/s" if runs == 1 else f"req/s (median of {runs}; range)"
    lines = [
        f"| Measure | {rps_head} | p50 | p99 | req/s proxy/bare | p50 proxy/bare | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCIES:
        for loop in LOOPS:
            proxy = _find(points, "proxy", loop, c)
            bare = _find(points, "bare", loop, c)
            for p in (proxy, bare):
                ratios = (
                    f"{proxy.rps / bare.rps:.2f}x | {proxy.p50_ms / bare.p50_ms:.2f}x"
                    if p is proxy
                    else "(baseline) | (baseline)"
                )
                lines.append(
                    f"| {p.label} | {p.rps_cell} | {p.p50_ms:.2f} ms | {p.p99_ms:.2f} ms "
                    f"| {ratios} | {p.failed} |"
                )
    verdicts = []
    for c in CONCURRENCIES:
        trio_p = _find(points, "proxy", "trio", c)
        asyncio_p = _find(points, "proxy", "asyncio", c)
        fast, slow = (trio_p, asyncio_p) if trio_p.rps > asyncio_p.rps else (asyncio_p, trio_p)
        verdicts.append(
            f"Faster proxy loop at c={c}: {LOOP_NAMES[fast.loop]}, {fast.rps:,.0f} vs "
            f"{slow.rps:,.0f} req/s ({fast.rps / slow.rps:.2f}x; p50 {fast.p50_ms:.2f} vs "
            f"{slow.p50_ms:.2f} ms)"
        )
    notes = [
        f"each run of a point: {warmup} requests of warm-up, then {duration:g} s; "
        + ("" if runs == 1 else f"{runs} runs per point, the bare and proxy runs alternating; ")
        + "one keep-alive connection per concurrent request; the load client (raw HTTP/1.1 "
        "on asyncio protocols, uvloop) runs in a process of its own",
        "client CPU (share of one core, highest run) per point: "
        + ", ".join(f"{p.label} {p.client_cpu:.0%}" for p in points),
        f"(the benchmark took {seconds:.0f} s; load average before it: {load_before:.2f} - "
        "other work on the machine skews the figures)",
    ]
    return "\n".join([head, "", *lines, "", *verdicts, "", *notes])


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http",
        description="HTTP requests/s and latency through the proxy (see the module docstring).",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_DURATION_S:g} s per point, one run"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per point")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="requests before measuring")
    parser.add_argument("--runs", type=int, default=None, help=f"runs per point (default {RUNS})")
    parser.add_argument(
        "--bare-server", nargs=2, metavar=("LOOP", "PORTFILE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    duration = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    if args.bare_server:
        loop, port_file = args.bare_server
        if loop not in LOOPS:
            parser.error(f"--bare-server LOOP must be one of {LOOPS}")
        bare_server(loop, port_file)
        return
    if args.client:
        client(args.client, args.concurrency, args.warmup, duration)
        return
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs = args.runs or (1 if args.quick else RUNS)
    points = run(duration=duration, warmup=args.warmup, runs=runs)
    seconds = time.perf_counter() - started
    print(report(points, duration, args.warmup, runs, seconds, load_before))


if __name__ == "__main__":
    main()
