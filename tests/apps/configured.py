"""Applications that config files and ``trioserve run`` / ``build`` serve in the tests.

Importable by name (``tests.apps.configured:...``), as a user's module would be.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

import trioserve as serve
from trioserve.handle import DeploymentHandle


@serve.deployment(max_ongoing_requests=7)
class Multiplier:
    """Multiplies by ``factor`` from its user_config (default 2)."""

    def __init__(self) -> None:
        self.factor = 2

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.factor = int(config.get("factor", 2))

    def __call__(self, value: int) -> int:
        return value * self.factor


@serve.deployment
class Adder:
    def __init__(self, increment: int = 1) -> None:
        self.increment = increment

    def __call__(self, value: int) -> int:
        return value + self.increment


@serve.deployment(num_replicas=1)
class Calculator:
    """``GET /?value=3`` → ``(3 * factor) + increment``, and the environment it sees."""

    def __init__(self, multiplier: DeploymentHandle, adder: DeploymentHandle) -> None:
        self.multiplier = multiplier
        self.adder = adder

    async def __call__(self, request: Request) -> dict[str, Any]:
        value = int(request.query_params.get("value", "1"))
        product = await self.multiplier.remote(value)
        total = await self.adder.remote(product)
        return {"result": total, "mode": os.environ.get("CALC_MODE", "")}


app = Calculator.bind(Multiplier.bind(), Adder.bind(10))


@serve.deployment
class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def __call__(self, request: Request) -> str:
        return f"{self.greeting}, {request.query_params.get('name', 'world')}!"


greeter = Greeter.bind("hello")


def build_greeter(args: dict[str, str]) -> serve.Application:
    """A builder function: ``greeting=...`` chooses the greeting."""
    return Greeter.bind(args.get("greeting", "hello"))


class GreeterArgs(BaseModel):
    greeting: str = "hi"
    repeat: int = 1


def build_typed_greeter(args: GreeterArgs) -> serve.Application:
    """A builder whose args are a pydantic model (converted and validated, as in Ray)."""
    return Greeter.bind(" ".join([args.greeting] * args.repeat))


def build_nothing(args: dict[str, str]) -> Any:
    return 42


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("the model file weights.bin is missing")

    def __call__(self) -> str:
        return "never"


broken = Broken.bind()

not_an_app = 42
