"""Which event loop runs the calling thread: the one question about it that the
RPC layer, the log handler, the proxy and handles ask.

It imports no trio: a process that runs asyncio only (a replica, the proxy)
does not pay for importing it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import sniffio

__all__ = ["running_loop"]


def running_loop() -> tuple[str | None, Any]:
    """The event loop running in this thread: ("trio", its token), ("asyncio", the
    loop), (the name of another async library, None), or (None, None) when none
    runs; the same precedence as sniffio's."""
    library = sniffio.thread_local.name or sniffio.current_async_library_cvar.get()
    if library is None:
        loop = asyncio._get_running_loop()
        return (None, None) if loop is None else ("asyncio", loop)
    if library == "trio":  # trio runs, so it is imported
        return library, sys.modules["trio"].lowlevel.current_trio_token()
    if library == "asyncio":
        return library, asyncio.get_running_loop()
    return library, None
