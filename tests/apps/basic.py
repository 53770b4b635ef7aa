"""Deployments the runtime tests run in real replica processes.

Behaviour is steered through ``init`` arguments and through files in a folder
the test owns (``flags``), so that a test can change what a running replica
does (make its health check hang, say) and observe what it did (the pid it
ran in, that ``__del__`` was called) without any extra channel.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio


class Echo:
    """Returns what it is given, and records its lifecycle in ``flags``.

    A file ``unhealthy.<pid>`` makes that replica's health check raise,
    ``hang.<pid>`` makes it hang; ``deleted.<pid>`` appears when ``__del__`` ran.
    """

    def __init__(self, flags: str | None = None, tag: str = "v1") -> None:
        self.flags = Path(flags) if flags else None
        self.tag = tag
        self.user_config: Any = None
        self.thread_ids: set[int] = set()

    async def __call__(self, value: Any = None) -> Any:
        return {"value": value, "pid": os.getpid(), "tag": self.tag}

    async def slow(self, seconds: float, value: Any = None) -> Any:
        await anyio.sleep(seconds)
        return value

    async def wait_for_flag(self, name: str) -> str:
        """Return once the file ``flags/name`` exists (steered by the test)."""
        assert self.flags is not None
        (self.flags / f"{name}.started.{os.getpid()}").touch()
        while not (self.flags / name).exists():
            await anyio.sleep(0.02)
        return name

    def blocking(self, seconds: float) -> dict[str, Any]:
        """A sync method: runs in a worker thread, not on the event loop."""
        time.sleep(seconds)
        return {"thread": threading.get_ident(), "main": threading.main_thread().ident}

    def loop_name(self) -> str:
        import sniffio

        return sniffio.current_async_library()

    async def aloop_name(self) -> str:
        import sniffio

        return sniffio.current_async_library()

    async def count(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    def reconfigure(self, user_config: Any) -> None:
        self.user_config = user_config
        if self.flags is not None:
            (self.flags / f"reconfigured.{os.getpid()}").write_text(repr(user_config))

    async def get_user_config(self) -> Any:
        return self.user_config

    def check_health(self) -> None:
        if self.flags is None:
            return
        pid = os.getpid()
        if (self.flags / f"unhealthy.{pid}").exists():
            raise RuntimeError("the test made this replica unhealthy")
        while (self.flags / f"hang.{pid}").exists():
            time.sleep(0.05)

    def __del__(self) -> None:
        if self.flags is not None:
            (self.flags / f"deleted.{os.getpid()}").touch()


class FailingConstructor:
    def __init__(self) -> None:
        raise ValueError("model weights not found at /models/missing.bin")


def plain_function(x: int = 0) -> int:
    return x + 1
