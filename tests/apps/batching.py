"""Deployments with ``@serve.batch`` that the end-to-end batching tests run.

Importable by name (``import:`` sources). Each records the size of every batch
it runs, so that a test can check, through a handle, that concurrent calls
were batched.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import sniffio

import trioserve as serve


@serve.deployment(max_ongoing_requests=32)
class BatchedDoubler:
    """Doubles numbers, four at a time unless ``user_config`` says otherwise.

    ``batch_wait_timeout_s`` is long, so batches form by size only: 16
    concurrent calls make four batches of four, whatever their timing.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=60)
    async def __call__(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [2 * x for x in xs]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=60)
    async def count_to(self, ns: list[int]) -> AsyncIterator[list[Any]]:
        """Streams ``0 .. n-1`` to each caller, from one generator per batch."""
        self.sizes.append(len(ns))
        for step in range(max(ns)):
            yield [step if step < n else StopIteration for n in ns]

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.__call__.set_max_batch_size(config["max_batch_size"])

    async def batch_sizes(self) -> list[int]:
        """The sizes of the batches run so far; forgets them."""
        sizes, self.sizes = self.sizes, []
        return sizes

    async def max_batch_size(self) -> int:
        return int(self.__call__._get_max_batch_size())

    async def event_loop(self) -> str:
        return sniffio.current_async_library()

    async def pid(self) -> int:
        return os.getpid()
