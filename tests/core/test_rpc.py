"""Actor RPC (trioserve.core.rpc): what a caller and a server can rely on.

Every behaviour is checked under trio and under asyncio. pytest-trio's
``trio_mode`` runs every ``async def`` test under trio, even one marked for
anyio's plugin, so each test here is a plain function parametrized over the
backend that runs its ``async`` body with :func:`anyio.run`. Sockets are real:
TCP on 127.0.0.1, and a Unix socket in one test. Nothing sleeps to hope that
something happened: tests wait on events set where it happens, under
generous deadlines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import random
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

from trioserve.core import rpc

SECRET = b"0123456789abcdef" * 4
OTHER_SECRET = b"fedcba9876543210" * 4
BODY_DEADLINE_S = 30.0
"""No test body may take longer; a hang fails the test instead of the run."""
CLOSE_DEADLINE_S = 10.0
"""How long a server may take to close a connection it should drop."""
MiB = 1024 * 1024


@pytest.fixture(params=["trio", "asyncio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(backend: str, body: Callable[..., Awaitable[None]], *args: Any) -> None:
    async def main() -> None:
        with anyio.fail_after(BODY_DEADLINE_S):
            await body(*args)

    anyio.run(main, backend=backend)


# ------------------------------------------------------------------ fixtures in kind


@dataclasses.dataclass(frozen=True)
class Point:
    """Not a msgpack type: travels as a pickle."""

    x: int
    y: int


class AppError(Exception):
    """An application exception that pickles: re-raised as itself."""


class NeedsCode(Exception):
    """Pickles, but cannot be re-created (``code`` is missing on unpickling)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def echo(value: Any) -> Any:
    return value


@contextlib.asynccontextmanager
async def serving(
    methods: Mapping[str, Callable[..., Any]],
    *,
    address: str = "tcp://127.0.0.1:0",
    secret: bytes = SECRET,
    **kwargs: Any,
) -> AsyncIterator[tuple[rpc.Server, str]]:
    """A running server, with its bound address; stopped on exit."""
    server = rpc.Server(methods, secret, **kwargs)
    async with anyio.create_task_group() as tg:
        bound = await tg.start(server.serve, address)
        yield server, bound
        tg.cancel_scope.cancel()


# ----------------------------------------------------------- the protocol by hand


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def raw_open(address: str) -> anyio.abc.SocketStream:
    host, port = rpc.parse_address(address)
    return await anyio.connect_tcp(host, int(port))


async def receive_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive(n - len(buf))
    return bytes(buf)


async def answer_challenge(stream: anyio.abc.ByteStream, secret: bytes) -> bytes:
    """Read the server's hello and answer it with ``secret``; returns our nonce."""
    hello = await receive_exactly(stream, len(rpc.MAGIC) + 32)
    assert hello.startswith(rpc.MAGIC)
    nonce_c = os.urandom(32)
    await stream.send(_mac(secret, b"client", hello[len(rpc.MAGIC) :]) + nonce_c)
    return nonce_c


async def raw_handshake(address: str) -> anyio.abc.SocketStream:
    """A raw TCP stream to ``address`` past a correct handshake, ready for frames."""
    stream = await raw_open(address)
    nonce_c = await answer_challenge(stream, SECRET)
    assert await receive_exactly(stream, 32) == _mac(SECRET, b"server", nonce_c)
    return stream


async def assert_closed_by_server(stream: anyio.abc.ByteStream) -> None:
    """The server closes ``stream``: reading reaches end of stream (or a reset)."""
    with anyio.fail_after(CLOSE_DEADLINE_S):
        while True:
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return


# --------------------------------------------------------------------- values


ROUND_TRIP_VALUES = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "",
    "text with ünïcödé",
    b"",
    b"\x00bytes\xff" * 100,
    [],
    {},
    [1, "a", None, 2.5],
    {"a": [1, 2, {"b": b"x", "c": None}], "d": {"e": {"f": []}}},
    (),
    (1, 2),
    ((1, (2, 3)), [4, (5,)], {"t": (6, 7)}),
    [(1, 2), [1, 2]],
    {(1, 2): "a tuple as a key", 3: "an int as a key"},
    # only pickle can carry these
    Point(1, 2),
    {1, 2, 3},
    frozenset({"a"}),
    2**100,
    Decimal("1.10"),
    [Point(3, 4), {"p": Point(5, 6)}],
]


def test_call_round_trips_values(backend: str) -> None:
    def args(*a: Any, **kw: Any) -> Any:
        return a, kw

    async def body() -> None:
        async with (
            serving({"echo": echo, "args": args}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            for value in ROUND_TRIP_VALUES:
                result = await conn.call("echo", value)
                assert result == value
                assert type(result) is type(value)
            # positional tuples stay tuples, keywords arrive as keywords
            got = await conn.call("args", 1, (2, 3), b"4", five={6, 7}, eight=(9,))
            assert got == ((1, (2, 3), b"4"), {"five": {6, 7}, "eight": (9,)})

    run(backend, body)


def test_plain_sync_and_async_methods(backend: str) -> None:
    def add(a: int, b: int) -> int:
        return a + b

    async def aadd(a: int, b: int) -> int:
        await anyio.sleep(0)
        return a + b

    async def body() -> None:
        async with (
            serving({"add": add, "aadd": aadd}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            assert await conn.call("add", 2, 3) == 5
            assert await conn.call("aadd", 2, b=40) == 42

    run(backend, body)


def test_many_concurrent_calls_on_one_connection(backend: str) -> None:
    calls = 200

    async def body() -> None:
        all_arrived = anyio.Event()
        arrived = 0

        async def slow_echo(value: Any, delay: float) -> Any:
            # every call waits until all of them are in flight at once
            nonlocal arrived
            arrived += 1
            if arrived == calls:
                all_arrived.set()
            await all_arrived.wait()
            await anyio.sleep(delay)
            return value

        rng = random.Random(7)
        results: dict[int, Any] = {}

        async with (
            serving({"slow_echo": slow_echo}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):

            async def one(i: int) -> None:
                results[i] = await conn.call("slow_echo", (i, f"call {i}"), rng.uniform(0, 0.02))

            async with anyio.create_task_group() as tg:
                for i in range(calls):
                    tg.start_soon(one, i)
            assert arrived == calls
            assert results == {i: (i, f"call {i}") for i in range(calls)}
            assert await conn.call("slow_echo", "after", 0) == "after"

    run(backend, body)


# ----------------------------------------------------------------- remote errors


def fail_with_value_error(n: int) -> None:
    raise ValueError(f"bad value {n}")


async def fail_with_app_error() -> None:
    await anyio.sleep(0)
    raise AppError("the application failed")


def fail_with_needs_code() -> None:
    raise NeedsCode("cannot come back as itself", 418)


def test_remote_exception_is_reraised_with_its_traceback(backend: str) -> None:
    methods = {
        "fail_with_value_error": fail_with_value_error,
        "fail_with_app_error": fail_with_app_error,
        "fail_with_needs_code": fail_with_needs_code,
        "echo": echo,
    }

    async def body() -> None:
        async with serving(methods) as (_, address), rpc.connect(address, SECRET) as conn:
            with pytest.raises(ValueError, match=r"^bad value 42$") as info:
                await conn.call("fail_with_value_error", 42)
            assert type(info.value) is ValueError
            assert "fail_with_value_error" in info.value.remote_traceback  # type: ignore[attr-defined]
            assert isinstance(info.value.__cause__, rpc.RemoteTraceback)
            assert "fail_with_value_error" in str(info.value.__cause__)

            with pytest.raises(AppError, match="the application failed") as app:
                await conn.call("fail_with_app_error")
            assert type(app.value) is AppError
            assert "fail_with_app_error" in app.value.remote_traceback  # type: ignore[attr-defined]
            assert isinstance(app.value.__cause__, rpc.RemoteTraceback)

            with pytest.raises(rpc.RemoteError) as remote:
                await conn.call("fail_with_needs_code")
            assert remote.value.type_name.endswith(".NeedsCode")
            assert remote.value.remote_message == "cannot come back as itself"
            assert "cannot come back as itself" in str(remote.value)
            assert "fail_with_needs_code" in remote.value.remote_traceback
            assert isinstance(remote.value.__cause__, rpc.RemoteTraceback)

            # errors do not hurt the connection
            assert await conn.call("echo", "still here") == "still here"

    run(backend, body)


def test_unknown_method_raises_lookup_error_and_the_connection_carries_on(backend: str) -> None:
    async def body() -> None:
        async with serving({"echo": echo}) as (_, address), rpc.connect(address, SECRET) as conn:
            with pytest.raises(LookupError, match="nope"):
                await conn.call("nope", 1)
            with pytest.raises(LookupError, match="nope"):
                async with await conn.stream("nope") as chunks:
                    async for _ in chunks:
                        pass
            assert await conn.call("echo", 1) == 1
            assert not conn.closed

    run(backend, body)


# --------------------------------------------------------------------- streams


def count_sync(n: int) -> Iterator[int]:
    yield from range(n)


async def count_async(n: int) -> AsyncIterator[int]:
    for i in range(n):
        if i % 100 == 0:
            await anyio.sleep(0)
        yield i


def count_list(n: int) -> list[int]:
    return list(range(n))


async def count_later(n: int) -> AsyncIterator[int]:
    """A coroutine function that returns an async iterator."""
    await anyio.sleep(0)
    return count_async(n)


STREAMS = {
    "count_sync": count_sync,
    "count_async": count_async,
    "count_list": count_list,
    "count_later": count_later,
}


@pytest.mark.parametrize("method", sorted(STREAMS))
def test_stream_arrives_complete_and_in_order(backend: str, method: str) -> None:
    async def body() -> None:
        async with serving(STREAMS) as (_, address), rpc.connect(address, SECRET) as conn:
            async with await conn.stream(method, 1000) as chunks:
                got = [item async for item in chunks]
            assert got == list(range(1000))
            # a second stream on the same connection, with a tiny window
            async with await conn.stream(method, 50, _window=1) as chunks:
                assert [item async for item in chunks] == list(range(50))

    run(backend, body)


def test_error_in_the_middle_of_a_stream_follows_the_items_before_it(backend: str) -> None:
    async def five_then_fail() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        raise AppError("broke after five")

    def five_then_fail_sync() -> Iterator[int]:
        yield from range(5)
        raise AppError("broke after five")

    methods = {"async": five_then_fail, "sync": five_then_fail_sync, "echo": echo}

    async def body() -> None:
        async with serving(methods) as (_, address), rpc.connect(address, SECRET) as conn:
            for method in ("async", "sync"):
                got: list[int] = []
                with pytest.raises(AppError, match="broke after five") as info:
                    async with await conn.stream(method) as chunks:
                        async for item in chunks:
                            got.append(item)
                assert got == [0, 1, 2, 3, 4]
                assert isinstance(info.value.__cause__, rpc.RemoteTraceback)
            assert await conn.call("echo", 1) == 1

    run(backend, body)


def test_flow_control_bounds_how_far_the_generator_runs_ahead(backend: str) -> None:
    window = 8
    items = 120

    async def body() -> None:
        produced = 0
        consumed = 0
        max_lead = 0

        async def numbers() -> AsyncIterator[int]:
            nonlocal produced, max_lead
            for i in range(items):
                produced += 1
                max_lead = max(max_lead, produced - consumed)
                yield i

        async with (
            serving({"numbers": numbers}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("numbers", _window=window) as chunks:
                # before anything is read, the generator fills the window and stops
                with anyio.fail_after(10):
                    while produced < window:
                        await anyio.sleep(0.001)
                got = []
                async for item in chunks:
                    got.append(item)
                    consumed += 1
                    await anyio.sleep(0.001)  # a slow reader
            assert got == list(range(items))
        assert produced == items
        assert window <= max_lead <= window + 2, max_lead

    run(backend, body)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_leaving_a_stream_early_stops_the_generator(backend: str, kind: str) -> None:
    async def body() -> None:
        stopped = anyio.Event()

        async def forever_async() -> AsyncIterator[int]:
            try:
                i = 0
                while True:
                    yield i
                    i += 1
            finally:
                stopped.set()

        def forever_sync() -> Iterator[int]:
            try:
                i = 0
                while True:
                    yield i
                    i += 1
            finally:
                stopped.set()

        methods = {"async": forever_async, "sync": forever_sync, "echo": echo}
        async with serving(methods) as (_, address), rpc.connect(address, SECRET) as conn:
            async with await conn.stream(kind, _window=4) as chunks:
                got = []
                async for item in chunks:
                    got.append(item)
                    if len(got) == 10:
                        break
            assert got == list(range(10))
            await stopped.wait()
            assert await conn.call("echo", "next") == "next"

    run(backend, body)


# ------------------------------------------------------------------ cancellation


def test_cancelling_a_call_cancels_the_remote_task(backend: str) -> None:
    async def body() -> None:
        started = anyio.Event()
        cancelled = anyio.Event()
        finished = anyio.Event()

        async def block() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
            finally:
                finished.set()

        async with (
            serving({"block": block, "echo": echo}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            outcome: list[str] = []

            async def caller(scope: anyio.CancelScope) -> None:
                with scope:
                    await conn.call("block")
                    outcome.append("returned")
                outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

            scope = anyio.CancelScope()
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller, scope)
                await started.wait()
                scope.cancel()
            await finished.wait()
            assert cancelled.is_set()
            assert outcome == ["cancelled"]
            assert await conn.call("echo", "after") == "after"

    run(backend, body)


def test_connection_dropped_mid_call_leaves_the_server_serving(backend: str) -> None:
    async def body() -> None:
        started = anyio.Event()
        finished = anyio.Event()

        async def block() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                finished.set()

        async with serving({"block": block, "echo": echo}) as (_, address):
            async with rpc.connect(address, SECRET) as conn:
                errors: list[BaseException] = []

                async def caller() -> None:
                    try:
                        await conn.call("block")
                    except rpc.ConnectionLost as exc:
                        errors.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(caller)
                    await started.wait()
                    await conn.aclose()  # drops the socket: no cancel frame is sent
                assert len(errors) == 1
                assert conn.closed
                with pytest.raises(rpc.ConnectionLost):
                    await conn.call("echo", 1)
            await finished.wait()
            async with rpc.connect(address, SECRET) as conn:
                assert await conn.call("echo", "new") == "new"

    run(backend, body)


# ---------------------------------------------------------------- hostile peers


async def send_garbage(address: str) -> anyio.abc.SocketStream:
    stream = await raw_open(address)
    await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 16)
    return stream


async def send_wrong_secret(address: str) -> anyio.abc.SocketStream:
    stream = await raw_open(address)
    await answer_challenge(stream, OTHER_SECRET)
    return stream


async def send_truncated_frame(address: str) -> anyio.abc.SocketStream:
    stream = await raw_handshake(address)
    await stream.send(struct.pack(">I", 100) + b"0123456789")
    await stream.send_eof()
    return stream


def after_handshake(data: bytes) -> Callable[[str], Awaitable[anyio.abc.SocketStream]]:
    async def send(address: str) -> anyio.abc.SocketStream:
        stream = await raw_handshake(address)
        await stream.send(data)
        return stream

    return send


HOSTILE = {
    "garbage instead of a handshake": send_garbage,
    "wrong secret": send_wrong_secret,
    "truncated frame": send_truncated_frame,
    "length 0xFFFFFFFF": after_handshake(b"\xff\xff\xff\xff"),
    "unknown message type": after_handshake(frame(msgpack.packb([99, 1]))),
    "body not msgpack": after_handshake(frame(b"\xc1 is never msgpack")),
    "body not an array": after_handshake(frame(msgpack.packb("hello"))),
    "empty array": after_handshake(frame(msgpack.packb([]))),
    "call with too few fields": after_handshake(frame(msgpack.packb([0, 1, "echo"]))),
    "call with a bad window": after_handshake(
        frame(msgpack.packb([0, 1, "echo", [1], {}, "wide"]))
    ),
    "call with an infinite window": after_handshake(
        frame(msgpack.packb([0, 1, "echo", [1], {}, float("inf")]))
    ),
    "cancel without an id": after_handshake(frame(msgpack.packb([3]))),
    "credit without a count": after_handshake(
        frame(msgpack.packb([0, 1, "count_sync", [10**6], {}, 1])) + frame(msgpack.packb([6, 1]))
    ),
    "infinite credit": after_handshake(
        frame(msgpack.packb([0, 1, "count_sync", [10**6], {}, 1]))
        + frame(msgpack.packb([6, 1, float("inf")]))
    ),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_hostile_peer_is_dropped_and_others_carry_on(backend: str, attack: str) -> None:
    async def body() -> None:
        async with serving({"echo": echo, "count_sync": count_sync}) as (server, address):
            async with rpc.connect(address, SECRET) as good:
                assert await good.call("echo", "before") == "before"
                bad = await HOSTILE[attack](address)
                async with bad:
                    await assert_closed_by_server(bad)
                assert server.dropped == 1
                assert await good.call("echo", "during") == "during"
            async with rpc.connect(address, SECRET) as fresh:
                assert await fresh.call("echo", "after") == "after"

    run(backend, body)


# ------------------------------------------------------------------- frame sizes


def test_server_drops_a_connection_sending_a_frame_over_its_limit(backend: str) -> None:
    async def body() -> None:
        async with serving({"echo": echo}, max_frame_size=MiB) as (server, address):
            # by hand: a frame announced one byte over the limit
            bad = await raw_handshake(address)
            async with bad:
                with contextlib.suppress(anyio.BrokenResourceError):
                    await bad.send(frame(b"x" * (MiB + 1)))
                await assert_closed_by_server(bad)
            assert server.dropped == 1

            # a client with the default (larger) limit: its call fails, nothing hangs
            for size in (2 * MiB, 16 * MiB):
                async with rpc.connect(address, SECRET) as conn:
                    with pytest.raises(rpc.ConnectionLost):
                        await conn.call("echo", b"x" * size)
            assert server.dropped == 3

            async with rpc.connect(address, SECRET) as conn:
                value = b"y" * (MiB // 2)
                assert await conn.call("echo", value) == value

    run(backend, body)


def test_client_refuses_to_send_a_frame_over_its_own_limit(backend: str) -> None:
    async def body() -> None:
        async with (
            serving({"echo": echo}) as (server, address),
            rpc.connect(address, SECRET, max_frame_size=64 * 1024) as conn,
        ):
            with pytest.raises(rpc.FrameTooLarge):
                await conn.call("echo", b"z" * (100 * 1024))
            with pytest.raises(rpc.FrameTooLarge):
                await conn.stream("echo", b"z" * (100 * 1024))
            # nothing was sent: the connection is fine
            assert await conn.call("echo", b"small") == b"small"
            assert server.dropped == 0

    run(backend, body)


def test_100_mb_value_round_trips(backend: str) -> None:
    async def body() -> None:
        value = os.urandom(MiB) * 100
        async with serving({"echo": echo}) as (_, address), rpc.connect(address, SECRET) as conn:
            result = await conn.call("echo", value)
            assert len(result) == len(value)
            assert result == value

    run(backend, body)


# ------------------------------------------------------------ connecting, secrets


def test_connect_with_the_wrong_secret_raises_authentication_error(backend: str) -> None:
    async def body() -> None:
        async with serving({"echo": echo}) as (server, address):
            with pytest.raises(rpc.AuthenticationError):
                async with rpc.connect(address, OTHER_SECRET):
                    pass
            assert server.dropped == 1
            async with rpc.connect(address, SECRET) as conn:
                assert await conn.call("echo", 1) == 1

    run(backend, body)


def test_connect_to_nothing_raises_os_error(backend: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the port is free now, and nothing listens on it

    async def body() -> None:
        with pytest.raises(OSError):
            async with rpc.connect(f"tcp://127.0.0.1:{port}", SECRET):
                pass

    run(backend, body)


def test_unix_socket(backend: str, tmp_path: Path) -> None:
    address = f"unix://{tmp_path / 'rpc.sock'}"

    async def body() -> None:
        async with (
            serving({"echo": echo, "count_sync": count_sync}, address=address) as (_, bound),
            rpc.connect(bound, SECRET) as conn,
        ):
            assert bound == address
            assert await conn.call("echo", (1, b"2")) == (1, b"2")
            async with await conn.stream("count_sync", 100) as chunks:
                assert [i async for i in chunks] == list(range(100))

    run(backend, body)


def test_load_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "instance" / "secret"
    secret = rpc.load_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    assert rpc.load_secret(path) == secret
    assert rpc.load_secret(tmp_path / "another") != secret


def test_load_secret_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("ab" * 32)
    path.chmod(0o644)
    with pytest.raises(rpc.AuthenticationError, match="chmod 600"):
        rpc.load_secret(path)


# --------------------------------------------------------------- inputs (inbox)


@rpc.takes_inbox
async def upper_each(inbox: rpc.Inbox, suffix: str) -> AsyncIterator[str]:
    """Echo every input upper-cased until the input ``None``."""
    async for item in inbox:
        if item is None:
            return
        yield item.upper() + suffix


def test_inputs_reach_a_method_that_takes_an_inbox_in_order(backend: str) -> None:
    async def body() -> None:
        async with (
            serving({"upper": upper_each}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("upper", "!") as replies:
                got = []
                for word in ["a", "b", "c"]:
                    await replies.send(word)
                    got.append(await replies.__anext__())  # a reply before the next input
                await replies.send(None)
                assert [item async for item in replies] == []
            assert got == ["A!", "B!", "C!"]

    run(backend, body)


def test_a_callee_that_reads_slowly_holds_the_caller_to_the_window(backend: str) -> None:
    window = 4
    total = 40

    async def body() -> None:
        sent = 0
        read = 0
        max_lead = 0
        release = anyio.Event()

        @rpc.takes_inbox
        async def slow(inbox: rpc.Inbox) -> AsyncIterator[int]:
            nonlocal read
            await release.wait()
            async for _ in inbox:
                read += 1
                if read == total:
                    break
            yield read

        async with (
            serving({"slow": slow}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("slow", _window=window) as replies:

                async def feed() -> None:
                    nonlocal sent, max_lead
                    for i in range(total):
                        await replies.send(i)
                        sent += 1
                        max_lead = max(max_lead, sent - read)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed)
                    with anyio.fail_after(10):
                        while sent < window:
                            await anyio.sleep(0.001)
                    await anyio.wait_all_tasks_blocked()
                    assert sent == window  # blocked: no credit until the callee reads
                    release.set()
                assert [item async for item in replies] == [total]
        assert max_lead <= window + window // 2

    run(backend, body)


def test_inputs_sent_right_after_the_call_are_not_lost(backend: str) -> None:
    async def body() -> None:
        async with (
            serving({"upper": upper_each}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            for _ in range(20):  # the call and its inputs often arrive in one read
                async with await conn.stream("upper", "?") as replies:
                    for word in ["x", "y", None]:
                        await replies.send(word)
                    assert [item async for item in replies] == ["X?", "Y?"]

    run(backend, body)


def test_sending_after_the_stream_ended_neither_blocks_nor_fails(backend: str) -> None:
    async def body() -> None:
        async with (
            serving({"upper": upper_each}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("upper", "!", _window=2) as replies:
                await replies.send(None)
                assert [item async for item in replies] == []
                for word in ["late"] * 10:  # more than the window: would block before
                    await replies.send(word)

    run(backend, body)


# ------------------------------------------------- methods that send their own replies


@rpc.takes_inbox
async def push_each(inbox: rpc.Inbox, items: list[Any], last: Any = None) -> None:
    """Send ``items`` one by one, then ``last`` with the end of the stream (if not None)."""
    for item in items:
        await inbox.send(item)
    if last is not None:
        await inbox.send_last(last)


def test_a_method_that_sends_its_replies_streams_them_in_order(backend: str) -> None:
    async def body() -> None:
        async with (
            serving({"push": push_each}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("push", [1, "two", (3,)], "end") as replies:
                assert [item async for item in replies] == [1, "two", (3,), "end"]
            # Returning without a last item ends the stream after what was sent.
            async with await conn.stream("push", ["a", "b"]) as replies:
                assert [item async for item in replies] == ["a", "b"]
            async with await conn.stream("push", [], "only") as replies:
                assert [item async for item in replies] == ["only"]

    run(backend, body)


def test_a_method_that_sends_its_replies_is_held_to_the_window(backend: str) -> None:
    window = 4
    total = 30

    async def body() -> None:
        sent = 0
        filled = anyio.Event()

        @rpc.takes_inbox
        async def numbers(inbox: rpc.Inbox) -> None:
            nonlocal sent
            for i in range(total):
                await inbox.send(i)
                sent += 1
                if sent == window:
                    filled.set()

        async with (
            serving({"numbers": numbers}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            async with await conn.stream("numbers", _window=window) as replies:
                await filled.wait()
                await anyio.wait_all_tasks_blocked()
                assert sent == window  # no credit until the caller reads
                assert [item async for item in replies] == list(range(total))

    run(backend, body)


def test_an_error_before_the_last_reply_reaches_the_caller_after_the_replies(
    backend: str,
) -> None:
    async def body() -> None:
        @rpc.takes_inbox
        async def fail(inbox: rpc.Inbox) -> None:
            await inbox.send("first")
            raise AppError("half way")

        async with (
            serving({"fail": fail}) as (_, address),
            rpc.connect(address, SECRET) as conn,
        ):
            got = []
            with pytest.raises(AppError, match="half way"):
                async with await conn.stream("fail") as replies:
                    async for item in replies:
                        got.append(item)
            assert got == ["first"]

    run(backend, body)


def test_a_method_goes_on_after_its_last_reply_even_once_the_caller_left(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        release = anyio.Event()
        finished = anyio.Event()
        seen: list[str] = []

        @rpc.takes_inbox
        async def answer_then_work(inbox: rpc.Inbox) -> None:
            await inbox.send_last("answer")
            with pytest.raises(anyio.ClosedResourceError):
                await inbox.send("more")
            seen.extend([item async for item in inbox])  # the inbox is closed now
            try:
                await release.wait()
                seen.append("worked on")
            except anyio.get_cancelled_exc_class():
                seen.append("cancelled")
                raise
            finally:
                finished.set()
            raise AppError("after the end")

        async with serving({"work": answer_then_work}) as (_, address):
            async with rpc.connect(address, SECRET) as conn:
                async with await conn.stream("work") as replies:
                    assert [item async for item in replies] == ["answer"]
            # The connection is closed: the method still runs to its end.
            release.set()
            await finished.wait()
            assert seen == ["worked on"]

    with caplog.at_level(logging.ERROR, logger="trioserve.rpc"):
        run(backend, body)
    (record,) = [r for r in caplog.records if "failed after its stream ended" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], AppError)


@pytest.mark.parametrize("how", ["caller leaves", "connection drops"])
def test_a_method_that_sends_its_replies_is_cancelled_when_the_caller_goes(
    backend: str, how: str
) -> None:
    async def body() -> None:
        cancelled = anyio.Event()

        @rpc.takes_inbox
        async def forever(inbox: rpc.Inbox) -> None:
            try:
                i = 0
                while True:
                    await inbox.send(i)
                    i += 1
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise

        async with serving({"forever": forever, "echo": echo}) as (_, address):
            async with rpc.connect(address, SECRET) as conn:
                async with await conn.stream("forever", _window=2) as replies:
                    assert await replies.__anext__() == 0
                    if how == "connection drops":
                        await conn.aclose()
                await cancelled.wait()
            async with rpc.connect(address, SECRET) as conn:
                assert await conn.call("echo", "next") == "next"

    run(backend, body)
