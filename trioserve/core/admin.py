"""The admin API: the daemon controller's operations over HTTP, for the CLI and for tools.

:func:`admin_app` is an ASGI app (Starlette, so it runs on trio like the
controller); :func:`serve_admin` serves it with hypercorn. Every path under
``/api/`` needs the instance secret as a bearer token
(``Authorization: Bearer <secret>``); ``/-/healthz`` and ``/-/metrics`` do not,
as on the proxy. Requests and answers are JSON. ``docs/admin-api.md`` lists
the routes with their bodies and status codes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from trioserve.core.controller import Controller

__all__ = ["ADMIN_PREFIX", "admin_app", "bind_admin_socket", "serve_admin"]

log = logging.getLogger("trioserve.admin")

ADMIN_PREFIX = "/api/serve"
"""Where the admin routes live, as Ray's dashboard serves its Serve REST API."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def admin_app(
    controller: Controller,
    secret: bytes,
    shutdown: Callable[[], None],
    metrics: Callable[[], Awaitable[bytes]] | None = None,
) -> Starlette:
    """The admin API of ``controller``, guarded by ``secret``.

    ``shutdown`` is called (once the answer is on its way) when a client asks
    the daemon to stop; ``metrics`` gives the Prometheus text for ``/-/metrics``.
    """

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return _error(
                    401,
                    "missing or wrong bearer token: send the instance secret "
                    "(the file `secret` in the daemon's folder) as "
                    "`Authorization: Bearer <secret>`",
                )
            return await handler(request)

        return endpoint

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("success")

    async def get_metrics(request: Request) -> Response:
        if metrics is None:
            return _error(404, "metrics are not served by this instance")
        body = await metrics()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def get_status(request: Request) -> Response:
        return JSONResponse(await controller.status())

    async def put_applications(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("applications"), list):
            return _error(400, 'the body must be {"config": {...}, "applications": [...]}')
        try:
            blobs = {
                str(digest): base64.b64decode(data, validate=True)
                for digest, data in dict(body.get("blobs") or {}).items()
            }
            outcome = await controller.deploy_config(
                dict(body.get("config") or {}), body["applications"], blobs
            )
        except (ValueError, TypeError, KeyError, binascii.Error) as exc:
            return _error(400, f"{type(exc).__name__}: {exc}")
        return JSONResponse(outcome)

    async def delete_application(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in controller.state.apps:
            return _error(404, f"Application '{name}' does not exist.")
        await controller.delete(name)
        return JSONResponse({"deleted": name})

    async def get_config(request: Request) -> Response:
        config = controller.state.deployed_config
        if config is None:
            return _error(404, "no config file has been deployed to this instance")
        return JSONResponse(config)

    async def stop() -> None:
        shutdown()  # in the event loop: Starlette runs sync background tasks in threads

    async def post_shutdown(request: Request) -> Response:
        return JSONResponse(
            {"shutting_down": True}, status_code=202, background=BackgroundTask(stop)
        )

    return Starlette(
        routes=[
            Route("/-/healthz", healthz, methods=["GET"]),
            Route("/-/metrics", get_metrics, methods=["GET"]),
            Route(f"{ADMIN_PREFIX}/applications/", guarded(get_status), methods=["GET"]),
            Route(f"{ADMIN_PREFIX}/applications/", guarded(put_applications), methods=["PUT"]),
            Route(
                f"{ADMIN_PREFIX}/applications/{{name}}",
                guarded(delete_application),
                methods=["DELETE"],
            ),
            Route(f"{ADMIN_PREFIX}/config", guarded(get_config), methods=["GET"]),
            Route(f"{ADMIN_PREFIX}/shutdown", guarded(post_shutdown), methods=["POST"]),
        ]
    )


def bind_admin_socket(host: str, port: int) -> socket.socket:
    """A listening socket for the admin API at ``host:port`` (0: a free port).

    Raises ``OSError`` when the port is taken, before anything else starts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_admin(
    app: Any,
    sock: socket.socket,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on trio on ``sock`` (see :func:`bind_admin_socket`)
    until cancelled; ``task_status.started`` gets the URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    host, bound = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}"
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("trioserve.admin.hypercorn")
    task_status.started(url)
    await serve(app, config, mode="asgi")
