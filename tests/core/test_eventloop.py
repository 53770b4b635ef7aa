"""Which event loop runs the calling thread (trioserve.core.eventloop)."""

from __future__ import annotations

import asyncio
import threading

import trio

from trioserve.core.eventloop import running_loop


def test_no_loop_outside_any() -> None:
    seen: list[tuple[str | None, object]] = []
    thread = threading.Thread(target=lambda: seen.append(running_loop()))
    thread.start()
    thread.join()
    assert seen == [(None, None)]


def test_asyncio_gives_its_loop() -> None:
    async def main() -> bool:
        library, loop = running_loop()
        return library == "asyncio" and loop is asyncio.get_running_loop()

    assert asyncio.run(main())


async def test_trio_gives_its_token() -> None:
    assert running_loop() == ("trio", trio.lowlevel.current_trio_token())
