"""Deployments the API and handle tests run, importable by name (``import:`` sources).

The Ray Serve key-concepts examples live in ``examples/`` as scripts (their
code travels by value); these are the same shapes plus what the handle tests
need to steer: slow calls, failures, streams, composition.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

import trioserve as serve
from trioserve.handle import DeploymentHandle


@serve.deployment
class Greeter:
    def __init__(self, msg: str) -> None:
        self._msg = msg

    def __call__(self) -> str:
        return self._msg


@serve.deployment
class Hello:
    def __call__(self) -> str:
        return "Hello"


@serve.deployment
class World:
    def __call__(self) -> str:
        return " world!"


@serve.deployment
class Ingress:
    def __init__(self, hello_handle: DeploymentHandle, world_handle: DeploymentHandle) -> None:
        self._hello_handle = hello_handle
        self._world_handle = world_handle

    async def __call__(self) -> str:
        hello_response = self._hello_handle.remote()
        world_response = self._world_handle.remote()
        return (await hello_response) + (await world_response)


@serve.deployment
class Worker:
    """Steerable: echo, sleep, fail, stream, report where it runs."""

    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag

    async def __call__(self, value: Any = None) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    async def whoami(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {
            "pid": os.getpid(),
            "tag": self.tag,
            "app": ctx.app_name,
            "deployment": ctx.deployment,
            "replica": ctx.replica_id,
            "model": serve.get_multiplexed_model_id(),
        }

    async def sleep(self, seconds: float, value: Any = None) -> Any:
        await anyio.sleep(seconds)
        return value

    async def sleep_then_flag(self, seconds: float, path: str) -> str:
        """Sleep, then write ``path``: a cancelled call never writes it."""
        try:
            await anyio.sleep(seconds)
        finally:
            pass
        with open(path, "w") as f:
            f.write("finished")
        return "finished"

    async def endless(self, path: str):  # type: ignore[no-untyped-def]
        """Yield forever; write ``path`` when the generator is stopped."""
        try:
            i = 0
            while True:
                yield i
                i += 1
                await anyio.sleep(0.01)
        finally:
            with open(path, "w") as f:
                f.write("stopped")

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def die(self) -> None:
        os._exit(3)

    async def count(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    def add(self, a: int, b: int) -> int:
        return a + b

    def cuda(self) -> str | None:
        """The GPUs this replica was given."""
        return os.environ.get("CUDA_VISIBLE_DEVICES")


@serve.deployment
def double(x: int) -> int:
    return 2 * x


@serve.deployment
class Adder:
    """Ray Serve's ``get_deployment_handle`` example: ``handle(val) * multiple + increment``."""

    def __init__(self, handle: DeploymentHandle, increment: int) -> None:
        self._handle = handle
        self._increment = increment

    async def __call__(self, val: int) -> int:
        return await self._handle.remote(val) + self._increment

    async def via_lookup(self, val: int) -> int:
        """Find the downstream by name from inside the replica (app name defaulted)."""
        handle = serve.get_deployment_handle("double")
        return await handle.remote(val) + self._increment

    async def nested(self, handles: dict[str, list[DeploymentHandle]], val: int) -> int:
        return await handles["inner"][0].remote(val)


@serve.deployment
class Holder:
    """Holds handles nested inside containers (model composition beyond top-level args)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.models: list[DeploymentHandle] = config["models"]
        self.scale = config["scale"]

    async def __call__(self, x: int) -> list[int]:
        return [await m.remote(x) * self.scale for m in self.models]


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("the model file is missing")


@serve.deployment
class SyncCaller:
    """A sync method calling another deployment with ``.result()`` (runs in a worker thread)."""

    def __init__(self, downstream: DeploymentHandle) -> None:
        self.downstream = downstream

    def __call__(self, x: int) -> int:
        return self.downstream.remote(x).result(timeout_s=60)

    async def result_in_loop(self, x: int) -> str:
        try:
            self.downstream.remote(x).result()
        except RuntimeError as exc:
            return str(exc)
        return "no error"


@serve.deployment
class Gated:
    """Calls a test steers through marker files, so that it waits on what the
    replica did rather than on time.

    ``hold(base)`` writes ``<base>.started`` once it runs in the replica, then
    waits until ``<base>.gate`` exists and writes ``<base>.finished``; if it is
    cancelled meanwhile, it writes ``<base>.cancelled`` (and never finishes).
    """

    async def __call__(self, value: Any = None) -> Any:
        return value

    def add(self, a: int, b: int) -> int:
        return a + b

    async def hold(self, base: str, value: Any = None) -> Any:
        _touch(f"{base}.started")
        try:
            while not os.path.exists(f"{base}.gate"):
                await anyio.sleep(0.01)
        except anyio.get_cancelled_exc_class():
            _touch(f"{base}.cancelled")
            raise
        _touch(f"{base}.finished")
        return value


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("")
