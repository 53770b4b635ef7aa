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

Requests/s swing with whatever else the machine runs; CPU time per request
holds better. The load client reads the user + system time of the server
processes (``/proc/<pid>/stat``: the proxy and the replica, found by their
command lines; the bare hypercorn subprocess) at the start and the end of its
measured window, and divides by the requests answered in between: "server
CPU per request", beside the load client's own.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trioserve as serve
from benchmarks.records import Record
from trioserve.core.config import HTTPOptions
from trioserve.handle import DeploymentHandle

__all__ = ["Noop", "bare_server", "main", "raw_server", "records", "run", "token"]

LOOPS = ("trio", "asyncio")
LOOP_NAMES = {"trio": "trio", "asyncio": "asyncio/uvloop"}
CONCURRENCIES = (1, 32)
DURATION_S = 5.0
QUICK_DURATION_S = 1.5
WARMUP = 200
RUNS = 3
"""Runs per point (the table shows medians); 1 with ``--quick``."""
ROOT = Path(__file__).resolve().parent.parent
STREAM_CHUNKS = 1000
"""Chunks of the streaming baseline (and of the streaming deployment)."""


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
    elif scope["type"] == "http" and scope["path"] == "/stream":
        # the streaming baseline: the same chunks the streaming deployment yields
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        for i in range(STREAM_CHUNKS):
            await send({"type": "http.response.body", "body": token(i), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
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


def token(i: int) -> bytes:
    """The ``i``-th small chunk of a stream (a few bytes, like a token)."""
    return b"tok%d " % i


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


class _RawHTTP(asyncio.Protocol):
    """The lightest HTTP/1.1 server: a fixed ``ok`` to each request head, no parsing."""

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 2\r\n\r\nok"
    )

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            assert self.transport is not None
            self.transport.write(self.RESPONSE * n)


def raw_server(port_file: str) -> None:
    """Serve :class:`_RawHTTP` on asyncio (uvloop): the load client's ceiling."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None

    async def go() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_RawHTTP, "127.0.0.1", 0, backlog=2048)
        port = server.sockets[0].getsockname()[1]
        Path(port_file + ".tmp").write_text(str(port))
        os.replace(port_file + ".tmp", port_file)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(go())


@contextlib.contextmanager
def _bare(loop: str) -> Iterator[str]:
    """A bare hypercorn subprocess on ``loop``; yields its URL."""
    with _bare_process(loop) as (url, _):
        yield url


@contextlib.contextmanager
def _bare_process(loop: str) -> Iterator[tuple[str, int]]:
    """A bare hypercorn subprocess on ``loop``; yields its URL and pid."""
    with _server(["--bare-server", loop], f"the bare hypercorn ({loop})") as server:
        yield server


@contextlib.contextmanager
def _raw() -> Iterator[str]:
    """The raw asyncio server (:func:`raw_server`) in a subprocess; yields its URL."""
    with _server(["--raw-server"], "the raw asyncio server") as (url, _):
        yield url


@contextlib.contextmanager
def _server(args: list[str], what: str) -> Iterator[tuple[str, int]]:
    """``python -m benchmarks.http ARGS PORTFILE`` in a subprocess; yields its URL and pid."""
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-http-") as tmp:
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.http", *args, port_file],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(port_file):
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{Path(port_file).read_text()}", proc.pid
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


class _Parser:
    """Finds where each response ends in a connection's buffer, incrementally.

    A chunked response is walked chunk by chunk as its bytes arrive, without
    rescanning what was already walked (a 1,000-chunk stream stays linear).
    """

    def __init__(self) -> None:
        self.head: tuple[int, int | None, bool, bool] | None = None
        self.pos = 0

    def feed(self, buf: bytearray) -> tuple[int, int, bool] | None:
        """``(status, length, close)`` of the first whole response in ``buf``, or None.

        ``close``: the server closes the connection after it (``Connection: close``;
        hypercorn does after ``keep_alive_max_requests``, 1,000 by default).
        """
        if self.head is None:
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
            if length is None and not chunked:
                raise _ProtocolError(
                    f"a response with neither Content-Length nor chunks: {lines[0]!r}"
                )
            self.head = (status, length, chunked, close)
            self.pos = head_end + 4
        status, length, chunked, close = self.head
        if not chunked:
            assert length is not None
            if len(buf) < self.pos + length:
                return None
            return self._done(status, self.pos + length, close)
        pos = self.pos
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:  # the last chunk, then trailers (usually none) and a blank line
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    return self._done(status, eol + 4, close)
                trailers = buf.find(b"\r\n\r\n", eol + 2)
                return None if trailers < 0 else self._done(status, trailers + 4, close)
            if len(buf) < eol + 2 + size + 2:
                return None
            pos = self.pos = eol + 2 + size + 2

    def _done(self, status: int, end: int, close: bool) -> tuple[int, int, bool]:
        self.head = None
        self.pos = 0
        return status, end, close


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
        self.parser = _Parser()
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
                parsed = self.parser.feed(self.buf)
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


async def _load(
    url: str, concurrency: int, warmup: int, duration: float, pids: Sequence[int] = ()
) -> dict[str, Any]:
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
    cpu0, done0, server0 = _cpu(), load.done, [process_cpu(pid) for pid in pids]
    await asyncio.sleep(duration)
    load.stopping = True
    cpu, done1, server1 = _cpu() - cpu0, load.done, [process_cpu(pid) for pid in pids]
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
        "client_cpu_s": cpu,
        "server_cpu_s": [b - a for a, b in zip(server0, server1, strict=True)],
        "cpu_requests": done1 - done0,
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) ``pid`` has used: ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is the 3rd field (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def client(
    url: str, concurrency: int, warmup: int, duration: float, pids: Sequence[int] = ()
) -> None:
    """Load ``url``; print the figures as one line of JSON.

    ``pids``: the server processes whose CPU time is read at the start and the
    end of the measured window (with the requests answered in between).
    """
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_load(url, concurrency, warmup, duration, pids))
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
    client_cpu_s: float = math.nan
    """The load client's CPU seconds over the measured window."""
    server_cpu_s: tuple[float, ...] = ()
    """CPU seconds of each server process (the pids given) over the same window."""
    cpu_requests: int = 0
    """Requests answered between the two CPU readings."""

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
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name} c={self.concurrency}"
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

    def cpu_us(self, which: int | None = None) -> float:
        """Server CPU microseconds per request, median of the runs (NaN when not measured).

        All the server processes together, or the ``which``-th of the pids given.
        """
        values = [
            (sum(s.server_cpu_s) if which is None else s.server_cpu_s[which]) / s.cpu_requests
            for s in self.samples
            if s.server_cpu_s and s.cpu_requests
        ]
        return statistics.median(values) * 1e6 if values else math.nan

    @property
    def client_cpu_us(self) -> float:
        """The load client's CPU microseconds per request, median of the runs."""
        values = [s.client_cpu_s / s.cpu_requests for s in self.samples if s.cpu_requests]
        return statistics.median(values) * 1e6 if values else math.nan

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


def _sample(
    point: Point, url: str, warmup: int, duration: float, pids: Sequence[int] = ()
) -> Sample:
    """Run the load client against ``url`` once; add the sample to ``point``.

    ``pids``: the server's processes, whose CPU time the client reads around
    its measured window (:meth:`Point.cpu_us`).
    """
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
            *(["--cpu-pids", ",".join(map(str, pids))] if pids else []),
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
        r["client_cpu_s"],
        tuple(r["server_cpu_s"]),
        r["cpu_requests"],
    )
    point.samples.append(sample)
    server = ""
    if sample.server_cpu_s and sample.cpu_requests:
        per = [cpu / sample.cpu_requests * 1e6 for cpu in sample.server_cpu_s]
        server = f", server CPU/request {sum(per):.0f} us ({' + '.join(f'{x:.0f}' for x in per)})"
    _say(
        f"  {point.label}: {sample.rps:,.0f} req/s, p50 {sample.p50_ms:.2f} ms, "
        f"p99 {sample.p99_ms:.2f} ms, statuses {sample.statuses}, "
        f"client CPU {sample.client_cpu:.0%}{server}"
    )
    if sample.failed:
        _say(f"  {sample.failed} failed requests: {sample.errors or sample.statuses}")
    return sample


def _instance_pids(home: str, app: str, deployment: str) -> tuple[int, int]:
    """The pids of the instance's proxy and of ``deployment``'s (first) replica.

    Found in ``/proc`` by their command lines (``-m trioserve.proxy``,
    ``-m trioserve.replica --replica ID``), which carry the instance's secret
    file, under ``home``: another instance on the machine is not mistaken for it.
    """
    replica = serve.status().applications[app].deployments[deployment].replicas[0].replica_id
    prefixes = tuple({os.path.join(os.path.realpath(home), ""), os.path.join(home, "")})
    proxy = replica_pid = None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.startswith(prefixes) for a in argv):
            continue
        if "trioserve.proxy" in argv:
            proxy = int(entry)
        elif "trioserve.replica" in argv and replica in argv:
            replica_pid = int(entry)
    if proxy is None or replica_pid is None:
        raise RuntimeError(f"proxy pid {proxy}, replica {replica} pid {replica_pid}: not found")
    return proxy, replica_pid


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
            _bare_process(loop) as (bare_url, bare_pid),
            tempfile.TemporaryDirectory(prefix="trioserve-bench-http-") as home,
        ):
            serve.start(http_options={"port": 0, "event_loop": loop}, home=home)
            try:
                serve.run(Noop.bind(), name="default", route_prefix="/")
                proxy_url = serve.status().http_url
                pids = _instance_pids(home, "default", "Noop")
                pairs = [(Point("bare", loop, c), Point("proxy", loop, c)) for c in CONCURRENCIES]
                for _ in range(runs):
                    for bare, proxy in pairs:
                        _sample(bare, bare_url, warmup, duration, [bare_pid])
                        if _sample(proxy, proxy_url, warmup, duration, pids).failed:
                            _say(f"the proxy log (last lines):\n{_proxy_log_tail(home)}")
                points.extend(p for pair in pairs for p in pair)
            finally:
                serve.shutdown()
    return points


# ------------------------------------------------------- the suite's records


@serve.deployment(max_ongoing_requests=100)
class Model:
    """The second hop of the composition: answers ``ok``."""

    async def __call__(self) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=100)
class Ingress:
    """The first hop: awaits :class:`Model` through a handle."""

    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model

    async def __call__(self) -> str:
        return await self.model.remote()  # type: ignore[no-any-return]


def records(quick: bool = False) -> list[Record]:
    """The suite's HTTP figures: the proxy's default loop beside bare hypercorn on it.

    Also the two-hop composition beside one hop, and the load client against
    :func:`raw_server` (its ceiling). Points alternate within each run.
    """
    duration = QUICK_DURATION_S if quick else DURATION_S
    runs = 1 if quick else RUNS
    loop = HTTPOptions().event_loop
    name = LOOP_NAMES[loop]
    points = {
        "bare32": Point("bare", loop, 32, name=f"bare hypercorn ({name})"),
        "proxy32": Point("proxy", loop, 32),
        "raw32": Point("raw", loop, 32, name="raw asyncio server"),
        "two32": Point("proxy", loop, 32, name="two hops"),
        "bare1": Point("bare", loop, 1, name=f"bare hypercorn ({name})"),
        "proxy1": Point("proxy", loop, 1),
        "two1": Point("proxy", loop, 1, name="two hops"),
    }
    with (
        _bare_process(loop) as (bare_url, bare_pid),
        _raw() as raw_url,
        tempfile.TemporaryDirectory(prefix="trioserve-bench-http-") as home,
    ):
        serve.start(http_options={"port": 0}, home=home)
        try:
            serve.run(Noop.bind(), name="noop", route_prefix="/")
            serve.run(Ingress.bind(Model.bind()), name="two", route_prefix="/two")
            url = serve.status().http_url
            urls = {"bare": bare_url, "raw": raw_url, "proxy": url}
            # the server processes whose CPU time is read around each run (proxy, replica)
            pids = {"bare": [bare_pid], "proxy": list(_instance_pids(home, "noop", "Noop"))}
            for _ in range(runs):
                for key, point in points.items():
                    two = key.startswith("two")
                    target = url + "/two" if two else urls[point.target]
                    _sample(
                        point, target, WARMUP, duration, [] if two else pids.get(point.target, [])
                    )
        finally:
            serve.shutdown()
    p = points
    rps_ok = p["proxy32"].rps >= 2500 and p["proxy32"].rps >= 0.6 * p["bare32"].rps
    bare = f"bare hypercorn hello-world, {name} as the proxy"
    return [
        Record(
            "HTTP",
            "no-op deployment, 1 replica, through the proxy: c=32",
            p["proxy32"].rps,
            "req/s",
            bare,
            p["bare32"].rps,
            target=">= 2,500 req/s and >= 60 % of bare",
            met=rps_ok,
            note=(f"median of {runs} runs, range {_range(p['proxy32'])} req/s" if runs > 1 else "")
            + (f"; {p['proxy32'].failed} failed requests" if p["proxy32"].failed else ""),
            key="http_rps_c32",
        ),
        Record(
            "HTTP",
            "no-op, c=1: p50 latency",
            p["proxy1"].p50_ms,
            "ms",
            bare,
            p["bare1"].p50_ms,
            target="< 0.8 ms",
            met=p["proxy1"].p50_ms < 0.8,
            key="http_p50_c1",
        ),
        Record(
            "HTTP",
            "no-op, c=1: p99 latency",
            p["proxy1"].p99_ms,
            "ms",
            bare,
            p["bare1"].p99_ms,
            key="http_p99_c1",
        ),
        Record(
            "HTTP",
            "two hops (ingress awaits model over a handle), c=32",
            p["two32"].rps,
            "req/s",
            "one hop, c=32",
            p["proxy32"].rps,
            key="http_two_hops_rps_c32",
        ),
        Record(
            "HTTP",
            "two hops, c=1: p50 latency",
            p["two1"].p50_ms,
            "ms",
            "one hop, c=1",
            p["proxy1"].p50_ms,
            key="http_two_hops_p50_c1",
        ),
        Record(
            "Load generator",
            "the load client against a raw asyncio HTTP server, c=32 (its ceiling)",
            p["raw32"].rps,
            "req/s",
            f"bare hypercorn ({name}), c=32",
            p["bare32"].rps,
            note=(
                f"client CPU: {p['raw32'].client_cpu:.0%} of a core at the ceiling, "
                f"{p['bare32'].client_cpu:.0%} on bare hypercorn, "
                f"{p['proxy32'].client_cpu:.0%} on the proxy"
            ),
        ),
        *(_cpu_record(p[f"proxy{c}"], p[f"bare{c}"], bare, runs) for c in (32, 1)),
    ]


def _cpu_record(proxy: Point, bare: Point, bare_name: str, runs: int) -> Record:
    """Server CPU time per request (proxy + replica), beside bare hypercorn's."""
    c = proxy.concurrency
    median = f"median of {runs} runs; " if runs > 1 else ""
    return Record(
        "HTTP",
        f"server CPU per request (proxy + replica), no-op, c={c}",
        proxy.cpu_us(),
        "us",
        bare_name,
        bare.cpu_us(),
        note=(
            f"{median}user + system time of the server processes over each measured "
            f"window / requests answered in it: proxy {proxy.cpu_us(0):.0f} us + replica "
            f"{proxy.cpu_us(1):.0f} us; load client {proxy.client_cpu_us:.0f} us per "
            f"request on trioserve ({proxy.client_cpu:.0%} of a core), "
            f"{bare.client_cpu_us:.0f} us on bare hypercorn ({bare.client_cpu:.0%})"
        ),
        key=f"http_cpu_per_request_c{c}",
    )


def _range(point: Point) -> str:
    rates = [s.rps for s in point.samples]
    return f"{min(rates):,.0f}-{max(rates):,.0f}"


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
        f"| Measure | {rps_head} | p50 | p99 | server CPU/req | req/s proxy/bare "
        "| p50 proxy/bare | CPU/req proxy/bare | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCIES:
        for loop in LOOPS:
            proxy = _find(points, "proxy", loop, c)
            bare = _find(points, "bare", loop, c)
            for p in (proxy, bare):
                ratios = (
                    f"{proxy.rps / bare.rps:.2f}x | {proxy.p50_ms / bare.p50_ms:.2f}x "
                    f"| {proxy.cpu_us() / bare.cpu_us():.2f}x"
                    if p is proxy
                    else "(baseline) | (baseline) | (baseline)"
                )
                cpu = f"{p.cpu_us():,.0f} us"
                if p is proxy:
                    cpu += f" ({p.cpu_us(0):,.0f} + {p.cpu_us(1):,.0f})"
                lines.append(
                    f"| {p.label} | {p.rps_cell} | {p.p50_ms:.2f} ms | {p.p99_ms:.2f} ms "
                    f"| {cpu} | {ratios} | {p.failed} |"
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
        "server CPU/req: user + system time of the server processes (the proxy's: proxy + "
        "replica) over the measured window / requests answered in it, median of the runs",
        "client CPU (share of one core, highest run; per request, median) per point: "
        + ", ".join(f"{p.label} {p.client_cpu:.0%}, {p.client_cpu_us:.0f} us" for p in points),
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
    parser.add_argument("--raw-server", metavar="PORTFILE", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-pids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    duration = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    if args.bare_server:
        loop, port_file = args.bare_server
        if loop not in LOOPS:
            parser.error(f"--bare-server LOOP must be one of {LOOPS}")
        bare_server(loop, port_file)
        return
    if args.raw_server:
        raw_server(args.raw_server)
        return
    if args.client:
        pids = [int(pid) for pid in args.cpu_pids.split(",") if pid]
        client(args.client, args.concurrency, args.warmup, duration, pids)
        return
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs = args.runs or (1 if args.quick else RUNS)
    points = run(duration=duration, warmup=args.warmup, runs=runs)
    seconds = time.perf_counter() - started
    print(report(points, duration, args.warmup, runs, seconds, load_before))


if __name__ == "__main__":
    main()
