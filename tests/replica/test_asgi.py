"""The replica's ASGI side: to_response, plain deployments, @serve.ingress with FastAPI, lifespan.

Apps run in-process under trio (one test runs them under asyncio): HTTP through
httpx's ``ASGITransport``, WebSockets and abandoned streams by hand with the
ASGI messages a proxy would send. Nothing sleeps; every wait has a deadline.
"""

import contextlib
import dataclasses
import datetime
import inspect
import logging
import pickle
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Scope

import trioserve as serve
from trioserve.exceptions import RayServeException
from trioserve.replica import asgi
from trioserve.replica.asgi import (
    Lifespan,
    current_servable,
    ingress,
    plain_app,
    set_servable,
    to_response,
)

DEADLINE_S = 10.0


@pytest.fixture(autouse=True)
def no_servable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no user object registered, and leaves none behind."""
    monkeypatch.setattr(asgi, "_servable", asgi._NO_SERVABLE)


# --------------------------------------------------------------------------- helpers


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def plain(fn: Callable[..., Any], *, takes_request: bool = True, deployment: str = "Echo") -> Any:
    """``plain_app`` over ``fn`` as a replica runs it: coroutines awaited, the rest in a thread."""

    async def call(args: tuple[Any, ...]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await anyio.to_thread.run_sync(fn, *args)

    return plain_app(call, takes_request=takes_request, deployment=deployment)


def http_scope(path: str = "/", headers: tuple[tuple[bytes, bytes], ...] = ()) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }


async def websocket_session(app: ASGIApp, path: str, texts: list[str]) -> list[Message]:
    """Connect to ``path``, send ``texts``, disconnect; the messages the app sent."""
    inbox: list[Message] = [
        {"type": "websocket.connect"},
        *({"type": "websocket.receive", "text": text} for text in texts),
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        **http_scope(path),
        "type": "websocket",
        "scheme": "ws",
        "subprotocols": [],
    }
    del scope["method"]
    with anyio.fail_after(DEADLINE_S):
        await app(scope, receive, send)
    return sent


# --------------------------------------------------------------------------- to_response


def test_str_is_utf8_plain_text() -> None:
    response = to_response("héllo")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.body == "héllo".encode()


def test_bytes_are_text_plain_without_charset_as_in_ray_serve() -> None:
    response = to_response(b"\x00\xff raw")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    assert response.body == b"\x00\xff raw"


def test_none_is_an_empty_200() -> None:
    response = to_response(None)
    assert response.status_code == 200
    assert response.body == b""
    assert response.headers["content-length"] == "0"


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ({"a": [1, 2.5, None, True]}, b'{"a":[1,2.5,null,true]}'),
        ([1, "x"], b'[1,"x"]'),
        (7, b"7"),
        ({"name": "café"}, '{"name":"café"}'.encode()),
        (float("nan"), b"NaN"),  # as Ray Serve writes it; Starlette would refuse it
    ],
)
def test_other_values_are_compact_json(value: Any, body: bytes) -> None:
    response = to_response(value)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.body == body


def test_a_starlette_response_is_sent_as_it_is() -> None:
    teapot = JSONResponse({"tea": True}, status_code=418, headers={"x-pot": "1"})
    assert to_response(teapot) is teapot
    plain_response = Response("x", media_type="text/csv")
    assert to_response(plain_response) is plain_response


class Price(BaseModel):
    amount: float
    currency: str = "EUR"


@dataclasses.dataclass
class Basket:
    items: list[str]
    at: datetime.date


class FakeArray:
    """Stands for a NumPy array: JSON through ``tolist()``, as Ray Serve's encoders do."""

    def tolist(self) -> list[int]:
        return [1, 2, 3]


def test_pydantic_dataclasses_and_arrays_become_json_even_when_nested() -> None:
    response = to_response(
        {
            "price": Price(amount=2.5),
            "basket": Basket(["tea"], datetime.date(2024, 5, 1)),
            "vector": FakeArray(),
        }
    )
    assert response.headers["content-type"] == "application/json"
    assert response.body == (
        b'{"price":{"amount":2.5,"currency":"EUR"},'
        b'"basket":{"items":["tea"],"at":"2024-05-01"},"vector":[1,2,3]}'
    )


class Opaque:
    __slots__ = ()


def test_a_value_json_cannot_encode_raises_type_error_naming_its_type() -> None:
    with pytest.raises(TypeError, match="Opaque"):
        to_response({"x": Opaque()})


# --------------------------------------------------------------------------- plain deployments


async def test_call_gets_the_request_and_its_body() -> None:
    async def echo(request: Request) -> dict[str, Any]:
        return {
            "method": request.method,
            "path": request.url.path,
            "q": request.query_params["q"],
            "body": await request.json(),
        }

    async with client(plain(echo)) as c:
        response = await c.post("/a/b?q=1", json={"k": [1, 2]})
    assert response.status_code == 200
    assert response.json() == {"method": "POST", "path": "/a/b", "q": "1", "body": {"k": [1, 2]}}


async def test_call_without_a_parameter_is_called_without_arguments() -> None:
    calls: list[tuple[Any, ...]] = []

    def hello(*args: Any) -> str:
        calls.append(args)
        return "hello"

    async with client(plain(hello, takes_request=False)) as c:
        response = await c.get("/anything")
    assert (response.status_code, response.text) == (200, "hello")
    assert calls == [()]


async def test_user_exception_is_a_500_naming_type_and_deployment_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(request: Request) -> str:
        raise KeyError("secret-detail")

    caplog.set_level(logging.ERROR, logger="trioserve.replica")
    async with client(plain(broken, deployment="Shop")) as c:
        response = await c.get("/buy", headers={"x-request-id": "req-42"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == (
        "Internal Server Error: KeyError in deployment 'Shop'; see the replica's log."
    )
    assert "secret-detail" not in response.text and "Traceback" not in response.text
    [record] = [r for r in caplog.records if r.name == "trioserve.replica"]
    assert "req-42" in record.getMessage() and "'Shop'" in record.getMessage()
    assert record.exc_info is not None and "secret-detail" in str(record.exc_info[1])


async def test_a_result_that_is_not_json_is_a_500_naming_type_error() -> None:
    async with client(plain(lambda request: Opaque(), deployment="D")) as c:
        response = await c.get("/")
    assert response.status_code == 500
    assert response.text.startswith("Internal Server Error: TypeError in deployment 'D'")


async def test_sync_generator_streams_each_item_from_a_worker_thread() -> None:
    threads: list[int] = []

    def stream(request: Request) -> Iterator[Any]:
        def items() -> Iterator[Any]:
            for item in ("a", b"b", {"c": 1}, "d"):
                threads.append(threading.get_ident())
                yield item

        return items()

    async with client(plain(stream)) as c:
        response = await c.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == 'ab{"c":1}\nd'
    assert len(threads) == 4 and threading.get_ident() not in threads


async def test_async_generator_streams_its_items() -> None:
    async def stream(request: Request) -> AsyncIterator[Any]:
        for item in ("x", {"n": 1}, {"n": 2}):
            yield item

    async with client(plain(stream)) as c:
        response = await c.get("/")
    assert response.status_code == 200
    assert response.text == 'x{"n":1}\n{"n":2}\n'


async def test_generator_failing_mid_stream_is_logged_and_aborts_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stream(request: Request) -> AsyncIterator[str]:
        yield "partial"
        raise ValueError("disk gone")

    caplog.set_level(logging.ERROR, logger="trioserve.replica")
    async with client(plain(stream, deployment="Logs")) as c:
        # The status was sent: the error reaches whoever relays the response.
        with pytest.raises(ValueError, match="disk gone"):
            await c.get("/", headers={"x-request-id": "req-7"})
    [record] = [r for r in caplog.records if r.name == "trioserve.replica"]
    assert "req-7" in record.getMessage() and "streaming" in record.getMessage()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_abandoned_stream_closes_the_generator(kind: str) -> None:
    closed = anyio.Event() if kind == "async" else threading.Event()

    def sync_items() -> Iterator[str]:
        try:
            yield "first"
            yield "never sent"
        finally:
            closed.set()

    async def async_items() -> AsyncIterator[str]:
        try:
            yield "first"
            yield "never sent"
        finally:
            closed.set()

    app = plain(lambda: sync_items() if kind == "sync" else async_items(), takes_request=False)
    bodies: list[bytes] = []
    with anyio.CancelScope() as client_gone:

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                bodies.append(message["body"])
                client_gone.cancel()
            await anyio.lowlevel.checkpoint()  # as a real send does: here the cancel lands

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        with anyio.fail_after(DEADLINE_S):
            await app(http_scope(), receive, send)
    assert bodies == [b"first"]
    assert closed.is_set()


async def test_plain_deployment_refuses_websockets_with_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = plain(lambda request: "never", deployment="Echo")
    sent = await websocket_session(app, "/ws", ["hi"])
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert sent[0]["code"] == 1008
    assert "Echo" in sent[0]["reason"]
    assert any("@serve.ingress" in r.getMessage() for r in caplog.records)


async def test_plain_deployment_answers_lifespan() -> None:
    async with Lifespan(plain(lambda request: "x")) as lifespan:
        assert lifespan.supported is True


# --------------------------------------------------------------------------- @serve.ingress


async def _hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hello from starlette")


starlette_app = Starlette(routes=[Route("/", _hello)])


@serve.ingress(starlette_app)
class StarletteIngress:
    pass


async def test_ingress_keeps_the_class_and_stores_the_app() -> None:
    assert isinstance(StarletteIngress, type)
    assert StarletteIngress.__trioserve_asgi_app__ is starlette_app  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(StarletteIngress)) is StarletteIngress
    async with client(starlette_app) as c:
        assert (await c.get("/")).text == "hello from starlette"

    async def raw_app(scope: Scope, receive: Any, send: Any) -> None:
        pass

    class Raw:
        pass

    assert ingress(raw_app)(Raw) is Raw
    assert Raw.__trioserve_asgi_app__ is raw_app  # type: ignore[attr-defined]


def test_ingress_on_a_function_raises_value_error() -> None:
    def handler() -> None:
        pass

    with pytest.raises(ValueError, match=r"^@serve\.ingress must be used with a class$"):
        ingress(FastAPI())(handler)  # type: ignore[type-var]


def test_ingress_on_a_class_with_call_raises_value_error() -> None:
    class Callable_:
        def __call__(self) -> None:
            pass

    with pytest.raises(ValueError, match="__call__"):
        ingress(FastAPI())(Callable_)


class Item(BaseModel):
    name: str
    price: float


class ItemOut(BaseModel):
    name: str


def page_size(size: int = 10) -> int:
    return min(size, 50)


def make_shop() -> tuple[FastAPI, type]:
    """A FastAPI app whose routes are mostly methods of the ``Shop`` class."""
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @ingress(app)
    class Shop:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting
            self.visits = 0
            self.items: dict[str, Item] = {}

        @app.get("/visit")
        async def visit(self) -> dict[str, Any]:
            self.visits += 1
            return {"greeting": self.greeting, "visits": self.visits}

        @app.get("/items/{item_id}")
        def get_item(self, item_id: int, q: str = "none", size: int = Depends(page_size)) -> Any:
            return {
                "item_id": item_id,
                "q": q,
                "size": size,
                "worker_thread": threading.get_ident() != main_thread,
                "greeting": self.greeting,
            }

        @app.post("/items", status_code=201, response_model=ItemOut)
        async def add_item(self, item: Item) -> Any:
            self.items[item.name] = item
            return {"name": item.name, "price": item.price, "internal": "hidden"}

        @app.get("/text", response_class=PlainTextResponse)
        def text(self) -> str:
            return f"{self.greeting}, {len(self.items)} items"

        @app.get("/stream")
        async def stream(self) -> StreamingResponse:
            async def chunks() -> AsyncIterator[bytes]:
                for name in sorted(self.items):
                    yield f"{name};".encode()

            return StreamingResponse(chunks(), media_type="text/csv")

        @app.websocket("/ws/{room}")
        async def chat(
            self, websocket: WebSocket, room: str, size: int = Depends(page_size)
        ) -> None:
            await websocket.accept()
            try:
                while True:
                    text = await websocket.receive_text()
                    self.visits += 1
                    await websocket.send_text(
                        f"{self.greeting} {room}: {text} #{self.visits} (size {size})"
                    )
            except WebSocketDisconnect:
                pass

    main_thread = threading.get_ident()
    return app, Shop


async def test_class_routes_share_the_user_objects_state() -> None:
    app, shop = make_shop()
    set_servable(shop("hi"))
    async with client(app) as c:
        first = (await c.get("/visit")).json()
        second = (await c.get("/visit")).json()
    assert first == {"greeting": "hi", "visits": 1}
    assert second == {"greeting": "hi", "visits": 2}
    assert current_servable().visits == 2


async def test_class_route_path_query_and_depends_in_a_sync_method() -> None:
    app, shop = make_shop()
    set_servable(shop("hi"))
    async with client(app) as c:
        response = await c.get("/items/7", params={"q": "red", "size": "99"})
        invalid = await c.get("/items/seven")
    assert response.status_code == 200
    assert response.json() == {
        "item_id": 7,
        "q": "red",
        "size": 50,
        "worker_thread": True,  # FastAPI runs a sync endpoint in a thread
        "greeting": "hi",
    }
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["path", "item_id"]


async def test_class_route_body_response_model_and_status_code() -> None:
    app, shop = make_shop()
    instance = shop("hi")
    set_servable(instance)
    async with client(app) as c:
        created = await c.post("/items", json={"name": "tea", "price": 2.5})
        invalid = await c.post("/items", json={"name": "tea"})
    assert created.status_code == 201
    assert created.json() == {"name": "tea"}  # response_model drops the other fields
    assert instance.items == {"tea": Item(name="tea", price=2.5)}
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "price"]


async def test_class_routes_with_plain_text_and_streaming_responses() -> None:
    app, shop = make_shop()
    set_servable(shop("hey"))
    async with client(app) as c:
        await c.post("/items", json={"name": "tea", "price": 1})
        await c.post("/items", json={"name": "cake", "price": 3})
        text = await c.get("/text")
        stream = await c.get("/stream")
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    assert text.text == "hey, 2 items"
    assert stream.headers["content-type"].startswith("text/csv")
    assert stream.text == "cake;tea;"


async def test_other_routes_of_the_app_and_its_openapi_still_work() -> None:
    app, shop = make_shop()
    set_servable(shop("hi"))
    async with client(app) as c:
        health = await c.get("/health")
        openapi = (await c.get("/openapi.json")).json()
    assert health.json() == {"ok": True}
    parameters = openapi["paths"]["/items/{item_id}"]["get"]["parameters"]
    assert [p["name"] for p in parameters] == ["item_id", "q", "size"]  # no "self"
    assert "/items" in openapi["paths"] and "/visit" in openapi["paths"]


async def test_class_websocket_route() -> None:
    app, shop = make_shop()
    set_servable(shop("hello"))
    sent = await websocket_session(app, "/ws/lobby", ["one", "two"])
    assert sent[0]["type"] == "websocket.accept"
    assert [m.get("text") for m in sent[1:]] == [
        "hello lobby: one #1 (size 10)",
        "hello lobby: two #2 (size 10)",
    ]


async def test_dependency_overrides_apply_to_class_routes() -> None:
    app, shop = make_shop()
    set_servable(shop("hi"))
    app.dependency_overrides[page_size] = lambda: 3
    async with client(app) as c:
        response = await c.get("/items/1")
    assert response.json()["size"] == 3
    sent = await websocket_session(app, "/ws/lobby", ["one"])
    assert sent[1]["text"] == "hi lobby: one #1 (size 3)"


async def test_a_class_route_outside_a_replica_fails_loudly() -> None:
    app, _ = make_shop()
    async with client(app) as c:
        with pytest.raises(RuntimeError, match="set_servable"):
            await c.get("/visit")


@pytest.mark.parametrize("include", ["before @serve.ingress", "after @serve.ingress"])
async def test_class_routes_on_an_included_router(include: str) -> None:
    app = FastAPI()
    router = APIRouter(prefix="/v1")

    class Counter:
        def __init__(self) -> None:
            self.count = 0

        @router.post("/count/{step}")
        def count(self, step: int) -> dict[str, int]:
            self.count += step
            return {"count": self.count}

    if include == "before @serve.ingress":
        app.include_router(router)
        ingress(app)(Counter)
    else:
        ingress(app)(Counter)
        app.include_router(router)  # as at the end of a module; set_servable binds it
    set_servable(Counter())
    async with client(app) as c:
        await c.post("/v1/count/2")
        response = await c.post("/v1/count/3")
    assert response.status_code == 200
    assert response.json() == {"count": 5}


async def test_inherited_route_methods_get_the_subclass_object() -> None:
    app = FastAPI()

    class Base:
        name = "base"

        @app.get("/name")
        def get_name(self) -> str:
            return self.name

    @ingress(app)
    class Child(Base):
        name = "child"

    set_servable(Child())
    async with client(app) as c:
        assert (await c.get("/name")).json() == "child"


def test_a_route_method_without_self_is_refused() -> None:
    app = FastAPI()

    class NoSelf:
        @app.get("/x")
        def x() -> int:  # type: ignore[misc]
            return 1

    with pytest.raises(RayServeException, match="self"):
        ingress(app)(NoSelf)


@pytest.mark.skipif(
    "stream_item_type" not in getattr(APIRoute, "__annotations__", {}),
    reason="this FastAPI does not stream JSON Lines from generator endpoints",
)
async def test_generator_class_route_streams_validated_json_lines() -> None:
    app = FastAPI()

    @ingress(app)
    class Feed:
        @app.get("/feed")
        async def feed(self) -> AsyncIterable[ItemOut]:
            for name in ("a", "b"):
                yield {"name": name, "internal": "hidden"}  # type: ignore[misc]

    set_servable(Feed())
    async with client(app) as c:
        response = await c.get("/feed")
    assert response.status_code == 200
    assert response.text.splitlines() == ['{"name":"a"}', '{"name":"b"}']


# --------------------------------------------------------------------------- lifespan


def app_with_lifespan(events: list[str], *, fail: str = "") -> tuple[FastAPI, type]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if fail == "startup":
            raise OSError("no model file")
        events.append("startup")
        yield {"model": "loaded-model"}
        events.append("shutdown")
        if fail == "shutdown":
            raise OSError("flush failed")

    app = FastAPI(lifespan=lifespan)

    @ingress(app)
    class Model:
        @app.get("/predict")
        def predict(self, request: Request) -> dict[str, str]:
            return {"model": request.state.model}

    return app, Model


async def test_lifespan_runs_startup_and_shutdown_and_requests_see_its_state() -> None:
    events: list[str] = []
    app, model = app_with_lifespan(events)
    set_servable(model())
    async with Lifespan(app) as lifespan:
        assert events == ["startup"]
        assert lifespan.supported is True
        async with client(lifespan.app_with_state()) as c:
            response = await c.get("/predict")
        assert response.json() == {"model": "loaded-model"}
    assert events == ["startup", "shutdown"]


async def test_lifespan_shuts_down_when_cancelled() -> None:
    events: list[str] = []
    app, _ = app_with_lifespan(events)
    with anyio.CancelScope() as scope:
        async with Lifespan(app):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert events == ["startup", "shutdown"]


async def test_lifespan_startup_failure_raises_runtime_error_with_the_cause() -> None:
    app, _ = app_with_lifespan([], fail="startup")
    with pytest.raises(RuntimeError, match="no model file"):
        async with Lifespan(app):
            pytest.fail("the block must not run")


async def test_lifespan_shutdown_failure_raises_runtime_error() -> None:
    events: list[str] = []
    app, _ = app_with_lifespan(events, fail="shutdown")
    with pytest.raises(RuntimeError, match="flush failed"):
        async with Lifespan(app):
            pass
    assert events == ["startup", "shutdown"]


async def test_apps_without_lifespan_support_start_silently() -> None:
    async def http_only(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"

    async def ignores_lifespan(scope: Scope, receive: Any, send: Any) -> None:
        return

    for app in (http_only, ignores_lifespan):
        async with Lifespan(app) as lifespan:
            assert lifespan.supported is False


async def test_lifespan_step_by_step_in_the_callers_task_group() -> None:
    events: list[str] = []
    app, _ = app_with_lifespan(events)
    lifespan = Lifespan(app)
    async with anyio.create_task_group() as tg:
        await lifespan.startup(tg)
        assert lifespan.state == {"model": "loaded-model"}
        await lifespan.shutdown()
    assert events == ["startup", "shutdown"]


# --------------------------------------------------------------------------- asyncio


def test_everything_also_runs_under_asyncio() -> None:
    async def body() -> None:
        events: list[str] = []
        app, model = app_with_lifespan(events)
        set_servable(model())
        async with Lifespan(app) as lifespan, client(lifespan.app_with_state()) as c:
            assert (await c.get("/predict")).json() == {"model": "loaded-model"}

        def stream(request: Request) -> Iterator[str]:
            return iter(["a", "b"])

        async with client(plain(stream)) as c:
            assert (await c.get("/")).text == "ab"
        assert events == ["startup", "shutdown"]

    anyio.run(body, backend="asyncio")
