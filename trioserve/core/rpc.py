"""Actor RPC: authenticated, multiplexed, msgpack-framed calls between processes.

Every process of an instance (controller, proxy, replicas, drivers) talks to
the others through this module. It is written with anyio, so the same code runs
under trio (controller, proxy, tests) and asyncio (replicas).

Wire format
-----------
A connection starts with a mutual HMAC-SHA256 challenge over the instance
secret, before any frame is read::

    server -> client   MAGIC, nonce_s (32 bytes)
    client -> server   HMAC(secret, "client" + nonce_s), nonce_c (32 bytes)
    server -> client   HMAC(secret, "server" + nonce_c)

A peer that fails the challenge, or does not answer within
:data:`HANDSHAKE_TIMEOUT_S`, is dropped. After it, both sides exchange
frames: a 4-byte big-endian length, then that many bytes of msgpack holding an
array whose first element is the message type:

==========  =========================================================
``CALL``     ``[0, id, method, args, kwargs, window]``; ``window`` > 0 asks
             for a stream with that many chunks of credit, 0 for one result
``RESULT``   ``[1, id, value]``
``ERROR``    ``[2, id, error]``: the remote exception (see :class:`RemoteError`)
``CANCEL``   ``[3, id]``: the caller gave up; the callee's task is cancelled
``CHUNK``    ``[4, id, value]``: one item of a stream
``END``      ``[5, id]``: the stream is over
``CREDIT``   ``[6, id, n]``: the caller read ``n`` chunks; the callee may send more.
             From the callee: it read ``n`` inputs; the caller may send more
``INPUT``    ``[7, id, value]``: one item from the caller to a running stream
             whose method takes an inbox (see :func:`takes_inbox`)
``LAST``     ``[8, id, value]``: the last item of a stream and its end, in one
             frame (the generator yielded :class:`Last`, or the method called
             :meth:`Inbox.send_last`)
==========  =========================================================

A stream never has more than ``window`` chunks in flight, so a slow reader
stalls the generator at the callee instead of making anyone buffer without
bound. Inputs obey the same window the other way: a method that reads its
inbox slowly stalls the caller's :meth:`Stream.send`. A frame longer than
the receiver's ``max_frame_size``, an unknown message type, or bytes that
are not msgpack close that connection only.

Values are msgpack, with two extension types: tuples stay tuples, and
anything else msgpack cannot carry travels as a pickle (authenticated
connections only, which is all of them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import pickle
import secrets
import socket
import struct
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, Self

import anyio
import anyio.abc
import anyio.lowlevel
import msgpack

from trioserve.core.eventloop import running_loop

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_STREAM_WINDOW",
    "AuthenticationError",
    "Connection",
    "ConnectionLost",
    "FrameTooLarge",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "RpcError",
    "Inbox",
    "Last",
    "Server",
    "Stream",
    "connect",
    "load_secret",
    "pack",
    "parse_address",
    "takes_inbox",
    "unpack",
]

log = logging.getLogger("trioserve.rpc")

MAGIC = b"TSRPC\x01"
NONCE_SIZE = 32
DIGEST_SIZE = 32
HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_MAX_FRAME_SIZE = 512 * 1024 * 1024
"""Largest frame a connection accepts (512 MiB); larger values are refused with
:class:`FrameTooLarge` before anything is sent."""
DEFAULT_STREAM_WINDOW = 16
"""Chunks a stream may have in flight before the callee waits for credit."""
READ_SIZE = 256 * 1024
WRITE_TIMEOUT_S = 60.0
"""How long one frame may take to write (the peer not reading) before the connection closes."""
DIRECT_WRITE_FRAMES = 4
"""Frames queued in one event-loop turn beyond which a connection on asyncio writes
them at once instead of at the end of the turn: under load, the peer starts on the
first requests while later ones are still being made (no lockstep of whole turns)."""
WRITE_QUEUE_HIGH_WATER = 1024 * 1024
"""Bytes queued for a connection's writer task beyond which a writer waits for them to go out."""

CALL, RESULT, ERROR, CANCEL, CHUNK, END, CREDIT, INPUT, LAST = range(9)


class Last:
    """Yield ``Last(value)`` from a streaming method to end the stream with ``value``.

    The caller gets ``value`` and the end of the stream in one frame, and the
    generator is closed right after (its ``finally`` runs): one frame and one
    write fewer than a last item followed by the end.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_EXT_PICKLE = 1
_EXT_TUPLE = 2
_LENGTH = struct.Struct(">I")


class RpcError(Exception):
    """Base of the errors this module raises itself."""


class AuthenticationError(RpcError):
    """The peer does not know the instance secret (or is not a trioserve peer)."""


class ConnectionLost(RpcError):
    """The connection closed before the call finished."""


class ProtocolError(RpcError):
    """The peer sent something that is not this protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    """A frame is longer than the connection's ``max_frame_size``."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text as the ``__cause__`` of a re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nRemote traceback:\n{self.tb}"


class RemoteError(RpcError):
    """A remote exception whose type could not be re-created in this process.

    ``type_name`` is the qualified name of the remote exception's type,
    ``remote_message`` its message and ``remote_traceback`` the formatted
    traceback. When the type can be re-created (it pickles), the caller gets an
    instance of the original type instead, with the same traceback text as its
    ``__cause__`` and in its ``remote_traceback`` attribute.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback


# ---------------------------------------------------------------------------- values


def _default(obj: Any) -> Any:
    if type(obj) is tuple:
        return msgpack.ExtType(_EXT_TUPLE, pack(list(obj)))
    return msgpack.ExtType(_EXT_PICKLE, pickle.dumps(obj, protocol=5))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(unpack(data))
    if code == _EXT_PICKLE:
        return pickle.loads(data)
    raise ProtocolError(f"unknown msgpack extension type {code}")


_PACK_OPTIONS: dict[str, Any] = {"default": _default, "strict_types": True, "use_bin_type": True}
"""How values are packed: by :func:`pack`, and by each connection's packer."""


def pack(value: Any) -> bytes:
    """Encode ``value``: msgpack, with tuples kept and other objects pickled."""
    data: bytes = msgpack.packb(value, **_PACK_OPTIONS)
    return data


def unpack(data: bytes) -> Any:
    """Decode what :func:`pack` made."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _error_payload(exc: BaseException) -> dict[str, Any]:
    """The wire form of ``exc``; never raises, whatever ``exc`` does when formatted."""
    pickled: bytes | None
    try:
        pickled = pickle.dumps(exc, protocol=5)
        pickle.loads(pickled)  # a type that pickles but cannot be re-created is no use
    except Exception:
        pickled = None
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() raised>"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        tb = f"{type(exc).__qualname__}: {message}\n"
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": message,
        "traceback": tb,
        "pickled": pickled,
    }


def _error_from_payload(payload: Mapping[str, Any]) -> BaseException:
    tb = str(payload.get("traceback", ""))
    exc: BaseException | None = None
    if payload.get("pickled"):
        try:
            exc = pickle.loads(payload["pickled"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(str(payload.get("type")), str(payload.get("message")), tb)
    exc.__cause__ = RemoteTraceback(tb)
    with contextlib.suppress(AttributeError, TypeError):
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------------------- secret


def load_secret(path: str | os.PathLike[str], *, create: bool = True) -> bytes:
    """The instance secret stored at ``path``, created (mode 0600) if missing.

    Refuses a file that other users can read or write, because anyone who
    knows the secret can run code in every replica.
    """
    p = Path(path)
    if create and not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    mode = p.stat().st_mode
    if mode & 0o077:
        raise AuthenticationError(
            f"the instance secret {p} is readable by other users (mode {mode & 0o777:o}); "
            "run `chmod 600` on it"
        )
    text = p.read_text().strip()
    if len(text) < 32:
        raise AuthenticationError(f"the instance secret {p} is too short; delete it to renew")
    return text.encode()


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


# ---------------------------------------------------------------------------- framing


class _Event(Protocol):
    """What the events of one call need: asyncio's, trio's and anyio's have it."""

    def set(self) -> Any: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


def _event_type() -> Callable[[], _Event]:
    """The running loop's own event type, asyncio's or trio's: anyio's wraps it at
    several times the cost (about 4.7 against 0.5 microseconds to make, set
    and wait on one), and a connection makes one per call. Call it on the
    loop; anyio's for a loop it does not know."""
    library, _ = running_loop()
    if library == "asyncio":
        return asyncio.Event
    if library == "trio":  # trio runs, so it is imported
        return sys.modules["trio"].Event  # type: ignore[no-any-return]
    return anyio.Event


class _FrameStream:
    """Frames over a byte stream: a read buffer, and a writer task that sends them."""

    def __init__(self, stream: anyio.abc.ByteStream, max_frame_size: int) -> None:
        self.stream = stream
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self.new_event = _event_type()
        """Makes the events of this connection's calls (the running loop's own)."""
        self._packer = msgpack.Packer(**_PACK_OPTIONS)
        """What :func:`pack` does, without making a packer (and its buffer) per frame."""
        self._send_lock = anyio.Lock()
        self._pending: list[bytes] = []
        """Frames (lengths and bodies) waiting for the writer."""
        self._batch = _Batch(self.new_event)
        """The batch the pending frames go out with."""
        self._queued = 0
        """Bytes of the pending frames."""
        self._writer_task = False
        """Whether the writer task (:meth:`start_writer`) runs."""
        self._wake: _Event | None = None
        """Set to wake the writer task while it waits for frames."""
        self._error: str | None = None
        """Why frames can no longer be written, once they cannot."""
        self._transport = _asyncio_transport(stream)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                data = await self.stream.receive(max(READ_SIZE, n - len(self._buf)))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                if self._buf:
                    raise ProtocolError(
                        f"connection closed in the middle of a frame ({len(self._buf)} of "
                        f"{n} bytes)"
                    ) from None
                raise
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_frame(self) -> list[Any]:
        header = await self.read_exactly(4)
        (length,) = _LENGTH.unpack(header)
        if length > self.max_frame_size:
            raise FrameTooLarge(
                f"peer sent a frame of {length} bytes; the limit is {self.max_frame_size}"
            )
        body = await self.read_exactly(length)
        try:
            message = unpack(body)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
        if not isinstance(message, list) or not message or not isinstance(message[0], int):
            raise ProtocolError(f"frame is not a message: {message!r:.80}")
        return message

    async def write_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(data)

    async def write_frame(self, message: list[Any], *, alone: bool = False) -> None:
        """Send one frame, whole.

        The frame is queued for the writer task (:meth:`start_writer`) and
        goes out with the others of this event-loop turn, so one system call
        carries many frames under load; the call returns at once unless over
        :data:`WRITE_QUEUE_HIGH_WATER` bytes wait. A frame goes out whole or
        the connection closes, whatever happens to the task that wrote it.
        Raises ``anyio.BrokenResourceError`` once the connection cannot be
        written to.

        ``alone`` says that nothing else is in flight on the connection: on
        asyncio the frame then goes out at once instead of at the end of the
        turn, which saves a turn of latency when the connection is idle; so
        do the frames of a turn once :data:`DIRECT_WRITE_FRAMES` wait.
        """
        body: bytes = self._packer.pack(message)
        if len(body) > self.max_frame_size:
            raise FrameTooLarge(
                f"a message of {len(body)} bytes is over the frame limit of "
                f"{self.max_frame_size} bytes"
            )
        if self._error is not None:
            raise anyio.BrokenResourceError(self._error)
        self._pending.append(_LENGTH.pack(len(body)))
        self._pending.append(body)
        if not self._writer_task:
            raise RuntimeError("frames are written by the writer task: call start_writer first")
        if (alone or len(self._pending) >= 2 * DIRECT_WRITE_FRAMES) and self._write_now():
            return
        # The writer task sends it, with whatever else is written in this turn
        # of the event loop; wait only while much is queued.
        self._queued += len(body) + 4
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()
        if self._queued > WRITE_QUEUE_HIGH_WATER:
            batch = self._batch
            await batch.wait()
            if batch.error is not None:
                raise anyio.BrokenResourceError(batch.error)

    def _write_now(self) -> bool:
        """Hand the pending frames to the transport now, if it is an asyncio
        transport with nothing buffered; False if they must wait for the writer task."""
        transport = self._transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        parts, self._pending = self._pending, []
        self._queued = 0
        batch, self._batch = self._batch, _Batch(self.new_event)
        try:
            transport.write(b"".join(parts))
        except Exception as exc:  # the writer task finds the connection broken next
            batch.error = f"the connection failed: {exc!r}"
        batch.finish()
        if batch.error is not None:
            self._error = batch.error
            raise anyio.BrokenResourceError(batch.error)
        return True

    def start_writer(self, tg: anyio.abc.TaskGroup) -> None:
        """Write frames from a task of ``tg`` from now on (see :meth:`_run_writer`).

        Call it once the handshake is done, before any frame is written.
        """
        self._writer_task = True
        tg.start_soon(self._run_writer)

    async def _run_writer(self) -> None:
        """Write what :meth:`write_frame` queues, until cancelled or a write fails.

        While it runs, :meth:`write_frame` only queues its frame (and waits
        while over :data:`WRITE_QUEUE_HIGH_WATER` bytes are queued): the
        frames of one event-loop turn go out in one write, and no writer
        pays for cancel scopes of its own.
        """
        try:
            while True:
                while not self._pending:
                    self._wake = self.new_event()
                    await self._wake.wait()
                parts, self._pending = self._pending, []
                self._queued = 0
                batch, self._batch = self._batch, _Batch(self.new_event)
                data = b"".join(parts)
                with anyio.move_on_after(WRITE_TIMEOUT_S) as timer:
                    try:
                        await self.stream.send(data)
                    except Exception as exc:
                        batch.error = f"the connection failed: {exc!r}"
                if timer.cancelled_caught:
                    batch.error = (
                        f"a frame could not be written within {WRITE_TIMEOUT_S} s; "
                        "connection closed"
                    )
                batch.finish()
                if batch.error is not None:
                    self._error = batch.error
                    await anyio.aclose_forcefully(self.stream)
                    return
        finally:
            self._writer_task = False
            self._wake = None
            self._error = self._error or "the connection is closed"
            self._fail_pending(self._error)

    def _fail_pending(self, error: str) -> None:
        """Frames queued behind a failed write will never go out: tell their writers."""
        self._pending = []
        self._queued = 0
        batch, self._batch = self._batch, _Batch(self.new_event)
        batch.error = error
        batch.finish()


def _asyncio_transport(stream: anyio.abc.ByteStream) -> Any:
    """The asyncio transport under an anyio socket stream, if that is what it is.

    Writing to it directly is what the stream's ``send`` does after its
    checks; :meth:`_FrameStream._write_now` does it only while nothing is
    buffered, so bytes keep their order. Any other stream (trio's, or an
    anyio version without the attribute) gives None: frames then wait for
    the writer task.
    """
    transport = getattr(stream, "_transport", None)
    needed = ("write", "is_closing", "get_write_buffer_size")
    if transport is None or not all(hasattr(transport, name) for name in needed):
        return None
    return transport


class _Batch:
    """Frames sent with one write; :meth:`wait` returns once it is done (``error``: it failed)."""

    __slots__ = ("_done", "_event", "_new_event", "error")

    def __init__(self, new_event: Callable[[], _Event]) -> None:
        self.error: str | None = None
        self._done = False
        self._new_event = new_event
        self._event: _Event | None = None

    def finish(self) -> None:
        self._done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if not self._done:
            if self._event is None:
                self._event = self._new_event()
            await self._event.wait()


# ---------------------------------------------------------------------------- addresses


def parse_address(address: str) -> tuple[str, str | int]:
    """``tcp://host:port`` -> ("tcp", host:port), ``unix:///path`` -> ("unix", path)."""
    if address.startswith("unix://"):
        return "unix", address[len("unix://") :]
    rest = address.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an RPC address: {address!r} (expected tcp://host:port)")
    return host.strip("[]"), int(port)


async def _open_stream(address: str) -> anyio.abc.ByteStream:
    kind, where = parse_address(address)
    if kind == "unix":
        return await anyio.connect_unix(str(where))
    stream = await anyio.connect_tcp(kind, int(where))
    with contextlib.suppress(Exception):
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


# ---------------------------------------------------------------------------- client


class _Pending:
    __slots__ = ("done", "error", "value")

    def __init__(self, done: _Event) -> None:
        self.done = done
        self.value: Any = None
        self.error: BaseException | None = None


class Stream:
    """The reply of a streaming call: an async iterator over the callee's chunks.

    Use it as ``async with conn.stream(...) as chunks: async for c in chunks``;
    leaving the block early cancels the callee's generator.
    """

    __slots__ = (
        "_conn",
        "_finished",
        "_id",
        "_input_credit",
        "_items",
        "_lost",
        "_read",
        "_spare_credit",
        "_waiter",
        "_window",
    )

    def __init__(self, conn: Connection, call_id: int, window: int) -> None:
        self._conn = conn
        self._id = call_id
        self._window = window
        self._items: collections.deque[tuple[int, Any]] = collections.deque()
        """What the callee sent and the caller has not read yet (at most ``window + 2``)."""
        self._waiter: _Event | None = None
        """Set when an item arrives, while the reader waits for one."""
        self._lost = False
        """No more items will come: the connection closed, or the callee broke flow control."""
        self._read = 0
        self._finished = False
        self._input_credit: _Credit | None = None
        """The caller's credit for inputs; made by the first :meth:`send`."""
        self._spare_credit = 0
        """Input credit granted before the first :meth:`send`."""

    def _credit(self) -> _Credit:
        if self._input_credit is None:
            self._input_credit = _Credit(self._window + self._spare_credit)
        return self._input_credit

    def _add_credit(self, n: int) -> None:
        if self._input_credit is None:
            self._spare_credit += max(0, n)
        else:
            self._input_credit.add(n)

    async def send(self, value: Any) -> None:
        """Send one input to the callee's inbox; waits while the callee is ``window`` behind.

        Raises :class:`ConnectionLost` when the connection is gone. Once the
        stream is over (the callee returned, failed, or the caller closed it),
        inputs are dropped.
        """
        if self._finished:
            return  # the callee is done: nothing reads inputs any more
        await self._credit().take()
        if self._conn._closed:
            raise ConnectionLost(self._conn._lost_reason())
        if not self._finished:
            await self._conn._send([INPUT, self._id, value])

    def _deliver(self, kind: int, value: Any) -> None:
        if self._lost:
            return
        if len(self._items) >= self._window + 2:
            self._lost = True  # over the window: the callee broke flow control
        else:
            self._items.append((kind, value))
        if self._waiter is not None:
            self._waiter.set()

    def _close(self) -> None:
        """The connection is gone: the reader gets what arrived, then :class:`ConnectionLost`."""
        self._lost = True
        if self._waiter is not None:
            self._waiter.set()
        self._add_credit(self._window)  # wake a sender; it sees the loss

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        items = self._items
        while not items:
            if self._lost:
                self._finished = True
                raise ConnectionLost(self._conn._lost_reason())
            waiter = self._waiter = self._conn._frames.new_event()
            try:
                await waiter.wait()
            finally:
                self._waiter = None
        kind, value = items.popleft()
        if kind == CHUNK:
            self._read += 1
            if self._read >= max(1, self._window // 2):
                n, self._read = self._read, 0
                with contextlib.suppress(Exception):
                    await self._conn._frames.write_frame([CREDIT, self._id, n])
            return value
        self._finished = True
        self._add_credit(self._window)  # wake a sender; it sees the stream is over
        self._conn._calls.pop(self._id, None)
        if kind == LAST:
            return value
        if kind == END:
            raise StopAsyncIteration
        raise _error_from_payload(value)

    async def aclose(self) -> None:
        """Stop reading; if the stream is not over, cancel it at the callee."""
        if not self._finished:
            self._finished = True
            self._add_credit(self._window)
            self._conn._calls.pop(self._id, None)
            await self._conn._send_cancel(self._id)
        self._items.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Connection:
    """A client connection: many concurrent calls and streams over one socket.

    Made by :func:`connect`. Calls from any task of the event loop that opened
    it are fine; the connection reads replies in a task of its own.
    """

    def __init__(self, frames: _FrameStream, address: str) -> None:
        self._frames = frames
        self.address = address
        self._ids = itertools.count(1)
        self._calls: dict[int, _Pending | Stream] = {}
        self._closed = False
        self._reason = ""
        self._closed_event = anyio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by either side."""
        await self._closed_event.wait()

    def _lost_reason(self) -> str:
        return f"connection to {self.address} lost" + (f": {self._reason}" if self._reason else "")

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` at the peer and return its result, or raise its exception.

        Cancelling the caller sends a cancellation that cancels the callee's task.
        """
        if self._closed:
            raise ConnectionLost(self._lost_reason())
        call_id = next(self._ids)
        pending = _Pending(self._frames.new_event())
        self._calls[call_id] = pending
        try:
            await self._send(
                [CALL, call_id, method, list(args), kwargs, 0], alone=len(self._calls) == 1
            )
            await pending.done.wait()
        except BaseException:
            if self._calls.pop(call_id, None) is not None and not self._closed:
                await self._send_cancel(call_id)
            raise
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def stream(
        self, method: str, /, *args: Any, _window: int = DEFAULT_STREAM_WINDOW, **kwargs: Any
    ) -> Stream:
        """Call a streaming ``method``; iterate over the :class:`Stream` returned."""
        if self._closed:
            raise ConnectionLost(self._lost_reason())
        call_id = next(self._ids)
        stream = Stream(self, call_id, max(1, _window))
        self._calls[call_id] = stream
        try:
            await self._send(
                [CALL, call_id, method, list(args), kwargs, stream._window],
                alone=len(self._calls) == 1,
            )
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return stream

    async def _send(self, message: list[Any], *, alone: bool = False) -> None:
        try:
            await self._frames.write_frame(message, alone=alone)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionLost(self._lost_reason()) from exc

    async def _send_cancel(self, call_id: int) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            with anyio.move_on_after(5):
                await self._frames.write_frame([CANCEL, call_id])

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._frames.read_frame()
                kind = message[0]
                call_id = message[1] if len(message) > 1 else None
                target = self._calls.get(call_id) if isinstance(call_id, int) else None
                if kind in (RESULT, ERROR):
                    value = message[2]
                    if isinstance(target, _Pending):
                        del self._calls[call_id]  # type: ignore[arg-type]
                        if kind == RESULT:
                            target.value = value
                        else:
                            target.error = _error_from_payload(value)
                        target.done.set()
                    elif isinstance(target, Stream):
                        target._deliver(kind, value)
                elif kind in (CHUNK, END, LAST):
                    if isinstance(target, Stream):
                        target._deliver(kind, None if kind == END else message[2])
                elif kind == CREDIT:
                    if isinstance(target, Stream):
                        target._add_credit(int(message[2]))
                else:
                    raise ProtocolError(f"unknown message type {kind!r} from the server")
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._reason = self._reason or "closed by peer"
        except Exception as exc:  # ProtocolError, or a malformed frame (IndexError, ...)
            self._reason = str(exc) or type(exc).__name__
            log.warning("closing connection to %s: %s", self.address, self._reason)
        finally:
            self._fail_all()
            with contextlib.suppress(Exception):
                await anyio.aclose_forcefully(self._frames.stream)

    def _fail_all(self) -> None:
        self._closed = True
        self._closed_event.set()
        calls, self._calls = self._calls, {}
        for target in calls.values():
            if isinstance(target, _Pending):
                target.error = ConnectionLost(self._lost_reason())
                target.done.set()
            else:
                target._close()

    async def aclose(self) -> None:
        """Close the connection; pending calls raise :class:`ConnectionLost`."""
        self._reason = self._reason or "closed"
        self._closed = True
        self._closed_event.set()
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self._frames.stream)


@contextlib.asynccontextmanager
async def connect(
    address: str,
    secret: bytes,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> AsyncIterator[Connection]:
    """Open an authenticated :class:`Connection` to the server at ``address``.

    Raises :class:`AuthenticationError` if the server does not prove it knows
    ``secret``, and ``OSError`` if nothing listens there.
    """
    with anyio.fail_after(timeout):
        raw = await _open_stream(address)
    frames = _FrameStream(raw, max_frame_size)
    try:
        with anyio.fail_after(timeout):
            hello = await frames.read_exactly(len(MAGIC) + NONCE_SIZE)
            if not hello.startswith(MAGIC):
                raise AuthenticationError(f"{address} is not a trioserve RPC server")
            nonce_c = secrets.token_bytes(NONCE_SIZE)
            await frames.write_raw(_mac(secret, b"client", hello[len(MAGIC) :]) + nonce_c)
            proof = await frames.read_exactly(DIGEST_SIZE)
            if not hmac.compare_digest(proof, _mac(secret, b"server", nonce_c)):
                raise AuthenticationError(f"{address} does not know the instance secret")
    except (anyio.EndOfStream, anyio.BrokenResourceError, ProtocolError) as exc:
        await anyio.aclose_forcefully(raw)
        raise AuthenticationError(
            f"{address} closed the connection during the handshake: wrong instance secret?"
        ) from exc
    except BaseException:
        await anyio.aclose_forcefully(raw)
        raise
    conn = Connection(frames, address)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn._read_loop)
            frames.start_writer(tg)
            try:
                yield conn
            finally:
                tg.cancel_scope.cancel()
                await conn.aclose()
    except BaseExceptionGroup as group:
        # The reader task never raises: the one error is the caller's own, and
        # the caller should see it as raised, not wrapped in a group.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        error.__suppress_context__ = True
        raise error  # noqa: B904


# ---------------------------------------------------------------------------- server

Handler = Callable[..., Any]


def takes_inbox(fn: Handler) -> Handler:
    """Mark a streaming method as taking the caller's inputs.

    The server then calls it as ``fn(inbox, *args, **kwargs)``, ``inbox``
    being an :class:`Inbox` of what the caller sends with :meth:`Stream.send`.

    Such a method either returns (or is) an iterable of its replies, as any
    streaming method, or is a coroutine function that sends its replies
    itself with :meth:`Inbox.send` and :meth:`Inbox.send_last` and returns
    None: that saves a generator, and lets the method go on after the last
    reply (see :meth:`Inbox.send_last`). When it returns, the stream ends
    (``END``) unless it ended it already.
    """
    fn._rpc_takes_inbox = True  # type: ignore[attr-defined]
    return fn


class _Call:
    """What the server knows of one running call."""

    __slots__ = ("credit", "ended", "inbox", "scope", "task")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        """Cancelled by the caller's ``CANCEL``, or when the connection ends."""
        self.task: Any = None
        """The call's asyncio task, under asyncio (see :meth:`_ServerConnection._serve_calls`)."""
        self.credit: _Credit | None = None
        """A stream's credit: how many more chunks may go out."""
        self.inbox: Inbox | None = None
        """The inputs of a method that takes an inbox."""
        self.ended = False
        """The stream has ended (``LAST``) while the method runs on: nothing cancels it now."""


class Inbox:
    """The inputs a caller sends to a running stream, in order; and the way back.

    ``await inbox.receive()`` returns the next input; it raises
    ``anyio.EndOfStream`` when the call is over (cancelled, the connection
    closed, or the stream ended). Reading gives the caller credit to send more.

    A method that sends its replies itself uses :meth:`send` and
    :meth:`send_last`; both honour the stream's window.
    """

    __slots__ = ("_call", "_closed", "_conn", "_id", "_items", "_read", "_waiter", "_window")

    def __init__(self, conn: _ServerConnection, call_id: int, window: int, call: _Call) -> None:
        self._conn = conn
        self._id = call_id
        self._window = window
        self._call = call
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: _Event | None = None
        """Set when an input arrives or the inbox closes, while a reader waits."""
        self._closed = False
        self._read = 0

    def _deliver(self, value: Any) -> None:
        if self._closed:
            return  # the call is over: late inputs are dropped
        if len(self._items) >= self._window:
            raise ProtocolError(f"the caller overran the inbox window of call {self._id}")
        self._items.append(value)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    async def receive(self) -> Any:
        if self._items:
            await anyio.lowlevel.checkpoint()
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            if self._waiter is None:
                self._waiter = self._conn.frames.new_event()
            await self._waiter.wait()
        value = self._items.popleft()
        self._read += 1
        if self._read >= max(1, self._window // 2) and not self._closed:
            n, self._read = self._read, 0
            with contextlib.suppress(Exception):
                await self._conn.frames.write_frame([CREDIT, self._id, n])
        return value

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        """No more inputs: :meth:`receive` raises ``anyio.EndOfStream`` once those read are."""
        self._closed = True
        self._wake()

    async def send(self, value: Any) -> None:
        """Send ``value`` to the caller, as the next item of the stream.

        Waits while the caller has ``window`` items unread. Raises
        ``anyio.ClosedResourceError`` once the stream has ended, and
        :class:`FrameTooLarge` (after telling the caller, whose stream ends
        with that error) when ``value`` is over the frame limit. When the
        connection is lost, the method is cancelled, as when the caller cancels.
        """
        await self._push(CHUNK, value)

    async def send_last(self, value: Any) -> None:
        """Send ``value`` as the last item: it and the end of the stream go in one frame.

        The method may go on afterwards: from then on neither the caller
        nor the end of the connection cancels it, and the server sends no
        more for it. (An exception it raises then is logged.) Inputs still
        unread can be read; :meth:`receive` then raises ``anyio.EndOfStream``.
        """
        await self._push(LAST, value)

    async def _push(self, kind: int, value: Any) -> None:
        call = self._call
        if call.ended:
            raise anyio.ClosedResourceError("the stream has ended")
        assert call.credit is not None
        await call.credit.take()
        if call.ended:  # ended by another task while this one waited
            raise anyio.ClosedResourceError("the stream has ended")
        if kind == LAST:
            call.ended = True
            self.close()
        frames = self._conn.frames
        try:
            await frames.write_frame([kind, self._id, value], alone=len(self._conn.calls) == 1)
        except FrameTooLarge as exc:
            call.ended = True
            self.close()
            await frames.write_frame([ERROR, self._id, _error_payload(exc)])
            raise
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            if kind == LAST:
                return  # the stream is over either way: the method goes on
            # The caller can get nothing more: stop the method, as its CANCEL would.
            call.scope.cancel()
            await anyio.lowlevel.checkpoint()
            raise


class Server:
    """Serves the callables in ``methods`` to authenticated peers.

    A method is called with the caller's arguments. For a plain call it may be
    a coroutine function or return a value; for a streaming call it must return
    an async or sync iterable. An exception travels back to the caller. A
    cancelled call cancels the method's task. Each connection is independent:
    a peer that misbehaves is dropped and the others carry on.
    """

    def __init__(
        self,
        methods: Mapping[str, Handler],
        secret: bytes,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        name: str = "rpc",
    ) -> None:
        self.methods = dict(methods)
        self.secret = secret
        self.max_frame_size = max_frame_size
        self.name = name
        self.connections = 0
        self.dropped = 0

    async def serve(
        self,
        address: str = "tcp://127.0.0.1:0",
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` and serve until cancelled.

        ``task_status.started`` receives the address actually bound (with the
        port chosen when ``:0`` was asked for).
        """
        kind, where = parse_address(address)
        listener: anyio.abc.Listener[Any]
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(where))
            listener = await anyio.create_unix_listener(str(where))
            bound = address
        else:
            listener = await anyio.create_tcp_listener(local_host=kind, local_port=int(where))
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            host, port = sock.getsockname()[:2]
            bound = f"tcp://{host}:{port}"
        async with listener:
            task_status.started(bound)
            await listener.serve(self.handle_connection)

    async def handle_connection(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one connection until it closes or misbehaves."""
        frames = _FrameStream(stream, self.max_frame_size)
        try:
            with contextlib.suppress(Exception):
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not await self._handshake(frames):
                self.dropped += 1
                return
            self.connections += 1
            await _ServerConnection(self, frames).run()
        finally:
            await anyio.aclose_forcefully(stream)

    async def _handshake(self, frames: _FrameStream) -> bool:
        nonce_s = secrets.token_bytes(NONCE_SIZE)
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                await frames.write_raw(MAGIC + nonce_s)
                answer = await frames.read_exactly(DIGEST_SIZE + NONCE_SIZE)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, ProtocolError):
            log.info("%s: dropped a peer that did not finish the handshake", self.name)
            return False
        if not hmac.compare_digest(answer[:DIGEST_SIZE], _mac(self.secret, b"client", nonce_s)):
            log.warning("%s: dropped a peer that failed the secret challenge", self.name)
            return False
        try:
            await frames.write_raw(_mac(self.secret, b"server", answer[DIGEST_SIZE:]))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True


class _ServerConnection:
    def __init__(self, server: Server, frames: _FrameStream) -> None:
        self.server = server
        self.frames = frames
        self.calls: dict[int, _Call] = {}
        self._no_calls: anyio.Event | None = None
        """Set when the last call ends, while :meth:`_calls_done` waits for that."""

    async def run(self) -> None:
        async with anyio.create_task_group() as writer:
            # One task writes the replies: those of one event-loop turn go out
            # in one system call, and a reply costs its call no cancel scope.
            self.frames.start_writer(writer)
            try:
                await self._serve_calls()
            finally:
                writer.cancel_scope.cancel()

    async def _serve_calls(self) -> None:
        calls = self.calls
        methods = self.server.methods
        # Under asyncio each call runs in a plain asyncio task, which costs a
        # fraction of an anyio task (a task handle, a cancel scope and an event
        # more); the call's own cancel scope still cancels it, and the calls
        # are waited for below, as a task group would. Under trio, in `tg`.
        create_task = _asyncio_create_task()
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    message = await self.frames.read_frame()
                    kind = message[0]
                    if kind == CALL:
                        if len(message) != 6:
                            raise ProtocolError(f"malformed call frame: {message!r:.80}")
                        _, call_id, method, args, kwargs, window = message
                        if not isinstance(call_id, int) or call_id in calls:
                            raise ProtocolError(f"bad or duplicate call id {call_id!r}")
                        call = _Call()
                        if window:
                            call.credit = _Credit(int(window))
                            fn = methods.get(method) if isinstance(method, str) else None
                            if getattr(fn, "_rpc_takes_inbox", False):
                                # Now, not in the call's task: inputs may follow in this read.
                                call.inbox = Inbox(self, call_id, int(window), call)
                        calls[call_id] = call
                        if create_task is not None:
                            call.task = create_task(
                                self._run_call(call, call_id, method, args, kwargs, window)
                            )
                        else:
                            tg.start_soon(
                                self._run_call, call, call_id, method, args, kwargs, window
                            )
                    elif kind == CANCEL:
                        target = calls.get(message[1])
                        if target is not None and not target.ended:
                            target.scope.cancel()
                    elif kind == CREDIT:
                        target = calls.get(message[1])
                        if target is not None and target.credit is not None:
                            target.credit.add(int(message[2]))
                    elif kind == INPUT:
                        target = calls.get(message[1])
                        if target is not None and target.inbox is not None:
                            target.inbox._deliver(message[2])
                    else:
                        raise ProtocolError(f"unknown message type {kind!r}")
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            except Exception as exc:  # a malformed frame: [3], [6, 1, inf], ...
                self.server.dropped += 1
                log.warning("%s: closing a connection: %s", self.server.name, exc)
            finally:
                # The calls end with the connection; those whose stream has
                # ended already (Inbox.send_last) run on to their end.
                for call in calls.values():
                    if not call.ended:
                        call.scope.cancel()
                if create_task is not None and calls:
                    try:
                        await self._calls_done()
                    except anyio.get_cancelled_exc_class():
                        # This task is cancelled (the server stops): so is every call.
                        for call in calls.values():
                            call.scope.cancel()
                        with anyio.CancelScope(shield=True):
                            await self._calls_done()
                        raise

    async def _calls_done(self) -> None:
        """Wait until no call runs (the asyncio tasks of :meth:`_serve_calls`)."""
        while self.calls:
            if self._no_calls is None:
                self._no_calls = anyio.Event()
            await self._no_calls.wait()

    async def _run_call(
        self,
        call: _Call,
        call_id: int,
        method: str,
        args: Any,
        kwargs: Any,
        window: int,
    ) -> None:
        try:
            with call.scope:
                try:
                    fn = self.server.methods.get(method) if isinstance(method, str) else None
                    if fn is None:
                        raise LookupError(f"{self.server.name} has no method {method!r}")
                    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                        raise TypeError("call arguments must be a list and a map")
                    if window:
                        if call.inbox is not None:
                            args = (call.inbox, *args)
                        await self._run_stream(call, call_id, fn, args, kwargs)
                    else:
                        result = fn(*args, **kwargs)
                        if isinstance(result, Awaitable):
                            result = await result
                        await self._reply([RESULT, call_id, result])
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    if call.ended:  # the caller has its whole stream: nobody to tell
                        log.error(
                            "%s: %s (call %s) failed after its stream ended",
                            self.server.name,
                            method,
                            call_id,
                            exc_info=exc,
                        )
                    else:
                        await self._reply([ERROR, call_id, _error_payload(exc)])
        except Exception as exc:  # replying failed: the peer is gone or the value too big
            log.debug("%s: could not answer call %s: %s", self.server.name, call_id, exc)
        finally:
            calls = self.calls
            calls.pop(call_id, None)
            if call.inbox is not None:
                call.inbox.close()
            if not calls and self._no_calls is not None:
                self._no_calls.set()
                self._no_calls = None

    async def _run_stream(
        self, call: _Call, call_id: int, fn: Handler, args: Any, kwargs: Any
    ) -> None:
        result = fn(*args, **kwargs)
        if isinstance(result, Awaitable) and not hasattr(result, "__aiter__"):
            result = await result
        if result is None and call.inbox is not None:
            # The method sent its replies itself (Inbox.send, Inbox.send_last).
            if not call.ended:
                await self._reply([END, call_id])
            return
        credit = call.credit
        assert credit is not None
        if hasattr(result, "__aiter__"):
            agen = result
            try:
                async for item in agen:
                    await credit.take()
                    if isinstance(item, Last):
                        await self._reply([LAST, call_id, item.value])
                        return  # the `finally` closes the generator
                    await self._reply([CHUNK, call_id, item])
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
        elif isinstance(result, Iterable):
            iterator = iter(result)
            try:
                for item in iterator:
                    await credit.take()
                    if isinstance(item, Last):
                        await self._reply([LAST, call_id, item.value])
                        return
                    await self._reply([CHUNK, call_id, item])
            finally:  # run a generator's `finally` now, not when it is collected
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        else:
            raise TypeError(f"{fn!r} did not return an iterable for a streaming call")
        await self._reply([END, call_id])

    async def _reply(self, message: list[Any]) -> None:
        try:
            await self.frames.write_frame(message, alone=len(self.calls) == 1)
        except FrameTooLarge as exc:
            if message[0] == ERROR:
                raise
            await self.frames.write_frame([ERROR, message[1], _error_payload(exc)])


def _asyncio_create_task() -> Callable[[Coroutine[Any, Any, None]], Any] | None:
    """The running asyncio loop's ``create_task``; None under another event loop (trio)."""
    try:
        return asyncio.get_running_loop().create_task
    except RuntimeError:
        return None


class _Credit:
    """How many more chunks a stream may send; waits when there are none."""

    __slots__ = ("_more", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._more: anyio.Event | None = None
        """Set when credit comes, while a sender waits for it."""

    def add(self, n: int) -> None:
        self.n += max(0, n)
        more = self._more
        if more is not None:
            self._more = None
            more.set()

    async def take(self) -> None:
        while self.n <= 0:
            if self._more is None:
                self._more = anyio.Event()
            await self._more.wait()
        self.n -= 1
