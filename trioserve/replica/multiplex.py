"""Model multiplexing inside a replica: Ray Serve's ``@serve.multiplexed``.

A deployment that serves many models of one shape loads them on demand::

    @serve.deployment(num_replicas=3)
    class Models:
        @serve.multiplexed(max_num_models_per_replica=3)
        async def get_model(self, model_id: str) -> Model:
            return await load(model_id)

        async def __call__(self, request):
            model = await self.get_model(serve.get_multiplexed_model_id())
            return model(request)

Calling the decorated function with a model id returns the model if this
replica holds it, else loads it: at most one load runs at a time per
function and object, so callers that ask for a model being loaded wait for
that load instead of loading it again. Each object keeps at most
``max_num_models_per_replica`` models (``-1``: no limit) and, to load one
more, first unloads the least recently used: the model's ``__del__`` is
called then (awaited if it is a coroutine function, else run in a worker
thread), as Ray Serve does.

The replica process reports the ids this process holds or is loading
(:func:`model_ids`) to the controller with its load, at once when they
change (:func:`wait_changed`), so that routers send a model's requests to
the replicas that hold it (see :mod:`trioserve.core.routing`); when the
replica stops, :func:`unload_all` unloads every model.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

import anyio
import anyio.to_thread

from trioserve.replica import metrics

__all__ = [
    "DEFAULT_MAX_NUM_MODELS_PER_REPLICA",
    "ModelMultiplexer",
    "changes",
    "in_use",
    "model_count",
    "model_ids",
    "multiplexed",
    "unload_all",
    "wait_changed",
]

log = logging.getLogger("trioserve.replica")

DEFAULT_MAX_NUM_MODELS_PER_REPLICA = 3
"""Ray Serve's default for ``max_num_models_per_replica``."""

F = TypeVar("F", bound=Callable[..., Any])

_live: weakref.WeakSet[ModelMultiplexer] = weakref.WeakSet()
_changes = 0
_waiter: anyio.Event | None = None


def _changed() -> None:
    """The set of model ids of this process changed (called on the replica's loop)."""
    global _changes, _waiter
    _changes += 1
    if _waiter is not None:
        _waiter.set()
        _waiter = None


def changes() -> int:
    """A counter of the changes of :func:`model_ids` in this process."""
    return _changes


async def wait_changed(seen: int) -> None:
    """Wait until :func:`changes` differs from ``seen``."""
    global _waiter
    while _changes == seen:
        if _waiter is None:
            _waiter = anyio.Event()
        await _waiter.wait()


def in_use() -> bool:
    """Whether a multiplexed function has been called in this process."""
    return len(_live) > 0


def model_count() -> int:
    """How many models this process holds (loaded, not being loaded)."""
    return sum(len(multiplexer.models) for multiplexer in list(_live))


def model_ids() -> list[str]:
    """The ids of the models this process holds or is loading, sorted."""
    ids: set[str] = set()
    for multiplexer in list(_live):
        ids.update(multiplexer.model_ids())
    return sorted(ids)


async def unload_all() -> None:
    """Unload every model of this process, least recently used first."""
    for multiplexer in list(_live):
        await multiplexer.unload_all()


class ModelMultiplexer:
    """The model cache of one ``@serve.multiplexed`` function (of one object).

    ``load(model_id)`` is the user's coroutine function, bound to its object.
    """

    def __init__(self, load: Callable[[str], Any], max_num_models_per_replica: int) -> None:
        self._load = load
        self.max_num_models_per_replica = max_num_models_per_replica
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        """The models held, least recently used first."""
        self.loading: collections.Counter[str] = collections.Counter()
        """Callers waiting for each model that is not loaded yet."""
        self._lock: anyio.Lock | None = None
        _live.add(self)

    def model_ids(self) -> list[str]:
        """The ids held or being loaded (what routers should know this replica has)."""
        return sorted(set(self.models) | {m for m, n in self.loading.items() if n > 0})

    async def get(self, model_id: str) -> Any:
        """The model ``model_id``: from the cache, or loaded (once, whoever asks)."""
        if type(model_id) is not str:
            raise TypeError("The model ID must be a string.")
        if not model_id:
            raise ValueError("The model ID cannot be empty.")
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        if self._lock is None:
            self._lock = anyio.Lock()
        self.loading[model_id] += 1
        if self.loading[model_id] == 1:
            _changed()  # routers learn early that requests for it should come here
        try:
            async with self._lock:
                if model_id in self.models:  # loaded by another caller meanwhile
                    self.models.move_to_end(model_id)
                    return self.models[model_id]
                limit = self.max_num_models_per_replica
                while limit > 0 and len(self.models) >= limit:
                    await self._unload_lru()
                log.info("Loading model '%s'.", model_id)
                started = time.monotonic()
                try:
                    model = await self._load(model_id)
                except Exception as exc:
                    log.error("Failed to load model '%s': %r", model_id, exc)
                    raise
                self.models[model_id] = model
                elapsed = time.monotonic() - started
                metrics.model_loaded(elapsed)
                log.info("Successfully loaded model '%s' in %.1fms.", model_id, elapsed * 1000)
                return model
        finally:
            self.loading[model_id] -= 1
            if self.loading[model_id] <= 0:
                del self.loading[model_id]
                _changed()

    async def unload_all(self) -> None:
        """Unload every model, least recently used first."""
        while self.models:
            await self._unload_lru()

    async def _unload_lru(self) -> None:
        model_id, model = self.models.popitem(last=False)
        _changed()
        log.info("Unloading model '%s'.", model_id)
        started = time.monotonic()
        delete = getattr(model, "__del__", None)
        if delete is not None:
            try:
                if inspect.iscoroutinefunction(delete):
                    await delete()
                else:
                    await anyio.to_thread.run_sync(delete)
            except Exception:
                # The model is gone from the cache either way; the request
                # that needed the room goes on.
                log.exception("The __del__ of model '%s' raised.", model_id)
        elapsed = time.monotonic() - started
        metrics.model_unloaded(elapsed)
        log.info("Successfully unloaded model '%s' in %.1fms.", model_id, elapsed * 1000)


def _check_function(func: Any) -> None:
    if not callable(func):
        raise TypeError("The `multiplexed` decorator must be used with a function or method.")
    if not inspect.iscoroutinefunction(func):
        raise TypeError(
            "@serve.multiplexed can only be used to decorate async functions or methods."
        )
    n = len(inspect.signature(func).parameters)
    if n == 0 or n > 2:
        raise TypeError(
            "@serve.multiplexed can only be used to decorate functions or methods "
            "with at least one 'model_id: str' argument."
        )


_HOLDER = "_trioserve_multiplexers"
"""The attribute of a user object that holds its multiplexers, by decorated function."""


def _decorate(func: F, max_num_models_per_replica: int) -> F:
    _check_function(func)
    own: dict[int, ModelMultiplexer] = {}
    """The multiplexer of a plain function (key 0), or of objects that take no attribute."""

    def multiplexer_of(owner: Any) -> ModelMultiplexer:
        if owner is None:
            if 0 not in own:
                own[0] = ModelMultiplexer(func, max_num_models_per_replica)
            return own[0]
        held = getattr(owner, _HOLDER, None)
        if not isinstance(held, dict):
            held = {}
            try:
                setattr(owner, _HOLDER, held)
            except (AttributeError, TypeError):
                key = id(owner)
                if key not in own:
                    own[key] = ModelMultiplexer(
                        functools.partial(func, owner), max_num_models_per_replica
                    )
                return own[key]
        multiplexer = held.get(wrapper)
        if multiplexer is None:
            multiplexer = ModelMultiplexer(
                functools.partial(func, owner), max_num_models_per_replica
            )
            held[wrapper] = multiplexer
        return multiplexer

    @functools.wraps(func)
    async def wrapper(*args: Any) -> Any:
        if len(args) == 1:  # a function (or a static method): (model_id)
            owner, model_id = None, args[0]
        elif len(args) == 2:  # a method: (self, model_id)
            owner, model_id = args
        else:
            raise TypeError(
                "Functions decorated with `@serve.multiplexed` must take exactly one "
                f"argument, the multiplexed model ID (str), but got {len(args)} arguments."
            )
        return await multiplexer_of(owner).get(model_id)

    return wrapper  # type: ignore[return-value]


@overload
def multiplexed(func: F, max_num_models_per_replica: int = ...) -> F: ...
@overload
def multiplexed(func: None = None, max_num_models_per_replica: int = ...) -> Callable[[F], F]: ...


def multiplexed(
    func: Any = None, max_num_models_per_replica: int = DEFAULT_MAX_NUM_MODELS_PER_REPLICA
) -> Any:
    """Make an ``async`` function or method that loads a model by id a cached loader.

    Bare (``@serve.multiplexed``) or with ``max_num_models_per_replica`` (default
    3; ``-1`` for no limit). The function takes one argument, the model id (a
    method: ``self`` and the model id). Calling it returns the model, loaded on
    first use and kept in a least-recently-used cache of at most
    ``max_num_models_per_replica`` models per replica; a model pushed out has
    its ``__del__`` called. See the module docstring.

    Raises ``TypeError`` for something that is not an ``async`` function with
    one or two parameters, or a ``max_num_models_per_replica`` that is not an
    int, and ``ValueError`` when it is 0 or below (other than -1), with Ray
    Serve's messages.
    """
    if func is not None:
        _check_function(func)
    if not isinstance(max_num_models_per_replica, int):
        raise TypeError("max_num_models_per_replica must be an integer.")
    if max_num_models_per_replica != -1 and max_num_models_per_replica <= 0:
        raise ValueError("max_num_models_per_replica must be positive.")
    if func is not None:
        return _decorate(func, max_num_models_per_replica)
    return functools.partial(_decorate, max_num_models_per_replica=max_num_models_per_replica)
