"""The proxy's ASGI app (trioserve.proxy.app): route matching and its own paths.

Forwarding to replicas is covered end to end in ``tests/e2e/test_http.py``;
here the app runs in process, driven by httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from trioserve.core.config import HTTPOptions
from trioserve.proxy.app import ProxyApp, _TaskScope, match_route

ROUTES = {"/": "root", "/a": "a", "/a/b": "ab", "/api": "api"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a", "/a"),
        ("/a/", "/a"),
        ("/a/x", "/a"),
        ("/a/b", "/a/b"),
        ("/a/b/c", "/a/b"),
        ("/ab", "/"),  # a prefix matches whole path segments only
        ("/api/v1", "/api"),
        ("/", "/"),
        ("/other", "/"),
    ],
)
def test_longest_matching_prefix_wins(path: str, expected: str) -> None:
    assert match_route(ROUTES, path) == expected


def test_no_route_matches_without_a_root_application() -> None:
    routes = {"/a": "a"}
    assert match_route(routes, "/b") is None
    assert match_route(routes, "/ab") is None
    assert match_route({}, "/") is None


FOLLOWED: list[tuple[str, str]] = []


def no_router(app: str, deployment: str) -> Any:
    """A proxy follows each route's replica set as the route table arrives; a test
    with this router sends nothing that routes to a replica."""
    FOLLOWED.append((app, deployment))
    return None


def client(app: ProxyApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")


async def test_healthz_and_routes_are_503_until_an_application_is_exposed() -> None:
    app = ProxyApp(no_router, HTTPOptions())
    async with client(app) as c:
        for path in ("/-/healthz", "/-/routes"):
            r = await c.get(path)
            assert (r.status_code, r.text) == (503, "Route table is not populated yet.")
        app.update_routes({})  # only applications without a route prefix
        assert (await c.get("/-/healthz")).status_code == 503
        FOLLOWED.clear()
        app.update_routes({"/a": {"app": "ay", "ingress": "A"}})
        assert FOLLOWED == [("ay", "A")]  # its replica set, before any request needs it
        r = await c.get("/-/healthz")
        assert (r.status_code, r.text) == (200, "success")
        assert FOLLOWED == [("ay", "A")]  # the proxy's own paths route nowhere
        app.draining = True
        for path in ("/-/healthz", "/-/routes"):
            r = await c.get(path)
            assert (r.status_code, r.text) == (503, "This node is being drained.")


async def test_routes_maps_each_prefix_to_its_application() -> None:
    app = ProxyApp(no_router, HTTPOptions())
    app.update_routes({"/b": {"app": "bee", "ingress": "B"}, "/a": {"app": "ay", "ingress": "A"}})
    async with client(app) as c:
        r = await c.get("/-/routes")
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"/a": "ay", "/b": "bee"}


async def test_unknown_path_is_404_with_a_request_id_and_a_pointer_to_routes() -> None:
    app = ProxyApp(no_router, HTTPOptions())
    app.update_routes({"/a": {"app": "ay", "ingress": "A"}})
    async with client(app) as c:
        r = await c.get("/nope", headers={"x-request-id": "r-1"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "r-1"
    assert r.text == "Path '/nope' not found. Ping http://.../-/routes for available routes."


async def test_declared_body_over_the_limit_is_413_before_any_routing() -> None:
    app = ProxyApp(no_router, HTTPOptions(max_request_body_bytes=10))
    app.update_routes({"/": {"app": "root", "ingress": "R"}})
    async with client(app) as c:
        r = await c.post("/", content=b"x" * 11)
    assert r.status_code == 413 and "10 bytes" in r.text


def test_a_task_scope_cancelled_by_the_watchdog_ends_its_block_quietly() -> None:
    """The whole-request path's cancel scope on asyncio: the request's task goes
    on after the block (to answer 408, say), and is not left cancelled."""

    async def main() -> list[str]:
        seen: list[str] = []
        scope = _TaskScope()

        async def request() -> None:
            with scope:
                await asyncio.sleep(3600)
                seen.append("not cancelled")
            seen.append("after the block")
            await asyncio.sleep(0)  # no cancellation left pending
            seen.append("still running")

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        scope.cancel()
        await task
        return seen

    assert asyncio.run(main()) == ["after the block", "still running"]


def test_a_task_scope_lets_a_cancellation_from_elsewhere_through() -> None:
    """The server stopping cancels the request's task too: that goes on."""

    async def main() -> bool:
        scope = _TaskScope()

        async def request() -> None:
            with scope:
                await asyncio.sleep(3600)

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        scope.cancel()
        task.cancel()  # the server's own, in the same turn
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())
