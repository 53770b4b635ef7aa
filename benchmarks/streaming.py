"""Streaming tokens/s: a generator yielding 1,000 small chunks, over HTTP and over a handle.

Run ``python -m benchmarks.streaming`` (``--quick`` for a short run). One
replica of a deployment whose async generator ``tokens`` yields 1,000 chunks
of a few bytes (``"tok0 "``, ``"tok1 "``, ...):

* **over HTTP** - ``GET /stream`` through the proxy, whose ``__call__``
  returns a Starlette ``StreamingResponse`` over ``tokens``; one request at a
  time (concurrency 1) from the load client of :mod:`benchmarks.http`, which
  reads each chunked response to its end. Tokens/s = responses/s x 1,000.
  Baseline: a bare hypercorn app (asyncio/uvloop, as the proxy) that sends the
  same 1,000 chunks as 1,000 ASGI ``http.response.body`` messages, measured by
  the same client.
* **over a handle** - ``handle.options(method_name="tokens", stream=True)``
  iterated with ``async for`` from an asyncio driver, one stream at a time.
  Baseline: the bare RPC stream (``Connection.stream("handle_request_streaming")``)
  to the same replica, from trio: the floor without routing or the handle's
  response objects.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import AsyncIterator

import httpx
import trio
from starlette.responses import StreamingResponse

import trioserve as serve
from benchmarks.http import (
    QUICK_DURATION_S,
    STREAM_CHUNKS,
    Point,
    _bare,
    _sample,
    token,
)
from benchmarks.records import Record, markdown
from simulations.scale import median_time
from trioserve.core import rpc
from trioserve.core.config import HTTPOptions
from trioserve.core.routing import current_instance
from trioserve.handle import DeploymentHandle

__all__ = ["Tokens", "main", "records"]

DURATION_S = 4.0


@serve.deployment(max_ongoing_requests=100)
class Tokens:
    """Streams :data:`STREAM_CHUNKS` small chunks, over HTTP and over handles."""

    async def tokens(self) -> AsyncIterator[str]:
        for i in range(STREAM_CHUNKS):
            yield token(i).decode()

    async def __call__(self) -> StreamingResponse:
        return StreamingResponse(self.tokens(), media_type="text/plain")


def _replica_address() -> str:
    instance = current_instance()

    async def find() -> str:
        async with rpc.connect(instance.controller, instance.secret) as conn:
            status = await conn.call("status")
        replicas = status["applications"]["stream"]["deployments"]["Tokens"]["replicas"]
        return str(replicas[0]["address"])

    return trio.run(find)


def _handle_streams(handle: DeploymentHandle, n: int) -> None:
    stream = handle.options(method_name="tokens", stream=True)

    async def go() -> None:
        for _ in range(n):
            count = 0
            async for _chunk in stream.remote():
                count += 1
            assert count == STREAM_CHUNKS, count

    asyncio.run(go())


def _bare_streams(address: str, n: int) -> None:
    secret = current_instance().secret

    async def go() -> None:
        async with rpc.connect(address, secret) as conn:
            for _ in range(n):
                count = 0
                async with await conn.stream(
                    "handle_request_streaming", {"method": "tokens"}, (), {}
                ) as chunks:
                    async for _chunk in chunks:
                        count += 1
                assert count == STREAM_CHUNKS, count

    trio.run(go)


def records(quick: bool = False) -> list[Record]:
    duration = QUICK_DURATION_S if quick else DURATION_S
    runs = 1 if quick else 3
    streams = 5 if quick else 20
    loop = HTTPOptions().event_loop
    bare_point = Point("bare", loop, 1, name="bare hypercorn stream")
    proxy_point = Point("proxy", loop, 1, name="proxy stream")
    with (
        _bare(loop) as bare_url,
        tempfile.TemporaryDirectory(prefix="trioserve-bench-stream-") as home,
    ):
        serve.start(http_options={"port": 0}, home=home)
        try:
            handle = serve.run(Tokens.bind(), name="stream", route_prefix="/stream")
            url = serve.status().http_url + "/stream"
            body = httpx.get(url).text
            if body != "".join(token(i).decode() for i in range(STREAM_CHUNKS)):
                raise AssertionError(f"unexpected streamed body: {body[:80]!r}...")
            address = _replica_address()
            _handle_streams(handle, 2)  # warm-up
            _bare_streams(address, 2)
            for _ in range(runs):
                _sample(bare_point, bare_url + "/stream", 5, duration)
                _sample(proxy_point, url, 5, duration)
            handle_s, _, _ = median_time(lambda: _handle_streams(handle, streams), runs)
            bare_s, _, _ = median_time(lambda: _bare_streams(address, streams), runs)
        finally:
            serve.shutdown()
    tokens = streams * STREAM_CHUNKS
    return [
        Record(
            "Streaming",
            f"HTTP, StreamingResponse of {STREAM_CHUNKS:,} chunks, one request at a time",
            proxy_point.rps * STREAM_CHUNKS,
            "tokens/s",
            "bare hypercorn app sending the same chunks",
            bare_point.rps * STREAM_CHUNKS,
            note=f"p50 per response {proxy_point.p50_ms:.1f} ms",
            key="stream_http",
        ),
        Record(
            "Streaming",
            f"handle `.options(stream=True)`, asyncio driver, {STREAM_CHUNKS:,} chunks",
            tokens / handle_s,
            "tokens/s",
            "bare RPC stream to the replica",
            tokens / bare_s,
            key="stream_handle",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRIOSERVE_HOME", tempfile.mkdtemp(prefix="trioserve-bench-"))
    print(markdown(records(args.quick)))


if __name__ == "__main__":
    main()
