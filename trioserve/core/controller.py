"""The controller shell: the pure core of :mod:`trioserve.core.reconcile`, run for real.

A :class:`Controller` owns the event log (through a :class:`~trioserve.core.journal.Journal`
called from one worker thread), and:

* records **intents** from its API (``deploy``, ``delete``) and
  **observations** from the world (a replica reports it is running, a process
  exits, a health check fails), dropping an observation that no longer fits
  the state (it is stale) instead of writing it;
* runs ``decide`` after every change and on a tick of :data:`TICK_S`, records
  the **decisions**, and carries them out with its effectors: launch a
  process, ask a replica to drain or reconfigure, SIGTERM, SIGKILL;
* health-checks every RUNNING replica each ``health_check_period_s``;
* serves *long-poll*: data-plane processes ask for ``routes``,
  ``replicas/<app>/<deployment>`` and ``proxy_logging`` (the proxy's
  ``logging_config``) newer than the version they hold, and get
  an answer as soon as one changes. A version is ``seq << VERSION_SHIFT``
  for a change made by the log event ``seq``, plus one for each change made
  since without a log event (a replica's multiplexed model ids, which it
  reports with its load): so versions keep increasing across controller
  restarts, whose new events have greater seqs.
* with ``http_options``, keeps one HTTP proxy process running
  (:mod:`trioserve.proxy`): it records ``ProxyStarted`` when the proxy
  reports that it listens and ``ProxyExited`` when it exits, and starts a new
  one after a back-off. ``wait_app`` returns a RUNNING application only once
  the proxy routes by a route table that holds it.

Every transition of a replica into STOPPING, whether decided
(``ReplicaStopping``) or observed (``ReplicaDrained``, ``ReplicaStartFailed``,
``ReplicaDied``), sends SIGTERM to its process; ``ReplicaKilled`` sends SIGKILL.
Effects follow only events recorded by this controller, never replayed ones.

Its RPC methods (served on ``address``) are listed in :meth:`Controller.rpc_methods`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from trioserve.core import events as ev
from trioserve.core import rpc
from trioserve.core.autoscaling import LoadSample
from trioserve.core.config import HTTPOptions
from trioserve.core.events import DeploymentSpec, Event
from trioserve.core.journal import DEFAULT_SNAPSHOT_EVERY, Journal
from trioserve.core.launcher import (
    AdoptedProcess,
    FoundProcess,
    LaunchedProcess,
    Launcher,
    describe_exit,
)
from trioserve.core.logs import check_logging_config
from trioserve.core.state import (
    Application,
    AppStatus,
    ClusterState,
    IllegalTransition,
    Replica,
    ReplicaState,
    app_status,
    deployment_status,
)
from trioserve.store import EventLog

__all__ = ["TICK_S", "Controller", "status_of"]

log = logging.getLogger("trioserve.controller")

T = TypeVar("T")
S = ReplicaState

TICK_S = 0.5
"""How often the controller decides when nothing happens (time-based rules)."""
LOAD_SAMPLE_PERIOD_S = 1.0
LONG_POLL_TIMEOUT_S = 30.0
PROXY_RESTART_MIN_S = 0.5
PROXY_RESTART_MAX_S = 30.0
"""The proxy is restarted after 0.5 s, doubling to 30 s while it keeps failing."""
REPORT_STALE_S = 5.0
"""A replica's load report older than this no longer counts."""

LOST_REASON = "lost: the controller restarted and the process was not found"
GONE_WHILE_AWAY_REASON = "its process ended while the controller was down"
VERSION_SHIFT = 32
"""Published versions are ``seq << VERSION_SHIFT`` (+ changes outside the log)."""


class Controller:
    """One instance's controller. Run it with ``await tg.start(controller.run)``.

    ``log`` is the event log it owns, ``launcher`` starts replica processes,
    ``secret`` authenticates every RPC connection. ``clock`` gives the time
    recorded in events (seconds). ``resources`` is what the instance has for
    replicas (resource name to amount, see :mod:`trioserve.core.placement`),
    recorded in ``ControllerStarted``; ``None`` places every replica.
    """

    def __init__(
        self,
        log: EventLog,
        launcher: Launcher,
        secret: bytes,
        *,
        listen: str = "tcp://127.0.0.1:0",
        tick_s: float = TICK_S,
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 10.0,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        clock: Callable[[], float] = time.time,
        resources: Mapping[str, float] | None = None,
        http_options: HTTPOptions | None = None,
        logging_config: Mapping[str, Any] | None = None,
        adopt: bool = False,
    ) -> None:
        self.log = log
        self.launcher = launcher
        self.secret = secret
        self.listen_address = listen
        self.tick_s = tick_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.snapshot_every = snapshot_every
        self.clock = clock
        self.resources = (
            None if resources is None else {str(k): float(v) for k, v in resources.items()}
        )
        self.http_options = http_options if http_options and http_options.enabled else None
        self.logging_config = (
            None if logging_config is None else check_logging_config(logging_config)
        )
        """The instance's ``logging_config`` (``serve.start(logging_config=...)``), a
        setting like ``http_options``: the proxy's, unless the config file deployed
        last sets one (see :func:`_published_values`)."""
        self.adopt = adopt
        self.address = ""
        self._adopted_proxy: AdoptedProcess | None = None
        self._adopted_proxy_url = ""
        self._proxy_proc: LaunchedProcess | None = None
        self._proxy_start_error = ""
        self._proxy_start_failed = False
        """The last proxy could not listen (its port is taken): not worth waiting for."""
        self._proxy_routes_version = 0
        self._journal: Journal | None = None
        self._lock = anyio.Lock()
        self._db_limiter = anyio.CapacityLimiter(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._published: dict[str, tuple[int, Any]] = {}
        self._procs: dict[str, LaunchedProcess] = {}
        self._launching: set[str] = set()
        self._scopes: dict[str, list[anyio.CancelScope]] = collections.defaultdict(list)
        self._reports: dict[str, tuple[float, int]] = {}
        self._models: dict[str, tuple[str, ...]] = {}
        """The multiplexed model ids each replica holds or loads, as it reported them."""
        self._version = 0
        """The last version published."""
        self._queued: dict[str, tuple[float, dict[str, int]]] = {}
        """Requests waiting at each caller, by deployment: (when reported, counts)."""
        self._samples: dict[tuple[str, str], collections.deque[LoadSample]] = {}
        self._next_sample_at = 0.0
        self.server = rpc.Server(self.rpc_methods(), secret, name="controller")

    # ------------------------------------------------------------------ running

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the journal, serve and reconcile until cancelled.

        ``task_status.started`` gets the controller's RPC address. When the
        controller is cancelled, every process it started is stopped (SIGTERM,
        then SIGKILL after ``stop_timeout_s``).
        """
        self._journal = await self._db(
            functools.partial(Journal.open, self.log, snapshot_every=self.snapshot_every)
        )
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.address = await tg.start(self.server.serve, self.listen_address)
                prior_proxy_url = self.state.proxy_url
                await self._record(
                    [
                        ev.ControllerStarted(
                            at=self.clock(),
                            instance_id=self.log.instance_id,
                            pid=os.getpid(),
                            start_timeout_s=self.start_timeout_s,
                            stop_timeout_s=self.stop_timeout_s,
                            resources=self.resources,
                        )
                    ],
                    durable=True,
                )
                if self.adopt:
                    await self._adopt_processes(prior_proxy_url)
                else:
                    await self._forget_lost_replicas()
                tg.start_soon(self._control_loop)
                if self.http_options is not None:
                    tg.start_soon(self._proxy_loop, self.http_options)
                task_status.started(self.address)
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all_processes()

    @property
    def journal(self) -> Journal:
        """The log and its state, kept in step (once :meth:`run` has opened it)."""
        assert self._journal is not None, "the controller is not running"
        return self._journal

    @property
    def state(self) -> ClusterState:
        """The current state (read it from the controller's event loop only)."""
        return self.journal.state

    async def _db(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, limiter=self._db_limiter)

    async def _record(
        self,
        events: Sequence[Event] | Callable[[ClusterState], Sequence[Event]],
        *,
        durable: bool = False,
    ) -> list[Event]:
        """Record ``events`` (or what ``events(state)`` gives under the lock).

        A stale observation (:class:`IllegalTransition`) is dropped and logged.
        Returns what was recorded.
        """
        async with self._lock:
            batch = list(events(self.state) if callable(events) else events)
            if not batch:
                return []
            try:
                stored = await self._db(
                    functools.partial(self.journal.record, batch, durable=durable)
                )
            except IllegalTransition as exc:
                log.info("dropped a stale observation: %s", exc)
                return []
            self._publish(stored[-1].seq)
        self._carry_out(batch)
        self._wake.set()
        return batch

    async def _control_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.tick_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self.step()

    async def step(self) -> list[Event]:
        """Decide once, record the decisions and carry them out."""
        async with self._lock:
            now = self.clock()
            load = self._load(now)
            journal = self.journal
            decisions = await self._db(functools.partial(journal.step, now, load))
            if decisions:
                self._publish(journal.seq)
        if decisions:
            self._carry_out(decisions)
        return decisions

    async def _forget_lost_replicas(self) -> None:
        """Replicas in the log whose processes this controller did not start."""

        def lost(state: ClusterState) -> list[Event]:
            now = self.clock()
            out: list[Event] = []
            for r in list(state.replicas.values()):
                out += _gone(r, now, None, LOST_REASON)
                _terminate_stray(r.pid, r.id)
            return out

        await self._record(lost)

    async def _adopt_processes(self, prior_proxy_url: str) -> None:
        """Take over the replicas and the proxy an earlier controller left running.

        A replica of the log whose process still runs is adopted
        (``ReplicaAdopted``) and carries on in its state; one whose process
        is gone died while the controller was away (``ReplicaDied``), so the
        reconciler replaces it. Processes of this instance the log does not
        know are stopped. The proxy is adopted when it serves with the options
        this controller was given, and replaced otherwise.
        """
        found = await anyio.to_thread.run_sync(self.launcher.find_processes)
        replicas: dict[str, FoundProcess] = {}
        proxies: list[FoundProcess] = []
        for process in found:
            replica = process.option("--replica")
            if process.kind == "replica" and replica is not None:
                replicas[replica] = process
            elif process.kind == "proxy":
                proxies.append(process)
        adopted: dict[str, AdoptedProcess] = {}

        def take_over(state: ClusterState) -> list[Event]:
            now = self.clock()
            out: list[Event] = []
            for r in list(state.replicas.values()):
                process = replicas.pop(r.id, None)
                if process is None:
                    out += _gone(r, now, None, GONE_WHILE_AWAY_REASON)
                else:
                    adopted[r.id] = AdoptedProcess(process)
                    out.append(ev.ReplicaAdopted(at=now, replica=r.id, pid=process.pid))
            return out

        await self._record(take_over)
        for replica, process in replicas.items():
            log.warning(
                "replica %s: process %d is not in the log; stopping it", replica, process.pid
            )
            AdoptedProcess(process).terminate()
        for replica, proc in adopted.items():
            r = self.state.replicas.get(replica)
            if r is None:
                continue
            log.info("replica %s: adopted process %d (%s)", replica, proc.pid, r.state.value)
            self._procs[replica] = proc
            self._spawn(self._watch, replica, proc)
            if r.state is S.RUNNING and r.address is not None:
                self._spawn(self._health_loop, replica, r.address)
            elif r.state is S.DRAINING:
                self._spawn(self._drain, replica)
            elif r.state is S.STOPPING:
                proc.terminate()
        wanted = None if self.http_options is None else self.http_options.to_dict()
        for process in proxies:
            if (
                self._adopted_proxy is None
                and wanted is not None
                and _json_option(process, "--options") == wanted
            ):
                self._adopted_proxy = AdoptedProcess(process)
                self._adopted_proxy_url = prior_proxy_url
                log.info("proxy: adopted process %d", process.pid)
            else:
                log.warning("proxy: process %d serves other options; stopping it", process.pid)
                AdoptedProcess(process).terminate()

    # ------------------------------------------------------------------ effectors

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args)

    def _carry_out(self, events: Sequence[Event]) -> None:
        for e in events:
            if isinstance(e, ev.ReplicaStarting):
                self._spawn(self._start_replica, e.replica)
            elif isinstance(e, ev.ReplicaRunning):
                self._spawn(self._health_loop, e.replica, e.address)
            elif isinstance(e, ev.ReplicaReconfigured):
                self._spawn(self._reconfigure, e.replica)
            elif isinstance(e, ev.ReplicaDraining):
                self._spawn(self._drain, e.replica)
            elif isinstance(
                e, (ev.ReplicaStopping, ev.ReplicaDrained, ev.ReplicaStartFailed, ev.ReplicaDied)
            ):
                self._terminate(e.replica)
            elif isinstance(e, ev.ReplicaKilled):
                self._cancel_tasks(e.replica)
                proc = self._procs.get(e.replica)
                if proc is not None:
                    log.warning("replica %s: SIGKILL (%s)", e.replica, e.reason)
                    proc.kill()
                elif e.replica not in self._launching:
                    self._spawn(self._exited, e.replica, None)
            elif isinstance(e, ev.ReplicaExited):
                self._cancel_tasks(e.replica)
                self._procs.pop(e.replica, None)
                self._reports.pop(e.replica, None)
                self._models.pop(e.replica, None)

    def _cancel_tasks(self, replica: str) -> None:
        for scope in self._scopes.pop(replica, []):
            scope.cancel()

    def _terminate(self, replica: str) -> None:
        self._cancel_tasks(replica)
        proc = self._procs.get(replica)
        if proc is not None:
            proc.terminate()
        elif replica not in self._launching:
            # No process was ever started (or it could not be): nothing will exit.
            self._spawn(self._exited, replica, None)

    async def _exited(self, replica: str, code: int | None) -> None:
        def make(state: ClusterState) -> list[Event]:
            r = state.replicas.get(replica)
            return [] if r is None else _gone(r, self.clock(), code, describe_exit(code))

        await self._record(make)

    async def _start_replica(self, replica: str) -> None:
        r = self.state.replicas.get(replica)
        if r is None or r.state is not S.STARTING:
            return
        config = self.state.deployment_of(r).spec.config
        loop = config.event_loop
        options: dict[str, Any] = {}
        if r.demand.get("GPU", 0.0) > 0:
            options["gpu_ids"] = r.gpu_ids
        runtime_env = (config.ray_actor_options or {}).get("runtime_env")
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._launching.add(replica)
        try:
            proc = await self.launcher.start_replica(
                replica, self.address, event_loop=loop, **options
            )
        except Exception as exc:
            error = f"could not start the replica process: {exc}"
            log.error("replica %s: %s", replica, error)
            proc = None
        finally:
            self._launching.discard(replica)
        if proc is None:
            await self._record(
                lambda s: (
                    [ev.ReplicaStartFailed(at=self.clock(), replica=replica, error=error)]
                    if _state_of(s, replica) is S.STARTING
                    else []
                )
            )
            return
        self._procs[replica] = proc
        log.info("replica %s: started process %d", replica, proc.pid)
        self._spawn(self._watch, replica, proc)
        if _state_of(self.state, replica) in (S.STOPPING, None):
            proc.terminate()

    async def _watch(self, replica: str, proc: LaunchedProcess) -> None:
        code = await proc.wait()
        log.info("replica %s: process %d %s", replica, proc.pid, describe_exit(code))
        await self._exited(replica, code)

    def _scoped(self, replica: str) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        self._scopes[replica].append(scope)
        return scope

    async def _health_loop(self, replica: str, address: str) -> None:
        failures = 0
        with self._scoped(replica):
            while True:
                r = self.state.replicas.get(replica)
                if r is None or r.state is not S.RUNNING:
                    return
                config = self.state.deployment_of(r).spec.config
                await anyio.sleep(config.health_check_period_s)
                error = ""
                try:
                    with anyio.fail_after(config.health_check_timeout_s):
                        async with rpc.connect(address, self.secret) as conn:
                            await conn.call("check_health")
                except TimeoutError:
                    error = f"health check timed out after {config.health_check_timeout_s} s"
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if error:
                    failures += 1
                    log.warning(
                        "replica %s: health check failed (%d): %s", replica, failures, error
                    )
                    event: Event = ev.HealthCheckFailed(
                        at=self.clock(), replica=replica, consecutive=failures, error=error
                    )
                elif failures:
                    failures = 0
                    event = ev.HealthCheckPassed(at=self.clock(), replica=replica)
                else:
                    continue
                await self._record(functools.partial(_if_running, replica, event))

    async def _reconfigure(self, replica: str) -> None:
        r = self.state.replicas.get(replica)
        if r is None or r.address is None:
            return
        config = self.state.deployment_of(r).spec.config.to_dict()
        try:
            with anyio.fail_after(60):
                async with rpc.connect(r.address, self.secret) as conn:
                    await conn.call("reconfigure", config)
        except Exception as exc:
            log.error("replica %s: reconfigure failed: %s", replica, exc)

    async def _drain(self, replica: str) -> None:
        r = self.state.replicas.get(replica)
        if r is None or r.address is None:
            return
        with self._scoped(replica):
            try:
                async with rpc.connect(r.address, self.secret) as conn:
                    await conn.call("drain")
            except Exception as exc:
                log.warning("replica %s: drain failed: %s", replica, exc)
                return
        await self._record(
            lambda s: (
                [ev.ReplicaDrained(at=self.clock(), replica=replica)]
                if _state_of(s, replica) is S.DRAINING
                else []
            )
        )

    async def _stop_all_processes(self) -> None:
        procs: dict[str, LaunchedProcess] = dict(self._procs)
        if self._proxy_proc is not None:
            # The proxy first: it stops taking requests while replicas finish theirs.
            procs = {"proxy": self._proxy_proc, **procs}
        for proc in procs.values():
            proc.terminate()
        with anyio.move_on_after(self.stop_timeout_s):
            for proc in procs.values():
                await proc.wait()
        for proc in procs.values():
            proc.kill()
        with anyio.move_on_after(5):
            for proc in procs.values():
                await proc.wait()
        self.launcher.close()

    # ------------------------------------------------------------------ the proxy

    async def _proxy_loop(self, options: HTTPOptions) -> None:
        """Keep one HTTP proxy process running; restart it with back-off when it exits."""
        backoff = PROXY_RESTART_MIN_S
        while True:
            self._proxy_start_error = ""
            self._proxy_routes_version = 0
            started = anyio.current_time()
            pid: int | None = None
            try:
                proc: LaunchedProcess
                if self._adopted_proxy is not None:
                    proc, self._adopted_proxy = self._adopted_proxy, None
                    if self._adopted_proxy_url:
                        # It reported ready to the earlier controller already.
                        await self._record(
                            [
                                ev.ProxyStarted(
                                    at=self.clock(),
                                    pid=proc.pid,
                                    url=self._adopted_proxy_url,
                                    event_loop=options.event_loop,
                                )
                            ]
                        )
                else:
                    proc = await self.launcher.start_proxy(self.address, options.to_dict())
            except Exception as exc:
                code: int | None = None
                reason = f"could not start the proxy process: {exc}"
            else:
                self._proxy_proc = proc
                pid = proc.pid
                log.info("proxy: started process %d", pid)
                code = await proc.wait()
                # Only now: if this task is cancelled (shutdown), the process is
                # still ours to stop in _stop_all_processes.
                self._proxy_proc = None
                reason = self._proxy_start_error or describe_exit(code)
            log.warning("proxy: process %s %s", pid, reason)
            await self._record(
                [ev.ProxyExited(at=self.clock(), pid=pid, exit_code=code, reason=reason)]
            )
            if anyio.current_time() - started > PROXY_RESTART_MAX_S:
                backoff = PROXY_RESTART_MIN_S
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, PROXY_RESTART_MAX_S)

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def proxy_ready(self, pid: int, url: str, event_loop: str) -> None:
        """The proxy ``pid`` listens at ``url``."""
        if self._proxy_proc is None or self._proxy_proc.pid != pid:
            return  # a late report of a proxy that is gone already
        self._proxy_start_failed = False
        await self._record(
            [ev.ProxyStarted(at=self.clock(), pid=pid, url=url, event_loop=event_loop)]
        )

    async def proxy_start_failed(self, pid: int, error: str) -> None:
        """The proxy ``pid`` cannot serve (its port is taken, say); it exits next."""
        self._proxy_start_error = error
        self._proxy_start_failed = True
        self._signal_changed()

    async def proxy_seen(self, routes_version: int) -> None:
        """The proxy routes by the route table of ``routes_version`` now."""
        self._proxy_routes_version = max(self._proxy_routes_version, int(routes_version))
        self._signal_changed()

    def _proxy_status(self) -> dict[str, Any]:
        status = proxy_status(self.state, self._proxy_has_routes(self.state))
        status["start_failed"] = self._proxy_start_failed and status["status"] == "UNHEALTHY"
        return status

    def _proxy_serves_or_cannot(self, state: ClusterState) -> bool:
        return self._proxy_has_routes(state) or (
            self._proxy_start_failed and bool(state.proxy_error)
        )

    def _proxy_has_routes(self, state: ClusterState) -> bool:
        """Whether the proxy serves, with the route table published last."""
        return (
            state.proxy_pid is not None
            and self._proxy_routes_version >= (self._published.get("routes", (0, None))[0])
        )

    # ------------------------------------------------------------------ load

    def _load(self, now: float) -> dict[tuple[str, str], list[LoadSample]]:
        """Load samples for autoscaling deployments, one new sample per period."""
        take = now >= self._next_sample_at
        if take:
            # At least two samples per look-back period, so that the load is
            # known at every moment of a delay window (see core/autoscaling.py).
            period = min(
                [LOAD_SAMPLE_PERIOD_S]
                + [
                    auto.look_back_period_s / 2
                    for app in self.state.apps.values()
                    for dep in app.deployments.values()
                    if (auto := dep.spec.config.autoscaling_config) is not None
                ]
            )
            self._next_sample_at = now + period
        out: dict[tuple[str, str], list[LoadSample]] = {}
        for app in self.state.apps.values():
            for dep in app.deployments.values():
                auto = dep.spec.config.autoscaling_config
                if auto is None:
                    continue
                key = (app.name, dep.name)
                series = self._samples.setdefault(key, collections.deque())
                if take:
                    ongoing = sum(
                        self._reports[r.id][1]
                        for r in dep.replicas.values()
                        if r.id in self._reports and now - self._reports[r.id][0] < REPORT_STALE_S
                    )
                    queued = sum(
                        counts.get(f"{app.name}/{dep.name}", 0)
                        for at, counts in self._queued.values()
                        if now - at < REPORT_STALE_S
                    )
                    series.append(LoadSample(at=now, ongoing=float(ongoing), queued=float(queued)))
                    keep = auto.look_back_period_s + max(
                        auto.upscale_delay_s, auto.downscale_delay_s
                    )
                    while series and series[0].at < now - keep - LOAD_SAMPLE_PERIOD_S:
                        series.popleft()
                out[key] = list(series)
        if take:  # forget callers that stopped reporting long ago
            for caller in [c for c, (at, _) in self._queued.items() if now - at > 60.0]:
                del self._queued[caller]
        return out

    # ------------------------------------------------------------------ long-poll

    def _publish(self, seq: int | None = None) -> None:
        """Publish the values that changed with the log event ``seq``, or (None)
        with no log event: a replica's model ids changed.

        Call it holding ``self._lock``. The version of a change is ``seq <<
        VERSION_SHIFT``, and one more than the last version for a change
        outside the log, so versions strictly increase, and stay below
        ``(journal.seq + 1) << VERSION_SHIFT``, the version of the next log
        event's change, here or in a restarted controller.
        """
        if seq is None:
            version = max(self.journal.seq << VERSION_SHIFT, self._version) + 1
        else:
            version = max(seq << VERSION_SHIFT, self._version + 1)
        values = _published_values(self.state, self._models, self.logging_config)
        changed = False
        for key, value in values.items():
            old = self._published.get(key)
            if old is None or old[1] != value:
                self._published[key] = (version, value)
                changed = True
        for key in list(self._published):
            if key not in values and self._published[key][1] is not None:
                self._published[key] = (version, None)
                changed = True
        if changed:
            self._version = version
            self._changed.set()
            self._changed = anyio.Event()

    async def listen(
        self, versions: Mapping[str, int], timeout_s: float = LONG_POLL_TIMEOUT_S
    ) -> dict[str, tuple[int, Any]]:
        """Long-poll: the keys of ``versions`` whose published version is newer.

        Waits up to ``timeout_s`` for a change; returns ``{}`` if none came.
        A key nothing was published under yet has version 0 and value None.
        """
        deadline = anyio.current_time() + min(timeout_s, LONG_POLL_TIMEOUT_S)
        while True:
            changed = self._changed
            out = {
                key: self._published.get(key, (0, None))
                for key, version in versions.items()
                if self._published.get(key, (0, None))[0] > version
            }
            if out:
                return out
            with anyio.move_on_at(deadline) as scope:
                await changed.wait()
            if scope.cancelled_caught:
                return {}

    # ------------------------------------------------------------------ API

    def rpc_methods(self) -> dict[str, Callable[..., Any]]:
        """The controller's RPC surface (see the module docstring)."""
        return {
            "deploy": self.deploy,
            "delete": self.delete,
            "status": self.status,
            "wait_app": self.wait_app,
            "listen": self.listen,
            "put_blob": self.put_blob,
            "get_blob": self.get_blob,
            "replica_spec": self.replica_spec,
            "replica_running": self.replica_running,
            "replica_start_failed": self.replica_start_failed,
            "report_load": self.report_load,
            "report_queued": self.report_queued,
            "proxy_ready": self.proxy_ready,
            "proxy_start_failed": self.proxy_start_failed,
            "proxy_seen": self.proxy_seen,
            "ping": self.ping,
        }

    async def ping(self) -> dict[str, Any]:
        return {"instance_id": self.log.instance_id, "pid": os.getpid()}

    async def deploy(
        self,
        app: str,
        deployments: Sequence[Mapping[str, Any] | DeploymentSpec],
        *,
        ingress: str | None = None,
        route_prefix: str | None = "/",
    ) -> int:
        """Record the intent to run ``app`` with these deployments; returns its seq.

        ``ingress`` defaults to the last deployment, as the one ``bind`` built last.
        """
        specs = tuple(
            d if isinstance(d, DeploymentSpec) else DeploymentSpec.from_dict(d) for d in deployments
        )
        if not specs:
            raise ValueError(f"application {app!r} has no deployments")
        for other in self.state.apps.values():
            if (
                other.name != app
                and not other.deleting
                and route_prefix is not None
                and other.route_prefix == route_prefix
            ):
                raise ValueError(
                    f'Prefix {route_prefix} is being used by application "{other.name}". '
                    f'Failed to deploy application "{app}".'
                )
        event = ev.AppDeployed(
            at=self.clock(),
            app=app,
            route_prefix=route_prefix,
            ingress=ingress or specs[-1].name,
            deployments=specs,
        )
        await self._record([event], durable=True)
        return self.journal.seq

    async def deploy_config(
        self,
        config: Mapping[str, Any],
        apps: Sequence[Mapping[str, Any]],
        blobs: Mapping[str, bytes] | None = None,
    ) -> dict[str, list[str]]:
        """Make the applications those of a config file, as ``trioserve deploy`` does.

        ``apps`` are the file's applications, built: ``name``,
        ``route_prefix``, ``ingress`` and ``deployments`` (spec dicts). An
        application whose deployments, route prefix and ingress are those it
        runs already is left alone; applications the file does not name are
        deleted; ``config`` (the file, as given) is recorded for
        ``trioserve config``. ``blobs`` (digest to bytes: the pickled code
        and arguments the specs refer to) are stored first. Everything is
        checked before anything is stored or recorded: an ingress that is not
        one of the application's deployments, two applications with one route
        prefix, or a blob that does not match its digest raise ``ValueError``.
        Returns the names ``deployed``, ``unchanged`` and ``deleted``.
        """
        wanted: dict[str, tuple[str | None, str, tuple[DeploymentSpec, ...]]] = {}
        for app in apps:
            name = str(app["name"])
            specs = tuple(
                d if isinstance(d, DeploymentSpec) else DeploymentSpec.from_dict(d)
                for d in app["deployments"]
            )
            if not specs:
                raise ValueError(f"application {name!r} has no deployments")
            if name in wanted:
                raise ValueError(f"application {name!r} appears twice")
            prefix = app.get("route_prefix", "/")
            ingress = str(app.get("ingress") or specs[-1].name)
            if ingress not in {spec.name for spec in specs}:
                raise ValueError(
                    f"application {name!r}: the ingress {ingress!r} is not one of its "
                    f"deployments ({', '.join(spec.name for spec in specs)})"
                )
            wanted[name] = (None if prefix is None else str(prefix), ingress, specs)
        prefixes: dict[str, str] = {}
        for name, (prefix, _, _) in wanted.items():
            if prefix is not None and prefix in prefixes:
                raise ValueError(
                    f'Prefix {prefix} is being used by application "{prefixes[prefix]}". '
                    f'Failed to deploy application "{name}".'
                )
            if prefix is not None:
                prefixes[prefix] = name
        for digest, data in (blobs or {}).items():
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"blob {digest} does not match its content")
        for data in (blobs or {}).values():
            await self.put_blob(data)
        outcome: dict[str, list[str]] = {"deployed": [], "unchanged": [], "deleted": []}

        def make(state: ClusterState) -> list[Event]:
            now = self.clock()
            out: list[Event] = []
            for name, running in state.apps.items():
                if name not in wanted and not running.deleting:
                    out.append(ev.AppDeleted(at=now, app=name))
                    outcome["deleted"].append(name)
            for name, (prefix, ingress, specs) in wanted.items():
                current = state.apps.get(name)
                if current is not None and _runs(current, prefix, ingress, specs):
                    outcome["unchanged"].append(name)
                    continue
                out.append(
                    ev.AppDeployed(
                        at=now, app=name, route_prefix=prefix, ingress=ingress, deployments=specs
                    )
                )
                outcome["deployed"].append(name)
            if out or state.deployed_config != dict(config):
                out.append(ev.ConfigDeployed(at=now, config=dict(config)))
            return out

        await self._record(make, durable=True)
        return outcome

    async def delete(self, app: str) -> bool:
        """Record the intent to delete ``app``; False if there is no such app."""
        recorded = await self._record(
            lambda s: (
                [ev.AppDeleted(at=self.clock(), app=app)]
                if app in s.apps and not s.apps[app].deleting
                else []
            ),
            durable=True,
        )
        return bool(recorded) or app in self.state.apps

    async def status(self) -> dict[str, Any]:
        """Applications, deployments and replicas, with statuses and messages."""
        async with self._lock:
            status = status_of(self.state)
        if self.http_options is not None:
            status["proxy"] = self._proxy_status()
        return status

    async def wait_app(
        self, app: str, timeout_s: float = LONG_POLL_TIMEOUT_S
    ) -> dict[str, Any] | None:
        """Long-poll: the status of ``app`` once it is no longer DEPLOYING (or after
        ``timeout_s``); None if there is no such application."""

        def settled(state: ClusterState) -> bool:
            a = state.apps.get(app)
            return a is None or app_status(a)[0] is not AppStatus.DEPLOYING

        deadline = anyio.current_time() + min(timeout_s, LONG_POLL_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            await self.wait_for(settled, deadline - anyio.current_time())
        a = self.state.apps.get(app)
        if (
            a is not None
            and a.route_prefix is not None
            and self.http_options is not None
            and app_status(a)[0] is AppStatus.RUNNING
        ):
            # Running means reachable: wait until the proxy routes to it.
            with contextlib.suppress(TimeoutError):
                await self.wait_for(
                    self._proxy_serves_or_cannot, max(0.0, deadline - anyio.current_time())
                )
        status: dict[str, Any] | None = status_of(self.state)["applications"].get(app)
        if status is not None and self.http_options is not None:
            status["proxy"] = self._proxy_status()
        return status

    async def put_blob(self, data: bytes) -> str:
        """Store code or arguments in the log's blob table; returns the digest."""
        return await self._db(functools.partial(self.log.put_blob, data))

    async def get_blob(self, digest: str) -> bytes:
        return await self._db(functools.partial(self.log.get_blob, digest))

    async def replica_spec(self, replica: str) -> dict[str, Any] | None:
        """What a starting replica needs to construct its user object."""
        r = self.state.replicas.get(replica)
        if r is None:
            return None
        spec = self.state.deployment_of(r).spec
        return {
            "app": r.app,
            "deployment": r.deployment,
            "code_version": spec.code_version,
            "source": spec.source,
            "init_args": spec.init_args,
            "config": spec.config.to_dict(),
        }

    async def replica_running(self, replica: str, address: str, pid: int) -> bool:
        """A replica constructed its user object and serves at ``address``."""
        recorded = await self._record(
            lambda s: (
                [ev.ReplicaRunning(at=self.clock(), replica=replica, address=address, pid=pid)]
                if _state_of(s, replica) is S.STARTING
                else []
            )
        )
        return bool(recorded)

    async def replica_start_failed(self, replica: str, error: str) -> None:
        """A replica's constructor raised ``error`` (a traceback)."""
        await self._record(
            lambda s: (
                [ev.ReplicaStartFailed(at=self.clock(), replica=replica, error=error)]
                if _state_of(s, replica) is S.STARTING
                else []
            )
        )

    async def report_load(
        self, replica: str, ongoing: int, models: Sequence[str] | None = None
    ) -> None:
        """A replica's count of requests in flight, and the ids of the multiplexed
        models it holds or loads (None: not told, as replicas that multiplex
        nothing). A change of model ids is published at once."""
        if replica not in self.state.replicas:
            return
        self._reports[replica] = (self.clock(), int(ongoing))
        if models is None:
            return
        ids = tuple(sorted({str(m) for m in models}))
        if self._models.get(replica, ()) == ids:
            return
        async with self._lock:
            if replica not in self.state.replicas:
                return
            self._models[replica] = ids
            self._publish()

    async def report_queued(self, caller: str, queued: Mapping[str, int]) -> None:
        """A caller's (handle routers', the proxy's) requests waiting for replicas,
        by ``"<app>/<deployment>"``. A deployment scaled to zero with requests
        waiting is sampled and decided on at once: it scales from zero."""
        now = self.clock()
        counts = {str(k): int(v) for k, v in queued.items()}
        self._queued[str(caller)] = (now, counts)
        for key, n in counts.items():
            app, _, name = key.partition("/")
            dep = self.state.apps.get(app, None)
            d = None if dep is None else dep.deployments.get(name)
            if n > 0 and d is not None and d.goal == 0:
                self._next_sample_at = 0.0
                self._wake.set()

    async def wait_for(
        self, predicate: Callable[[ClusterState], bool], timeout_s: float | None = None
    ) -> None:
        """Wait until ``predicate(state)`` holds (checked after every change)."""
        with anyio.fail_after(timeout_s):
            while True:
                changed = self._changed
                if predicate(self.state):
                    return
                with anyio.move_on_after(self.tick_s):
                    await changed.wait()


def _gone(r: Replica, now: float, code: int | None, reason: str) -> list[Event]:
    """The events of a replica whose process is gone: died first unless it was stopping."""
    exited = ev.ReplicaExited(at=now, replica=r.id, exit_code=code)
    if r.state is S.STOPPING:
        return [exited]
    return [ev.ReplicaDied(at=now, replica=r.id, exit_code=code, reason=reason), exited]


def _if_running(replica: str, event: Event, state: ClusterState) -> list[Event]:
    return [event] if _state_of(state, replica) is S.RUNNING else []


def _state_of(state: ClusterState, replica: str) -> ReplicaState | None:
    r = state.replicas.get(replica)
    return None if r is None else r.state


def _published_values(
    state: ClusterState,
    models: Mapping[str, Sequence[str]] | None = None,
    logging_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What long-poll serves: the route table, each deployment's RUNNING
    replicas, each with the multiplexed model ids it reported (``models``), and
    ``proxy_logging``, the proxy's ``logging_config``: the top-level one of the
    config file deployed last (``ConfigDeployed``), else the instance's
    (``logging_config``), else nothing (the key is not published)."""
    models = models or {}
    routes: dict[str, Any] = {}
    values: dict[str, Any] = {"routes": routes}
    deployed = (state.deployed_config or {}).get("logging_config")
    if isinstance(deployed, Mapping):
        values["proxy_logging"] = dict(deployed)
    elif logging_config is not None:
        values["proxy_logging"] = dict(logging_config)
    for app in state.apps.values():
        if app.route_prefix is not None and not app.deleting:
            routes[app.route_prefix] = {"app": app.name, "ingress": app.ingress}
        for dep in app.deployments.values():
            config = dep.spec.config
            values[f"replicas/{app.name}/{dep.name}"] = {
                "replicas": [
                    {"id": r.id, "address": r.address, "models": list(models.get(r.id, ()))}
                    for r in dep.replicas.values()
                    if r.state is S.RUNNING
                ],
                "max_ongoing_requests": config.max_ongoing_requests,
                "max_queued_requests": config.max_queued_requests,
                "failed": dep.failed,
                "autoscaling": config.autoscaling_config is not None,
            }
    return values


def status_of(state: ClusterState) -> dict[str, Any]:
    """The status of every application, as ``serve.status()`` and the CLI show it."""
    apps: dict[str, Any] = {}
    for app in state.apps.values():
        status, message = app_status(app)
        deployments: dict[str, Any] = {}
        for dep in app.deployments.values():
            dstatus, dmessage = deployment_status(dep)
            counts: dict[str, int] = {}
            for r in dep.replicas.values():
                counts[r.state.value] = counts.get(r.state.value, 0) + 1
            deployments[dep.name] = {
                "status": dstatus.value,
                "message": dmessage,
                "target_replicas": dep.goal,
                "replica_states": counts,
                "replicas": [
                    {
                        "id": r.id,
                        "state": r.state.value,
                        "pid": r.pid,
                        "address": r.address,
                        "since": r.since,
                        "reason": r.reason,
                        "code_version": r.code_version,
                    }
                    for r in dep.replicas.values()
                ],
            }
        apps[app.name] = {
            "status": status.value,
            "message": message,
            "route_prefix": app.route_prefix,
            "ingress": app.ingress,
            "deployed_at": app.deployed_at,
            "deployments": deployments,
        }
    return {"applications": apps}


def proxy_status(state: ClusterState, routes_current: bool = True) -> dict[str, Any]:
    """The HTTP proxy as ``serve.status()`` shows it: ``HEALTHY`` with its URL,
    ``UNHEALTHY`` with why its last process exited, or ``STARTING``."""
    if state.proxy_pid is not None:
        return {
            "status": "HEALTHY" if routes_current else "STARTING",
            "url": state.proxy_url,
            "pid": state.proxy_pid,
            "message": "",
        }
    if state.proxy_error:
        return {"status": "UNHEALTHY", "url": "", "pid": None, "message": state.proxy_error}
    return {"status": "STARTING", "url": "", "pid": None, "message": ""}


def _runs(
    app: Application, prefix: str | None, ingress: str, specs: tuple[DeploymentSpec, ...]
) -> bool:
    """Whether ``app`` runs these deployments at this route prefix already."""
    if app.deleting or app.route_prefix != prefix or app.ingress != ingress:
        return False
    current = {name: d.spec for name, d in app.deployments.items() if d.wanted}
    return current == {spec.name: spec for spec in specs}


def _json_option(process: FoundProcess, name: str) -> Any:
    """The JSON value of a command-line option of ``process`` (None if absent or bad)."""
    import json

    raw = process.option(name)
    try:
        return None if raw is None else json.loads(raw)
    except ValueError:
        return None


def _terminate_stray(pid: int | None, replica: str) -> None:
    """SIGTERM a process of a previous controller, if it is still that replica."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return
    if replica.encode() in cmdline and b"trioserve.replica" in cmdline:
        with contextlib.suppress(OSError):
            os.kill(pid, 15)
