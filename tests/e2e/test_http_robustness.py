"""The HTTP proxy against clients that misbehave, hold connections, upgrade, or stay connected.

One instance serves the whole module (``Echo`` at ``/echo``, ``Upload`` at
``/upload``, the FastAPI ``Api`` at ``/api``); the rolling update adds its own
application. Every test ends with what a user would check: a normal request
still gets the right answer.

Nothing here sleeps and hopes: a test waits on something it can observe (a
file a replica creates, a line in the proxy's log, a response) with a
generous deadline. Each test first waits until the deployments it uses
serve, so that a replica an earlier test crashed fails that test only; the
module's fixture then fails if any replica of its applications was replaced.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.apps import web
from tests.conftest import assert_replicas_gone, replica_pids

DEADLINE_S = 60.0
"""How long a test waits for something it expects to happen."""
SOCKET_TIMEOUT_S = 30.0
"""How long a raw socket waits for the proxy to answer or close."""


@dataclass
class Proxy:
    """Where the module's instance serves HTTP, and its state dir."""

    url: str
    home: Path

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    @property
    def log_file(self) -> Path:
        return self.home / "latest" / "logs" / "proxy.log"

    def proxy_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no proxy log)"

    def logs(self) -> str:
        """Every log of the instance (proxy and replicas), for an assertion message."""
        parts = []
        for path in sorted((self.home / "latest" / "logs").glob("*.log")):
            parts.append(f"----- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def replica_logs(self) -> str:
        parts = []
        for path in sorted((self.home / "latest" / "logs").glob("replica-*.log")):
            parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=SOCKET_TIMEOUT_S)
        sock.settimeout(SOCKET_TIMEOUT_S)
        return sock


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One embedded instance for the module, shut down as ``serve_instance`` does."""
    import trioserve as serve

    home = tmp_path_factory.mktemp("robustness") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIOSERVE_HOME", str(home))
        serve.start()
        pids: set[int] = set()
        try:
            serve.run(web.Echo.bind(), name="echo", route_prefix="/echo")
            serve.run(web.Upload.bind(), name="upload", route_prefix="/upload")
            serve.run(web.Api.bind("Hi"), name="api", route_prefix="/api")
            first = _replica_ids(serve.status(), MODULE_APPS)
            proxy = Proxy(serve.status().http_url, home)
            yield proxy
            status = serve.status()
            last = _replica_ids(status, MODULE_APPS)
            pids = replica_pids(status)
        finally:
            serve.shutdown()
    assert_replicas_gone(pids)
    failures = [line for line in proxy.replica_logs().splitlines() if "the replica failed" in line]
    assert last == first, (
        f"replicas were replaced while the module ran: {first} -> {last}\n" + "\n".join(failures)
    )


MODULE_APPS = ("echo", "upload", "api")


def _replica_ids(status: Any, apps: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        name: sorted(
            r.replica_id
            for dep in status.applications[name].deployments.values()
            for r in dep.replicas
        )
        for name in apps
    }


# ------------------------------------------------------------------ helpers


def wait_until(predicate: Callable[[], bool], what: str, on_fail: Callable[[], str]) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``DEADLINE_S``."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {DEADLINE_S} s\n{on_fail()}")
        time.sleep(0.02)


def wait_for_proxy_log(proxy: Proxy, request_id: str) -> str:
    """Wait until the proxy logged the end of the request ``request_id``; return that line."""
    pattern = re.compile(rf"^.* {re.escape(request_id)} [A-Z]+ /.*$", re.MULTILINE)
    found: list[str] = []

    def logged() -> bool:
        match = pattern.search(proxy.proxy_log())
        if match:
            found.append(match.group(0))
        return bool(match)

    wait_until(logged, f"the proxy logging the end of request {request_id}", proxy.logs)
    return found[0]


def wait_until_serving(proxy: Proxy, path: str) -> None:
    """Wait until ``GET path`` gets 200: the test starts with its deployment serving."""

    def serving() -> bool:
        try:
            return httpx.get(proxy.url + path, timeout=SOCKET_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(serving, f"GET {path} answering 200", proxy.logs)


def check_echo(proxy: Proxy, context: str) -> dict[str, Any]:
    """A normal GET /echo gets 200 and the right description of itself."""
    try:
        response = httpx.get(proxy.url + "/echo?after=" + context, timeout=SOCKET_TIMEOUT_S)
    except httpx.HTTPError as exc:
        pytest.fail(f"GET /echo ({context}) failed: {exc!r}\n{proxy.logs()}")
    assert response.status_code == 200, (
        f"GET /echo ({context}): {response.status_code} {response.text!r}\n{proxy.logs()}"
    )
    body = response.json()
    assert body["method"] == "GET"
    assert body["path"] == "/echo"
    assert body["root_path"] == "/echo"
    assert body["query"] == {"after": context}
    assert body["body_bytes"] == 0
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(
            f"the proxy neither answered nor closed the connection within {SOCKET_TIMEOUT_S} s; "
            f"it sent {b''.join(chunks)!r:.300}"
        )
    return b"".join(chunks)


# ------------------------------------------------- 1. malformed requests


@dataclass
class Malformed:
    """Bytes to send; ``half_close``: then shut our side; ``reaches_app``: headers are whole."""

    data: Callable[[str], bytes]
    half_close: bool = False
    reaches_app: bool = False


MALFORMED = {
    "bad-request-line": Malformed(lambda rid: b"GARBAGE\r\n\r\n"),
    "header-without-colon": Malformed(
        lambda rid: (
            f"GET /echo HTTP/1.1\r\nHost: x\r\nx-request-id: {rid}\r\n".encode()
            + b"this line has no colon\r\n\r\n"
        )
    ),
    "truncated-body": Malformed(
        lambda rid: (
            f"POST /echo HTTP/1.1\r\nHost: x\r\nx-request-id: {rid}\r\n"
            "Content-Length: 100\r\n\r\n0123456789"
        ).encode(),
        half_close=True,
        reaches_app=True,
    ),
    "invalid-chunked-encoding": Malformed(
        lambda rid: (
            f"POST /echo HTTP/1.1\r\nHost: x\r\nx-request-id: {rid}\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        ).encode(),
        reaches_app=True,
    ),
    "one-100kb-header": Malformed(
        lambda rid: (
            f"GET /echo HTTP/1.1\r\nHost: x\r\nx-request-id: {rid}\r\n".encode()
            + b"x-big: "
            + b"a" * 100_000
            + b"\r\n\r\n"
        )
    ),
    "20000-header-lines": Malformed(
        lambda rid: (
            f"GET /echo HTTP/1.1\r\nHost: x\r\nx-request-id: {rid}\r\n".encode()
            + b"x-flood: b\r\n" * 20_000
            + b"\r\n"
        )
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_refused_and_the_proxy_keeps_serving(proxy: Proxy, case: str) -> None:
    wait_until_serving(proxy, "/echo")
    before = check_echo(proxy, f"before-{case}")
    malformed = MALFORMED[case]
    request_id = f"malformed-{case}-{uuid.uuid4().hex}"

    with proxy.connect() as sock:
        try:
            sock.sendall(malformed.data(request_id))
            if malformed.half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy refused before we were done sending: it may close at once
        answer = read_until_closed(sock)

    if answer:
        assert re.match(rb"HTTP/1\.[01] 4\d\d\b", answer), (
            f"{case}: the proxy answered with something other than a 4xx: {answer[:300]!r}"
        )
    if malformed.reaches_app:
        # The headers were complete: the request went to the replica, which
        # must have let it go (the proxy logs its end) without harm.
        wait_for_proxy_log(proxy, request_id)

    after = check_echo(proxy, f"after-{case}")
    assert after["replica"] == before["replica"], (
        f"{case}: the Echo replica was replaced ({before['replica']} -> {after['replica']})\n"
        f"{proxy.logs()}"
    )


# --------------------------------------------------------- 2. slow clients


def test_slow_clients_do_not_block_other_requests(proxy: Proxy, tmp_path: Path) -> None:
    wait_until_serving(proxy, "/echo")
    wait_until_serving(proxy, f"/upload?mark={tmp_path / 'ready'}")
    mark = tmp_path / "first-chunk-arrived"
    stalled_id = f"stalled-body-{uuid.uuid4().hex}"
    half_line = proxy.connect()
    half_body = proxy.connect()
    try:
        # Half a request line, then nothing.
        half_line.sendall(b"GET /ec")
        # Whole headers, 100 of the 1000 bytes of body the headers promise, then nothing.
        half_body.sendall(
            (
                f"POST /upload?mark={mark} HTTP/1.1\r\nHost: x\r\nx-request-id: {stalled_id}\r\n"
                "Content-Length: 1000\r\n\r\n"
            ).encode()
            + b"x" * 100
        )
        wait_until(mark.exists, "the Upload replica receiving the first chunk", proxy.logs)

        # Both are held open: other clients, of the same deployment too, get answers.
        check_echo(proxy, "slow-clients")
        other_mark = tmp_path / "other-upload"
        response = httpx.post(
            f"{proxy.url}/upload",
            params={"mark": str(other_mark)},
            content=b"y" * 300,
            timeout=SOCKET_TIMEOUT_S,
        )
        assert response.status_code == 200, response.text
        assert response.json()["total"] == 300
    finally:
        half_line.close()
        half_body.close()

    # The stalled upload ends when its client goes, and the replica serves on.
    wait_for_proxy_log(proxy, stalled_id)
    response = httpx.post(
        f"{proxy.url}/upload",
        params={"mark": str(tmp_path / "after-close")},
        content=b"z" * 500,
        timeout=SOCKET_TIMEOUT_S,
    )
    assert response.status_code == 200, f"{response.status_code} {response.text}\n{proxy.logs()}"
    assert response.json()["total"] == 500
    check_echo(proxy, "slow-clients-closed")


# ------------------------------------------------------------ 3. WebSocket


class WsClient:
    """A minimal WebSocket client: wsproto over a blocking socket."""

    def __init__(self, proxy: Proxy, target: str) -> None:
        host, port = proxy.address
        self.sock = proxy.connect()
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: deque[Event] = deque()
        self.eof = False
        self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target=target)))

    def next_event(self) -> Event:
        """The next event; raises ``EOFError`` when the connection closed without more."""
        while not self.events:
            if self.eof:
                raise EOFError("the connection closed")
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.popleft()

    def receive_text(self) -> str:
        parts = []
        while True:
            event = self.next_event()
            assert isinstance(event, TextMessage), f"expected a text message, got {event!r}"
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts)

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(Message(data=text)))

    def close(self) -> None:
        self.sock.close()


def test_websocket_through_the_proxy_to_a_fastapi_ingress(proxy: Proxy) -> None:
    wait_until_serving(proxy, "/api/text")
    client = WsClient(proxy, "/api/ws")
    try:
        accepted = client.next_event()
        assert isinstance(accepted, AcceptConnection), accepted
        client.send_text("one")
        assert client.receive_text() == "Hi: one"
        client.send_text("two")
        assert client.receive_text() == "Hi: two"
        client.send_text("bye")
        closed = client.next_event()
        assert isinstance(closed, CloseConnection), closed
        assert closed.code == 1000
        client.sock.sendall(client.ws.send(closed.response()))
    finally:
        client.close()
    # The replica serves on: HTTP to the same app still works.
    response = httpx.get(proxy.url + "/api/hello/ws", timeout=SOCKET_TIMEOUT_S)
    assert response.status_code == 200, f"{response.text}\n{proxy.logs()}"
    assert response.json() == "Hi, ws!"


def test_websocket_to_a_plain_deployment_is_refused(proxy: Proxy) -> None:
    wait_until_serving(proxy, "/echo")
    client = WsClient(proxy, "/echo")
    events: list[Event] = []
    try:
        while True:
            try:
                event = client.next_event()
            except EOFError:
                break
            events.append(event)
            if isinstance(event, CloseConnection) or (
                isinstance(event, RejectData) and event.body_finished
            ):
                break
            if isinstance(event, RejectConnection) and not event.has_body:
                break
    finally:
        client.close()
    assert not any(isinstance(e, AcceptConnection) for e in events), events
    assert events, "the proxy closed the connection without answering the handshake"
    assert isinstance(events[0], (RejectConnection, CloseConnection)), events
    if isinstance(events[0], RejectConnection):
        assert 400 <= events[0].status_code < 500, events
    check_echo(proxy, "websocket-refused")


# ------------------------------------------------ 4. rolling update under traffic


@dataclass
class Traffic:
    """GET requests sent one after another from a thread, and what each got."""

    url: str
    results: list[tuple[float, int | None, str]] = field(default_factory=list)
    """(start time, status or None for an exception, body or the exception)."""
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        with httpx.Client(timeout=SOCKET_TIMEOUT_S) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    response = client.get(self.url)
                    result = (started, response.status_code, response.text)
                except Exception as exc:
                    result = (started, None, repr(exc))
                with self.changed:
                    self.results.append(result)
                    self.changed.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[float, int | None, str]]], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.results), timeout=DEADLINE_S)


def test_rolling_update_under_traffic_fails_no_request(proxy: Proxy) -> None:
    import trioserve as serve

    serve.run(web.Versioned.options(num_replicas=2).bind("v1"), name="ver", route_prefix="/ver")
    traffic = Traffic(proxy.url + "/ver")
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        assert traffic.wait_for(lambda r: len(r) >= 10), "no traffic before the update"
        update_started = time.monotonic()
        serve.run(web.Versioned.options(num_replicas=2).bind("v2"), name="ver", route_prefix="/ver")
        update_done = time.monotonic()
        seen_v2 = traffic.wait_for(
            lambda r: len(r) >= 20 and all(body == "v2" for _, _, body in r[-20:])
        )
    finally:
        traffic.stop.set()
        thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "the traffic thread hung on a request"

    results = list(traffic.results)
    failed = [(i, status, body) for i, (_, status, body) in enumerate(results) if status != 200]
    during = [r for r in results if update_started <= r[0] <= update_done]
    assert not failed, (
        f"{len(failed)} of {len(results)} requests failed during the rolling update "
        f"({len(during)} were sent while serve.run updated): {failed[:20]}\n"
        f"----- proxy.log\n{proxy.proxy_log()[-8000:]}"
    )
    bodies = [body for _, _, body in results]
    assert seen_v2, f"never 20 'v2' in a row after the update: {bodies[-40:]}"
    assert set(bodies) == {"v1", "v2"}, set(bodies)
    assert bodies[0] == "v1"
    assert bodies[-20:] == ["v2"] * 20
    assert len(during) >= 3, f"only {len(during)} requests were sent during the update"


# --------------------------------------------------------------- 5. keep-alive


def test_keep_alive_connection_serves_many_requests_with_distinct_ids(proxy: Proxy) -> None:
    wait_until_serving(proxy, "/echo")
    local_addresses = set()
    ids = []
    with httpx.Client(base_url=proxy.url, timeout=SOCKET_TIMEOUT_S) as client:
        for i in range(50):
            response = client.get("/echo", params={"n": str(i)})
            assert response.status_code == 200, f"request {i}: {response.text}"
            body = response.json()
            assert body["query"] == {"n": str(i)}
            request_id = response.headers["x-request-id"]
            assert body["request_id"] == request_id, "the replica saw another request id"
            ids.append(request_id)
            stream = response.extensions["network_stream"]
            local_addresses.add(stream.get_extra_info("client_addr"))
    assert len(set(ids)) == len(ids), "request ids repeat"
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids), ids[:3]
    assert len(local_addresses) == 1, f"the requests used {len(local_addresses)} connections"
