"""Deployments the HTTP tests serve through the proxy.

Importable by name, so replicas import them rather than unpickle them. Tests
coordinate with replicas through files (``gate`` and ``mark`` query
parameters name them): a replica process cannot share an event with the test.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

import trioserve as serve


async def wait_for_file(path: str, timeout_s: float = 60.0) -> None:
    """Wait (polling) until the test creates ``path``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not os.path.exists(path):
        if loop.time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


def touch(path: str, text: str = "") -> None:
    """Create ``path`` holding ``text``, whole: a reader never sees it empty."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@serve.deployment
class Echo:
    """Describes the request it got."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path", ""),
            "query": dict(request.query_params),
            "body_bytes": len(body),
            "request_id": request.headers.get("x-request-id"),
            "replica": serve.get_replica_context().replica_id,
        }


@serve.deployment
class Returns:
    """Returns what the query parameter ``kind`` names, to show each conversion."""

    async def __call__(self, request: Request) -> Any:
        kind = request.query_params["kind"]
        if kind == "str":
            return "héllo"
        if kind == "bytes":
            return b"\x00\x01raw"
        if kind == "none":
            return None
        if kind == "dict":
            return {"a": [1, 2], "b": None}
        if kind == "response":
            return Response("teapot", status_code=418, headers={"x-made-by": "user"})
        if kind == "dated":
            return Response("old news", headers={"date": "Mon, 01 Jan 2024 00:00:00 GMT"})
        raise ValueError(f"unknown kind {kind}")


@serve.deployment
def no_argument() -> str:
    return "no request needed"


@serve.deployment
class Boom:
    def __call__(self, request: Request) -> str:
        raise ValueError("a secret detail that must not reach the client")


@serve.deployment
class Slow:
    """Sleeps ``s`` seconds; marks ``mark`` when it starts and ``mark``.cancelled if cancelled."""

    async def __call__(self, request: Request) -> str:
        mark = request.query_params.get("mark")
        if mark:
            touch(mark)
        try:
            gate = request.query_params.get("gate")
            if gate:
                await wait_for_file(gate)
            else:
                await asyncio.sleep(float(request.query_params.get("s", "60")))
        except asyncio.CancelledError:
            if mark:
                touch(mark + ".cancelled")
            raise
        return "slept"


@serve.deployment
class Chunks:
    """Streams ``first``, waits for ``gate``, then streams ``last`` (also as SSE).

    With ``before``, it waits for that file before its first chunk too.
    """

    async def __call__(self, request: Request) -> StreamingResponse:
        gate = request.query_params["gate"]
        before = request.query_params.get("before")
        sse = request.query_params.get("sse") == "1"

        async def produce() -> Any:
            if before:
                await wait_for_file(before)
            yield "data: first\n\n" if sse else "first;"
            await wait_for_file(gate)
            yield "data: last\n\n" if sse else "last"

        return StreamingResponse(produce(), media_type="text/event-stream" if sse else "text/plain")


@serve.deployment
class Generator:
    """A plain generator return value streams too."""

    def __call__(self, request: Request) -> Any:
        def numbers() -> Any:
            for i in range(3):
                yield f"{i},"

        return numbers()


@serve.deployment
class Upload:
    """Reads the body chunk by chunk; marks ``mark`` after the first chunk arrived."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        mark = request.query_params["mark"]
        sizes = []
        async for chunk in request.stream():
            if chunk:
                sizes.append(len(chunk))
                if len(sizes) == 1:
                    touch(mark)
        return {"chunks": sizes, "total": sum(sizes)}


@serve.deployment(num_replicas=2)
class Mortal:
    """``/die`` kills the replica mid-request; anything else names the replica."""

    def __call__(self, request: Request) -> str:
        if request.url.path.endswith("/die"):
            os._exit(1)
        return serve.get_replica_context().replica_id


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Narrow:
    """One request at a time, one waiting: the third gets 503."""

    async def __call__(self, request: Request) -> str:
        touch(request.query_params["mark"] + "." + request.query_params["n"])
        await wait_for_file(request.query_params["gate"])
        return "done"


@serve.deployment
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    def __call__(self) -> str:
        return self.version


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("this constructor always fails")

    def __call__(self) -> str:
        return "never"


# ------------------------------------------------------------------- FastAPI


class Item(BaseModel):
    name: str
    price: float


def started_at(request: Request) -> bool:
    return bool(getattr(request.app.state, "started", False))


class _Lifespan:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __aenter__(self) -> None:
        self.app.state.started = True

    async def __aexit__(self, *exc: object) -> None:
        self.app.state.started = False


api = FastAPI(lifespan=_Lifespan)


@api.get("/plain")
def plain_route() -> dict[str, str]:
    return {"route": "not a method"}


@serve.deployment
@serve.ingress(api)
class Api:
    def __init__(self, greeting: str = "Hello") -> None:
        self.greeting = greeting
        self.count = 0

    @api.get("/hello/{name}")
    def hello(self, name: str, punct: str = "!") -> str:
        return f"{self.greeting}, {name}{punct}"

    @api.post("/items", status_code=201)
    async def create(self, item: Item) -> dict[str, Any]:
        return {"name": item.name, "price_with_tax": round(item.price * 1.2, 2)}

    @api.get("/count")
    def increment(self) -> int:
        self.count += 1
        return self.count

    @api.get("/started")
    def started(self, flag: bool = Depends(started_at)) -> dict[str, bool]:
        return {"started": flag}

    @api.get("/text", response_class=PlainTextResponse)
    def text(self) -> str:
        return "plain text"

    @api.get("/root")
    def root(self, request: Request) -> dict[str, str]:
        return {"root_path": request.scope.get("root_path", ""), "path": request.url.path}

    @api.get("/stream")
    def stream(self, gate: str) -> StreamingResponse:
        async def produce() -> Any:
            yield "first;"
            await wait_for_file(gate)
            yield "last"

        return StreamingResponse(produce(), media_type="text/plain")

    @api.get("/later")
    def later(self, mark: str, tasks: BackgroundTasks) -> str:
        tasks.add_task(touch, mark, "ran after the response")
        return "answered"

    @api.websocket("/ws")
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close()
                return
            await websocket.send_text(f"{self.greeting}: {text}")


FAST_SCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "look_back_period_s": 1.0,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 2.0,
}


@serve.deployment(max_ongoing_requests=2, autoscaling_config=FAST_SCALING)
class Busy:
    """Holds each call until ``gate`` exists; names the replica."""

    async def __call__(self, gate: str) -> str:
        await wait_for_file(gate)
        return serve.get_replica_context().replica_id


@serve.deployment(
    autoscaling_config={
        **FAST_SCALING,
        "min_replicas": 0,
        "initial_replicas": 1,
        "downscale_to_zero_delay_s": 1.0,
    }
)
class Sleepy:
    async def __call__(self) -> str:
        return "awake"


@serve.deployment
class Flaky:
    """Serves its version; the version "bad" fails in the constructor."""

    def __init__(self, version: str) -> None:
        if version == "bad":
            raise RuntimeError("version bad cannot start")
        self.version = version

    def __call__(self) -> str:
        return self.version


@serve.deployment(graceful_shutdown_timeout_s=0.5)
class Stubborn:
    """Will not stop: its ``__del__`` never returns."""

    def __call__(self) -> str:
        return "here"

    def __del__(self) -> None:
        import time

        time.sleep(3600)


@serve.deployment
class Firehose:
    """Streams 200 KB chunks until the client leaves (frames larger than 64 KiB)."""

    async def __call__(self, request: Request) -> StreamingResponse:
        async def produce() -> Any:
            while True:
                yield b"x" * 200_000

        return StreamingResponse(produce(), media_type="application/octet-stream")
