"""The example application `make run` serves at http://127.0.0.1:8000.

Two deployments composed through a handle: the ingress reads the HTTP
request and asks the greeter, which runs in its own replica process.

    curl 'http://127.0.0.1:8000/?name=Ada'     # {"message": "Hello, Ada!"}
    curl http://127.0.0.1:8000/-/routes         # {"/": "default"}
"""

from __future__ import annotations

from starlette.requests import Request

import trioserve as serve
from trioserve.handle import DeploymentHandle


@serve.deployment(num_replicas=2)
class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def greet(self, name: str) -> str:
        return f"{self.greeting}, {name}!"


@serve.deployment
class Ingress:
    def __init__(self, greeter: DeploymentHandle) -> None:
        self.greeter = greeter

    async def __call__(self, request: Request) -> dict[str, str]:
        name = request.query_params.get("name", "world")
        return {"message": await self.greeter.greet.remote(name)}


app = Ingress.bind(Greeter.bind("Hello"))

if __name__ == "__main__":
    serve.run(app, blocking=True)
