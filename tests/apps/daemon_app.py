"""Applications the daemon tests deploy from config files."""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request

import trioserve as serve


@serve.deployment
class Hello:
    """Greets, and tells which replica process answered."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"greeting": self.greeting, "pid": os.getpid()}


app = Hello.bind()


def greeter(args: dict[str, str]) -> serve.Application:
    """A builder: ``greeting=...`` chooses the greeting."""
    return Hello.bind(args.get("greeting", "hello"))
