"""Replica choice for handles and the proxy: which replica gets the next request.

The pieces, from the bottom up:

:class:`LongPollClient`
    one connection to the controller that long-polls ``listen`` for the keys
    its subscribers care about (``replicas/<app>/<deployment>``, ``routes``)
    and hands every new value to them. When the controller is away it retries,
    and the subscribers keep serving with what they have.
:class:`ReplicaPool`
    one multiplexed RPC connection per replica address, opened on first use.
:class:`Router`
    one per deployment: *power of two choices* over the RUNNING replicas,
    by the number of requests this caller has in flight at each; a request
    for a multiplexed model (``multiplexed_model_id`` in its meta) goes to
    the replicas that hold the model if one has room, else to those holding
    the fewest models (Ray Serve's rule). A replica
    at ``max_ongoing_requests`` (as far as this caller knows) is not chosen;
    one that rejects a request (:class:`~trioserve.exceptions.ReplicaRejected`:
    full, or draining) is skipped for a moment and the request goes
    elsewhere; an unreachable one (or one whose connection broke) is skipped
    for :data:`UNREACHABLE_BACKOFF_S`, or until the controller publishes
    the replica set again. Requests wait at the caller while no replica can
    take them, at most ``max_queued_requests`` of them
    (:class:`~trioserve.exceptions.BackPressureError` beyond that).
:class:`Routers`
    the routers of one event loop, sharing one long-poll connection and one
    pool: what a handle runtime or the proxy runs.

Everything here is written with anyio and runs under trio and asyncio.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from trioserve.core import rpc
from trioserve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaDiedError,
    ReplicaRejected,
)

__all__ = [
    "ADMITTED",
    "Channel",
    "InstanceAddress",
    "LongPollClient",
    "ReplicaPool",
    "Router",
    "Routers",
    "current_instance",
    "replicas_key",
    "set_current_instance",
]

log = logging.getLogger("trioserve.routing")

REJECTED_BACKOFF_S = 0.05
"""How long a replica that rejected a request is skipped by this caller."""
WAIT_STEP_MAX_S = 0.1
"""The longest a queued request sleeps before looking at the replicas again."""
LONG_POLL_RETRY_S = 0.5
MODEL_HINT_TTL_S = 2.0
"""How long a caller counts a replica it sent a request for a model it did not
hold as holding it: until the replica's report of the model reaches the caller,
further requests for the model go there rather than load it elsewhere."""
UNREACHABLE_BACKOFF_S = 1.0
"""How long a replica whose connection failed is skipped by this caller."""
QUEUED_REPORT_PERIOD_S = 1.0
"""How often a caller with waiting requests reports them to the controller."""


@dataclasses.dataclass(frozen=True)
class InstanceAddress:
    """Where this process finds its instance: the controller's RPC address and the secret."""

    controller: str
    secret: bytes


_instance: InstanceAddress | None = None


def set_current_instance(instance: InstanceAddress | None) -> None:
    """Make ``instance`` the one handles in this process talk to (None: no instance)."""
    global _instance
    _instance = instance


def current_instance() -> InstanceAddress:
    """The instance of this process; :class:`RayServeException` when there is none."""
    if _instance is None:
        raise RayServeException(
            "There is no running trioserve instance in this process. "
            "Call serve.run() or serve.start() first."
        )
    return _instance


def replicas_key(app: str, deployment: str) -> str:
    """The long-poll key of a deployment's replica set."""
    return f"replicas/{app}/{deployment}"


# ------------------------------------------------------------------------ long-poll


class LongPollClient:
    """Long-polls the controller for the subscribed keys; see the module docstring."""

    def __init__(self, instance: InstanceAddress, *, timeout_s: float = 30.0) -> None:
        self.instance = instance
        self.timeout_s = timeout_s
        self.versions: dict[str, int] = {}
        self._subscribers: dict[str, list[Callable[[Any], None]]] = {}
        self._scope: anyio.CancelScope | None = None

    def subscribe(self, key: str, callback: Callable[[Any], None]) -> None:
        """Call ``callback(value)`` with the key's value now (once known) and on every change."""
        self._subscribers.setdefault(key, []).append(callback)
        if key not in self.versions:
            # -1: ask for the key's current value, even "never published" (None).
            self.versions[key] = -1
            if self._scope is not None:
                self._scope.cancel()  # ask again, with the new key

    async def run(self) -> None:
        """Poll until cancelled, reconnecting when the controller is away."""
        while True:
            try:
                async with rpc.connect(self.instance.controller, self.instance.secret) as ctl:
                    while True:
                        updates: Any = None
                        with anyio.CancelScope() as scope:
                            self._scope = scope
                            updates = await ctl.call("listen", dict(self.versions), self.timeout_s)
                        self._scope = None
                        if scope.cancelled_caught or not isinstance(updates, Mapping):
                            continue
                        for key, (version, value) in updates.items():
                            if version > self.versions.get(key, -1):
                                self.versions[key] = version
                                for callback in self._subscribers.get(key, ()):
                                    callback(value)
            except (OSError, rpc.RpcError) as exc:
                log.debug("long-poll: the controller is unreachable (%s); retrying", exc)
            except Exception:
                log.exception("long-poll failed; retrying")
            self._scope = None
            await anyio.sleep(LONG_POLL_RETRY_S)


# ------------------------------------------------------------------------ connections


class _Attempt:
    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.conn: rpc.Connection | None = None
        self.error: BaseException | None = None
        self.scope = anyio.CancelScope()


class ReplicaPool:
    """One RPC connection per replica address, each held open by a task in ``tg``."""

    def __init__(self, secret: bytes, tg: anyio.abc.TaskGroup) -> None:
        self.secret = secret
        self._tg = tg
        self._attempts: dict[str, _Attempt] = {}

    async def get(self, address: str) -> rpc.Connection:
        """An open connection to ``address``; ``OSError`` / ``RpcError`` if it cannot be had."""
        attempt = self._attempts.get(address)
        if attempt is not None and attempt.conn is not None and not attempt.conn.closed:
            return attempt.conn
        if attempt is None or attempt.ready.is_set():
            attempt = _Attempt()
            self._attempts[address] = attempt
            self._tg.start_soon(self._hold, address, attempt)
        await attempt.ready.wait()
        if attempt.conn is None or attempt.conn.closed:
            raise attempt.error or rpc.ConnectionLost(f"connection to {address} lost")
        return attempt.conn

    async def _hold(self, address: str, attempt: _Attempt) -> None:
        try:
            with attempt.scope:
                async with rpc.connect(address, self.secret) as conn:
                    attempt.conn = conn
                    attempt.ready.set()
                    await conn.wait_closed()
        except Exception as exc:
            attempt.error = exc
        finally:
            attempt.ready.set()
            if self._attempts.get(address) is attempt:
                del self._attempts[address]

    def forget(self, address: str) -> None:
        """Close the connection to ``address`` (its replica is gone)."""
        attempt = self._attempts.pop(address, None)
        if attempt is not None:
            attempt.scope.cancel()


# ------------------------------------------------------------------------ router


@dataclasses.dataclass
class _Replica:
    id: str
    address: str
    inflight: int = 0
    skip_until: float = 0.0
    unreachable_until: float = 0.0
    """Skipped until then: its connection failed (it may have died; if not, it is retried)."""
    retired: bool = False
    models: frozenset[str] = frozenset()
    """The multiplexed model ids the replica reported (held or being loaded)."""
    hints: dict[str, float] = dataclasses.field(default_factory=dict)
    """Model ids this caller sent here and the replica has not reported yet:
    when each hint expires (see :data:`MODEL_HINT_TTL_S`)."""

    def holds(self, model_id: str, now: float) -> bool:
        return model_id in self.models or self.hints.get(model_id, 0.0) > now

    def model_count(self, now: float) -> int:
        return len(self.models) + sum(
            1 for m, until in self.hints.items() if until > now and m not in self.models
        )


class Router:
    """Routes the calls of one caller to the replicas of one deployment."""

    def __init__(
        self, app: str, deployment: str, pool: ReplicaPool, *, rng: random.Random | None = None
    ) -> None:
        self.app = app
        self.deployment = deployment
        self.pool = pool
        self.rng = rng or random.Random()
        self.replicas: dict[str, _Replica] = {}
        self.max_ongoing_requests = 1
        self.max_queued_requests = -1
        self.known = False
        self.exists = True
        self.failed = False
        self.autoscaling = False
        """Whether the deployment autoscales (with no replica, requests wait for one)."""
        self._at_address: collections.Counter[str] = collections.Counter()
        """Requests in flight per replica address (one connection each)."""
        self.queued = 0
        """Requests of this caller waiting for a replica (reported for autoscaling)."""
        self.on_first_queued: Callable[[], None] | None = None
        self._changed = anyio.Event()
        self._waiting = 0
        """Requests waiting for a change (only then does a change need an event)."""

    # -- the replica set

    def update(self, value: Mapping[str, Any] | None) -> None:
        """Take a new replica set from the controller (None: the deployment is gone)."""
        self.known = True
        if value is None:
            self.exists = False
            gone, self.replicas = self.replicas, {}
            for r in gone.values():
                self._retire(r)
        else:
            self.exists = True
            self.failed = bool(value.get("failed", False))
            self.autoscaling = bool(value.get("autoscaling", False))
            self.max_ongoing_requests = int(value.get("max_ongoing_requests", 1))
            self.max_queued_requests = int(value.get("max_queued_requests", -1))
            fresh: dict[str, _Replica] = {}
            for item in value.get("replicas", ()):
                old = self.replicas.get(item["id"])
                if old is not None and old.address == item["address"]:
                    old.unreachable_until = 0.0
                    fresh[old.id] = old
                else:
                    fresh[item["id"]] = _Replica(item["id"], item["address"])
                r = fresh[item["id"]]
                r.models = frozenset(str(m) for m in item.get("models", ()))
                for m in r.models & r.hints.keys():
                    del r.hints[m]  # reported: the hint has done its work
            previous, self.replicas = self.replicas, fresh
            for rid, r in previous.items():
                if rid not in fresh:
                    self._retire(r)
        self._notify()

    def _retire(self, replica: _Replica) -> None:
        """A replica left the set (it drains, or is gone): close its connection once
        this caller has no request left on it, so that requests in flight finish."""
        replica.retired = True
        address = replica.address
        if not self._at_address.get(address) and not any(
            r.address == address for r in self.replicas.values()
        ):
            self.pool.forget(address)

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = anyio.Event()

    def _check_available(self) -> None:
        if not self.exists:
            raise DeploymentUnavailableError(self.deployment, self.app, "it does not exist")
        if self.failed and not self.replicas:
            raise DeploymentUnavailableError(self.deployment, self.app, "it failed to deploy")

    # -- choosing

    async def _choose(self, model_id: str = "") -> _Replica:
        """Reserve a slot at a replica, waiting (queued) until one has room.

        With a ``model_id``, the choice is among the replicas with room that
        hold the model if any, else among those holding the fewest models
        (see :meth:`_for_model`).
        """
        if 0 <= self.max_queued_requests <= self.queued:
            raise BackPressureError(
                num_queued_requests=self.queued, max_queued_requests=self.max_queued_requests
            )
        if self.known:
            # Most requests find room at once: they never count as queued.
            chosen = self._pick(model_id)
            if chosen is not None:
                return chosen
        self.queued += 1
        if self.queued == 1 and not self.replicas and self.on_first_queued is not None:
            self.on_first_queued()  # scale from zero: tell the controller now
        try:
            step = 0.005
            while True:
                changed = self._changed
                self._waiting += 1
                try:
                    if self.known:  # look again now and then: backoffs run out unannounced
                        with anyio.move_on_after(step):
                            await changed.wait()
                        step = min(step * 2, WAIT_STEP_MAX_S)
                    else:  # only the first replica set can change anything
                        await changed.wait()
                finally:
                    self._waiting -= 1
                if self.known:
                    chosen = self._pick(model_id)
                    if chosen is not None:
                        return chosen
        finally:
            self.queued -= 1

    def _pick(self, model_id: str) -> _Replica | None:
        """Reserve a slot at a replica with room now (power of two choices), if any."""
        self._check_available()
        limit = self.max_ongoing_requests
        now = 0.0
        timed = False  # the clock is read only when a replica is backed off, or for a model
        candidates = []
        for r in self.replicas.values():
            if r.inflight >= limit:
                continue
            if r.unreachable_until or r.skip_until:
                if not timed:
                    now, timed = anyio.current_time(), True
                if r.unreachable_until > now or r.skip_until > now:
                    continue
                r.unreachable_until = r.skip_until = 0.0  # both are over
            candidates.append(r)
        if not candidates:
            return None
        if model_id:
            if not timed:
                now = anyio.current_time()
            candidates = _for_model(candidates, model_id, now)
        n = len(candidates)
        if n == 1:
            chosen = candidates[0]
        else:
            rng = self.rng
            i = int(rng.random() * n)
            j = int(rng.random() * (n - 1))
            a, b = candidates[i], candidates[j + 1 if j >= i else j]
            chosen = a if a.inflight <= b.inflight else b
        if model_id and not chosen.holds(model_id, now):
            chosen.hints = {m: t for m, t in chosen.hints.items() if t > now}
            chosen.hints[model_id] = now + MODEL_HINT_TTL_S
        chosen.inflight += 1
        at_address = self._at_address
        at_address[chosen.address] = at_address.get(chosen.address, 0) + 1
        return chosen

    def _release(self, replica: _Replica) -> None:
        replica.inflight -= 1
        at_address = self._at_address
        left = at_address[replica.address] - 1
        if left:
            at_address[replica.address] = left
        else:
            del at_address[replica.address]
        if replica.retired:
            self._retire(replica)
        if self._waiting:
            self._notify()

    async def _connect(self, replica: _Replica) -> rpc.Connection | None:
        try:
            return await self.pool.get(replica.address)
        except (OSError, rpc.RpcError, TimeoutError) as exc:
            log.info("replica %s at %s is unreachable: %s", replica.id, replica.address, exc)
            replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
            return None

    # -- calling

    async def call(self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None) -> Any:
        """Send one request to a replica and return its result (or raise its exception)."""
        while True:
            replica = await self._choose(_model_of(meta))
            try:
                conn = await self._connect(replica)
                if conn is None:
                    continue
                try:
                    return await conn.call("handle_request", meta, args, kwargs or {})
                except ReplicaRejected:
                    replica.skip_until = anyio.current_time() + REJECTED_BACKOFF_S
                    continue
                except rpc.ConnectionLost as exc:
                    replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
                    raise self._died(replica) from exc
            finally:
                self._release(replica)

    @contextlib.asynccontextmanager
    async def stream(
        self, meta: Mapping[str, Any], args: Any = (), kwargs: Any = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Send one streaming request; the body iterates over the items the replica yields.

        Leaving the body early cancels the generator in the replica.
        """
        async with _Open(self, "handle_request_streaming", meta, (args, kwargs or {})) as opened:
            replica, items, first = opened
            yield self._rest(replica, items, first)

    def channel(self, meta: Mapping[str, Any], *args: Any) -> _OpenChannel:
        """Open a two-way stream to the replica's ``handle_asgi`` (the proxy's requests):
        ``async with router.channel(meta, scope) as channel``.

        The replica's first item says that it admitted the request, so a full
        or draining replica is skipped like for any call; the body then sends
        inputs with :meth:`Channel.send` and iterates over the replies.
        """
        return _OpenChannel(self, "handle_asgi", meta, args)

    async def _rest(
        self, replica: _Replica, items: rpc.Stream, first: tuple[Any] | None
    ) -> AsyncIterator[Any]:
        if first is None:
            return
        yield first[0]
        try:
            async for item in items:
                yield item
        except rpc.ConnectionLost as exc:
            replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
            raise self._died(replica) from exc

    def _died(self, replica: _Replica) -> ReplicaDiedError:
        return ReplicaDiedError(
            f"Replica {replica.id} of deployment '{self.deployment}' in application "
            f"'{self.app}' died while handling the request; it is not retried, because "
            "it may have had effects. The next request goes to a live replica."
        )


def _model_of(meta: Mapping[str, Any]) -> str:
    """The multiplexed model id a request is for (``""``: none)."""
    return str(meta.get("multiplexed_model_id") or "")


def _for_model(candidates: list[_Replica], model_id: str, now: float) -> list[_Replica]:
    """Ray Serve's multiplexed routing over the replicas that have room: those
    that hold ``model_id``, else those that hold the fewest models (so that
    models spread over the replicas before any replica unloads one)."""
    holders = [r for r in candidates if r.holds(model_id, now)]
    if holders:
        return holders
    counts = [r.model_count(now) for r in candidates]
    fewest = min(counts)
    return [r for r, n in zip(candidates, counts, strict=True) if n == fewest]


ADMITTED = {"type": "trioserve.admitted"}
"""The first item of a replica's ``handle_asgi`` when the request's body is still to
come: the replica took the request, the proxy may send the body."""


class _Open:
    """``async with _Open(router, method, meta, args) as (replica, stream, first)``:
    the streaming ``method(meta, *args)`` called at a replica that admits it,
    ``first`` being ``(first item,)`` or None. A replica that rejects the call
    is skipped and another chosen; one whose connection breaks is a
    :class:`~trioserve.exceptions.ReplicaDiedError`. Leaving closes the
    stream (cancelling it at the replica if not over) and frees the slot."""

    __slots__ = ("_args", "_items", "_meta", "_method", "_replica", "_router")

    def __init__(
        self, router: Router, method: str, meta: Mapping[str, Any], args: tuple[Any, ...]
    ) -> None:
        self._router = router
        self._method = method
        self._meta = meta
        self._args = args
        self._replica: _Replica | None = None
        self._items: rpc.Stream | None = None

    async def __aenter__(self) -> tuple[_Replica, rpc.Stream, tuple[Any] | None]:
        router = self._router
        model_id = _model_of(self._meta)
        while True:
            replica = await router._choose(model_id)
            items: rpc.Stream | None = None
            try:
                conn = await router._connect(replica)
                if conn is None:
                    router._release(replica)
                    continue
                items = await conn.stream(self._method, self._meta, *self._args)
                try:
                    first: tuple[Any] | None = (await items.__anext__(),)
                except StopAsyncIteration:
                    first = None
                except ReplicaRejected:
                    replica.skip_until = anyio.current_time() + REJECTED_BACKOFF_S
                    await items.aclose()
                    router._release(replica)
                    continue
                except rpc.ConnectionLost as exc:
                    replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
                    raise router._died(replica) from exc
            except BaseException:
                try:
                    if items is not None:
                        await items.aclose()
                finally:
                    router._release(replica)
                raise
            self._replica, self._items = replica, items
            return replica, items, first

    async def __aexit__(self, *exc: object) -> None:
        assert self._replica is not None and self._items is not None
        try:
            await self._items.aclose()
        finally:
            self._router._release(self._replica)


class _OpenChannel(_Open):
    """What :meth:`Router.channel` returns: :class:`_Open` that gives a :class:`Channel`."""

    __slots__ = ()

    async def __aenter__(self) -> Channel:  # type: ignore[override]
        replica, items, first = await super().__aenter__()
        # A request sent whole (``meta["complete"]``) is answered at once,
        # without ADMITTED first: the first item is already the answer.
        answer = None if first is None or first[0] == ADMITTED else first
        return Channel(self._router, replica, items, answer)


class Channel:
    """A two-way stream to one replica, opened by :meth:`Router.channel`."""

    def __init__(
        self,
        router: Router,
        replica: _Replica,
        items: rpc.Stream,
        first: tuple[Any] | None = None,
    ) -> None:
        self._router = router
        self.replica_id = replica.id
        self._replica = replica
        self._items = items
        self._first = first

    async def send(self, value: Any) -> None:
        """Send one input; raises :class:`~trioserve.exceptions.ReplicaDiedError`
        when the replica is gone."""
        try:
            await self._items.send(value)
        except rpc.ConnectionLost as exc:
            self._replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
            raise self._router._died(self._replica) from exc

    def __aiter__(self) -> Channel:
        """The replies, in order; :class:`~trioserve.exceptions.ReplicaDiedError` if it dies."""
        return self

    async def __anext__(self) -> Any:
        first = self._first
        if first is not None:
            self._first = None
            return first[0]
        try:
            return await self._items.__anext__()
        except rpc.ConnectionLost as exc:
            self._replica.unreachable_until = anyio.current_time() + UNREACHABLE_BACKOFF_S
            raise self._router._died(self._replica) from exc


class Routers:
    """The routers of one event loop: one long-poll connection, one pool, a router each.

    Run it with ``await tg.start(routers.run)``; :meth:`get` may be called after that.
    """

    def __init__(self, instance: InstanceAddress) -> None:
        self.instance = instance
        self.long_poll = LongPollClient(instance)
        self.caller_id = uuid.uuid4().hex
        self._routers: dict[tuple[str, str], Router] = {}
        self._pool: ReplicaPool | None = None
        self._report_now = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._pool = ReplicaPool(self.instance.secret, tg)
            tg.start_soon(self.long_poll.run)
            tg.start_soon(self._report_queued)
            task_status.started()
            await anyio.sleep_forever()

    async def _report_queued(self) -> None:
        """Tell the controller how many requests wait here, per deployment (autoscaling).

        Every :data:`QUEUED_REPORT_PERIOD_S` while some wait (and once more
        when none wait any more), and at once when a request starts waiting
        for a deployment without replicas, so that it scales from zero.
        """
        last: dict[str, int] = {}
        while True:
            try:
                async with rpc.connect(self.instance.controller, self.instance.secret) as ctl:
                    while True:
                        with anyio.move_on_after(QUEUED_REPORT_PERIOD_S):
                            await self._report_now.wait()
                        self._report_now = anyio.Event()
                        queued = {
                            f"{app}/{dep}": r.queued
                            for (app, dep), r in self._routers.items()
                            if r.queued or f"{app}/{dep}" in last
                        }
                        if queued:
                            await ctl.call("report_queued", self.caller_id, queued)
                        last = {key: n for key, n in queued.items() if n}
            except (OSError, rpc.RpcError, TimeoutError) as exc:
                log.debug("cannot report queued requests to the controller: %s", exc)
            await anyio.sleep(QUEUED_REPORT_PERIOD_S)

    def _wake_reporter(self) -> None:
        self._report_now.set()

    def all(self) -> list[Router]:
        """The routers made so far (the proxy's metrics read their queues and replicas)."""
        return list(self._routers.values())

    def get(self, app: str, deployment: str) -> Router:
        """The router of ``deployment`` in ``app``, subscribed to its replica set."""
        key = (app, deployment)
        router = self._routers.get(key)
        if router is None:
            assert self._pool is not None, "Routers.run has not started"
            router = Router(app, deployment, self._pool)
            router.on_first_queued = self._wake_reporter
            self._routers[key] = router
            self.long_poll.subscribe(replicas_key(app, deployment), router.update)
        return router
