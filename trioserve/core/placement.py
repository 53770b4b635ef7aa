"""Resource placement on one instance: what a replica needs, what is free, which GPUs.

Ray Serve users reserve resources per replica with ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``memory``, ``resources``). An instance declares
what it has in :class:`~trioserve.core.events.ControllerStarted` (a mapping
of resource name to amount, kept as ``ClusterState.resources``); a replica is
started only when what it needs fits in what is free, and a replica asking
for GPUs is given GPU ids of its own.

* Resource names are ``"CPU"``, ``"GPU"``, ``"memory"`` (bytes) and any custom
  name. A name the instance does not declare counts as an amount of 0.
* Unlike Ray, a replica reserves no CPU unless it asks (``num_cpus`` defaults
  to 0), so deployments written without ``ray_actor_options`` always fit.
* A replica holds its resources while it has a process (STARTING, RUNNING,
  DRAINING, STOPPING): it frees them only once it is gone.
* GPUs are numbered ``0 .. GPU - 1``. A whole number ``n`` of GPUs is ``n``
  GPUs no other replica uses; a fraction (``0 < num_gpus < 1``) is one GPU
  whose used fraction leaves room for it. Lowest ids first, so the choice is
  deterministic; it is recorded in ``ReplicaStarting.gpu_ids``.
* ``ClusterState.resources is None`` means no accounting: everything fits and
  no GPU is assigned.

Sums are taken with :func:`math.fsum` (exactly rounded, whatever the order of
the replicas), so a state rebuilt from a snapshot gives the same answers as
the live one. This module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from trioserve.core.config import RESOURCE_OPTIONS, DeploymentConfig, check_ray_actor_options

if TYPE_CHECKING:
    from trioserve.core.state import ClusterState

__all__ = [
    "EPSILON",
    "Ledger",
    "assign_gpus",
    "demand",
    "demand_of",
    "fits",
    "free",
    "gpu_count",
    "gpu_use",
    "in_use",
]

EPSILON = 1e-9
"""Slack when comparing amounts, so that ``0.1 + 0.2`` of ``0.3`` still fits."""

_BUILT_IN = tuple(RESOURCE_OPTIONS.values())


def _ordered(names: Iterable[str]) -> list[str]:
    """Resource names in display order: CPU, GPU, memory, then custom names sorted."""
    unique = set(names)
    return [n for n in _BUILT_IN if n in unique] + sorted(unique.difference(_BUILT_IN))


def demand_of(options: Mapping[str, Any] | None) -> dict[str, float]:
    """What one replica with these ``ray_actor_options`` reserves, zero entries dropped.

    ``num_cpus`` becomes ``"CPU"`` (default 0), ``num_gpus`` ``"GPU"`` (default
    0), ``memory`` ``"memory"`` (default 0) and each entry of ``resources``
    its own name. Other options (``accelerator_type``, ``object_store_memory``,
    ``runtime_env``) reserve nothing. Raises
    :class:`~trioserve.core.config.ConfigError` for a negative amount or a
    value of the wrong type, naming the option.
    """
    if options is None:
        return {}
    check_ray_actor_options(options)
    amounts: dict[str, float] = {}
    for option, name in RESOURCE_OPTIONS.items():
        value = options.get(option)
        if value:
            amounts[name] = float(value)
    custom = options.get("resources") or {}
    for name, value in custom.items():
        if value:
            amounts[str(name)] = float(value)
    return {name: amounts[name] for name in _ordered(amounts)}


def demand(config: DeploymentConfig) -> dict[str, float]:
    """What one replica of a deployment with ``config`` reserves (see :func:`demand_of`)."""
    return demand_of(config.ray_actor_options)


def fits(need: Mapping[str, float], available: Mapping[str, float] | None) -> bool:
    """Whether ``need`` fits in ``available`` (``None``: no accounting, always fits).

    A name missing from ``available`` has 0 of it.
    """
    if available is None:
        return True
    return all(amount <= available.get(name, 0.0) + EPSILON for name, amount in need.items())


def gpu_count(resources: Mapping[str, float] | None) -> int:
    """How many whole GPUs ``resources`` declares (their ids are ``0 .. count - 1``)."""
    if resources is None:
        return 0
    return max(0, math.floor(resources.get("GPU", 0.0) + EPSILON))


def assign_gpus(num_gpus: float, count: int, use: Mapping[int, float]) -> tuple[int, ...] | None:
    """The GPU ids for a replica asking for ``num_gpus``, or ``None`` if it cannot have them.

    ``count`` is the number of GPUs and ``use`` the fraction of each GPU (by
    id) already in use. A whole number ``n`` takes the ``n`` lowest ids that
    nobody uses; a fraction takes the lowest id with room left for it. No GPU
    asked for gives ``()``.
    """
    if num_gpus <= 0:
        return ()
    if num_gpus < 1:
        for gpu in range(count):
            if use.get(gpu, 0.0) + num_gpus <= 1.0 + EPSILON:
                return (gpu,)
        return None
    wanted = round(num_gpus)
    idle = [gpu for gpu in range(count) if use.get(gpu, 0.0) <= EPSILON]
    if len(idle) < wanted:
        return None
    return tuple(idle[:wanted])


class Ledger:
    """What is in use on an instance, and what is left: the bookkeeping of placement.

    Built from a state by :meth:`of`; :meth:`place` records a replica placed
    after that (as :func:`~trioserve.core.reconcile.decide` does for the
    replicas it starts in one call), so the ledger always equals the one that
    the state after those starts would give.
    """

    def __init__(self, total: Mapping[str, float]) -> None:
        self.total = {name: float(total[name]) for name in _ordered(total)}
        self.gpus = gpu_count(self.total)
        self._used: dict[str, list[float]] = {}
        self._gpu_use: dict[int, list[float]] = {}

    @classmethod
    def of(cls, state: ClusterState) -> Ledger | None:
        """The ledger of ``state``, or ``None`` when it does no accounting."""
        if state.resources is None:
            return None
        ledger = cls(state.resources)
        for replica in state.replicas.values():
            ledger.add(replica.demand, replica.gpu_ids)
        return ledger

    def add(self, need: Mapping[str, float], gpu_ids: tuple[int, ...]) -> None:
        """Count a replica that reserves ``need`` on the GPUs ``gpu_ids``."""
        for name, amount in need.items():
            self._used.setdefault(name, []).append(amount)
        if gpu_ids:
            share = need.get("GPU", 0.0) / len(gpu_ids)
            for gpu in gpu_ids:
                self._gpu_use.setdefault(gpu, []).append(share)

    def used(self) -> dict[str, float]:
        """The amount of each resource in use (names in use only)."""
        return {name: math.fsum(self._used[name]) for name in _ordered(self._used)}

    def free(self) -> dict[str, float]:
        """Total minus used for every name declared or in use (negative if overbooked)."""
        used = self.used()
        names = _ordered([*self.total, *used])
        return {name: self.total.get(name, 0.0) - used.get(name, 0.0) for name in names}

    def gpu_use(self) -> dict[int, float]:
        """The fraction of each GPU in use, by id (GPUs in use only)."""
        return {gpu: math.fsum(self._gpu_use[gpu]) for gpu in sorted(self._gpu_use)}

    def place(self, need: Mapping[str, float]) -> tuple[int, ...] | None:
        """Reserve ``need`` for a new replica; its GPU ids, or ``None`` if it does not fit."""
        if not fits(need, self.free()):
            return None
        gpu_ids = assign_gpus(need.get("GPU", 0.0), self.gpus, self.gpu_use())
        if gpu_ids is None:
            return None
        self.add(need, gpu_ids)
        return gpu_ids

    def never_fits(self, need: Mapping[str, float]) -> dict[str, float]:
        """The instance's totals of the resources ``need`` exceeds even on an idle
        instance (empty if it would fit there)."""
        over = [
            name for name, amount in need.items() if amount > self.total.get(name, 0.0) + EPSILON
        ]
        gpus = need.get("GPU", 0.0)
        if "GPU" not in over and gpus > 0 and assign_gpus(gpus, self.gpus, {}) is None:
            over.append("GPU")
        return {name: self.total.get(name, 0.0) for name in _ordered(over)}

    def why_not(self, deployment: str, count: int, need: Mapping[str, float]) -> str:
        """Why ``count`` replicas of ``deployment``, each needing ``need``, are not placed.

        In words for an operator: what one replica needs, and either what is
        free of what the instance has, or that it can never fit.
        """
        what = f"{count} replica{'' if count == 1 else 's'} of {deployment!r} cannot be placed"
        subject = "it needs" if count == 1 else "each needs"
        wanted = _shown(need)
        over = self.never_fits(need)
        if over:
            return (
                f"{what}: {subject} {wanted}, more than the instance has ({_shown(over)}); "
                "lower ray_actor_options or start the instance with more resources."
            )
        free = self.free()
        short = [n for n, amount in need.items() if amount > free.get(n, 0.0) + EPSILON]
        split = not short and "GPU" in need
        names = _ordered(short or need)
        message = (
            f"{what}: {subject} {wanted} and the instance has "
            f"{_shown({n: free.get(n, 0.0) for n in names})} free of "
            f"{_shown({n: self.total.get(n, 0.0) for n in names})}"
        )
        if split:
            use = {gpu: round(f, 6) for gpu, f in self.gpu_use().items()}
            message += f", but that is spread over GPUs partly in use (in use per GPU: {use})"
        return message + "."


def _shown(amounts: Mapping[str, float]) -> dict[str, float]:
    """Amounts for a message: floats, rounded so that sums do not show float noise."""
    return {name: round(float(amount), 6) for name, amount in amounts.items()}


def in_use(state: ClusterState) -> dict[str, float]:
    """The amount of each resource reserved by the replicas that still hold a process.

    Every replica in the state holds one (STARTING, RUNNING, DRAINING,
    STOPPING): a replica frees its resources only when it is gone.
    """
    amounts: dict[str, list[float]] = {}
    for replica in state.replicas.values():
        for name, amount in replica.demand.items():
            amounts.setdefault(name, []).append(amount)
    return {name: math.fsum(amounts[name]) for name in _ordered(amounts)}


def free(state: ClusterState) -> dict[str, float] | None:
    """What is left of the instance's resources (``None``: no accounting)."""
    ledger = Ledger.of(state)
    return None if ledger is None else ledger.free()


def gpu_use(state: ClusterState) -> dict[int, float]:
    """The fraction of each GPU in use by the state's replicas, by GPU id."""
    ledger = Ledger(state.resources or {})
    for replica in state.replicas.values():
        ledger.add(replica.demand, replica.gpu_ids)
    return ledger.gpu_use()
