"""Ray Serve's ``DAGDriver``: one ingress that routes to several applications. Deprecated.

``DAGDriver.bind({"/a": app_a.bind(), "/b": app_b.bind()})`` makes an
application whose ingress calls ``app_a`` for the path ``/a`` and ``app_b``
for ``/b``; ``DAGDriver.bind(app.bind())`` serves one application at ``/``.
Over a handle, ``predict(...)`` calls the only application and
``predict_with_route(path, ...)`` the one at ``path``. Over HTTP, the request
goes through ``http_adapter`` (default: the JSON body) to the application of
the request's path. Binding it warns once: the current form binds the ingress
deployment directly and gives each application its own ``route_prefix``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from trioserve.core.deployment import Application, Deployment
from trioserve.exceptions import RayServeException, warn_deprecated
from trioserve.handle import DeploymentHandle

__all__ = ["DAGDriver", "json_request"]


async def json_request(request: Any) -> Any:
    """The request's JSON body (the adapter Ray Serve's examples use)."""
    return await request.json()


class _DAGDriver:
    def __init__(
        self,
        dags: DeploymentHandle | Mapping[str, DeploymentHandle],
        http_adapter: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        if isinstance(dags, DeploymentHandle):
            self.dags = {"/": dags}
        elif isinstance(dags, Mapping):
            for route in dags:
                if not isinstance(route, str) or not route.startswith("/"):
                    raise ValueError(
                        f"DAGDriver routes must be paths starting with '/', got {route!r}"
                    )
            self.dags = dict(dags)
        else:
            raise TypeError(
                "DAGDriver.bind() takes a bound application, or a dict of paths to bound "
                f"applications; got {dags!r}"
            )
        self.http_adapter = http_adapter or json_request

    def _handle(self, route: str) -> DeploymentHandle:
        handle = self.dags.get(route)
        if handle is None:
            raise RayServeException(
                f"DAGDriver has no route {route!r}; its routes are {sorted(self.dags)}."
            )
        return handle

    async def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Call the only bound application."""
        if len(self.dags) != 1:
            raise RayServeException(
                f"DAGDriver has {len(self.dags)} routes; use predict_with_route(route, ...)."
            )
        return await next(iter(self.dags.values())).remote(*args, **kwargs)

    async def predict_with_route(self, route_path: str, *args: Any, **kwargs: Any) -> Any:
        """Call the application bound at ``route_path``."""
        return await self._handle(route_path).remote(*args, **kwargs)

    async def __call__(self, request: Any) -> Any:
        root = request.scope.get("root_path", "")
        path = request.url.path
        if root and path.startswith(root):
            path = path[len(root) :]
        handle = self._handle(path or "/")
        return await handle.remote(await self.http_adapter(request))


class _DeprecatedDeployment(Deployment):
    def bind(self, *args: Any, **kwargs: Any) -> Application:
        warn_deprecated(
            "DAGDriver",
            "binding the ingress deployment directly (serve.run(app, route_prefix=...) per "
            "application, and handles for composition)",
        )
        return super().bind(*args, **kwargs)


DAGDriver = _DeprecatedDeployment(_DAGDriver, {"name": "DAGDriver"})
