"""``@serve.multiplexed`` in-process: the per-replica LRU of models, and validation.

The decorated functions are awaited directly on both event loops a replica
can run (``anyio.run`` with each backend inside sync tests). Loads are held
in flight with events, never with sleeps. The last section checks the
router's choice for multiplexed requests (:func:`trioserve.core.routing._for_model`),
a pure function of what the router knows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import trioserve as serve
from trioserve.core.routing import MODEL_HINT_TTL_S, _for_model, _Replica
from trioserve.replica import multiplex
from trioserve.replica.multiplex import multiplexed

BACKENDS = ["asyncio", "trio"]
DEADLINE_S = 30.0


def run(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with anyio.fail_after(DEADLINE_S):
            return await fn()

    return anyio.run(main, backend=backend)


class Model:
    """A model that records when it is deleted (sync ``__del__``)."""

    def __init__(self, model_id: str, deleted: list[str]) -> None:
        self.model_id = model_id
        self._deleted = deleted

    def __del__(self) -> None:
        self._deleted.append(self.model_id)


class Loader:
    """A deployment-like class: its ``get_model`` loads ``Model``s, and keeps
    every model it made, so that only the multiplexer's explicit ``__del__``
    call (not garbage collection) can record a deletion."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.deleted: list[str] = []
        self.made: list[Model] = []
        self.gate: anyio.Event | None = None

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads.append(model_id)
        if self.gate is not None:
            await self.gate.wait()
        model = Model(model_id, self.deleted)
        self.made.append(model)
        return model


def cache_of(loader: Loader) -> list[str]:
    """The model ids the loader's multiplexer holds, least recently used first."""
    (multiplexer,) = loader._trioserve_multiplexers.values()  # type: ignore[attr-defined]
    return list(multiplexer.models)


# --------------------------------------------------------------------------- the LRU


def test_the_public_name_is_the_decorator() -> None:
    assert serve.multiplexed is multiplexed
    assert "multiplexed" in serve.__all__


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_loads_once_and_is_then_served_from_the_cache(backend: str) -> None:
    loader = Loader()

    async def main() -> tuple[Model, Model]:
        return await loader.get_model("a"), await loader.get_model("a")

    first, again = run(backend, main)
    assert first is again
    assert first.model_id == "a"
    assert loader.loads == ["a"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_callers_of_one_model_id_load_it_once(backend: str) -> None:
    loader = Loader()
    got: list[Model] = []
    seen_loading: list[list[str]] = []

    async def main() -> None:
        loader.gate = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                got.append(await loader.get_model("a"))

            for _ in range(5):
                tg.start_soon(one)
            while not loader.loads:
                await anyio.sleep(0)
            for _ in range(10):
                await anyio.sleep(0)  # let every caller reach the cache
            (multiplexer,) = loader._trioserve_multiplexers.values()  # type: ignore[attr-defined]
            seen_loading.append(multiplexer.model_ids())
            loader.gate.set()

    run(backend, main)
    assert loader.loads == ["a"]
    assert len(got) == 5 and all(m is got[0] for m in got)
    assert seen_loading == [["a"]]  # a model being loaded counts as held (reported early)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_least_recently_used_model_is_evicted_and_its_del_called(backend: str) -> None:
    loader = Loader()

    async def main() -> None:
        await loader.get_model("a")
        await loader.get_model("b")
        assert cache_of(loader) == ["a", "b"]
        await loader.get_model("a")  # a is now the most recently used
        assert cache_of(loader) == ["b", "a"]
        assert loader.deleted == []
        await loader.get_model("c")  # full: b goes
        assert cache_of(loader) == ["a", "c"]
        assert loader.deleted == ["b"]
        await loader.get_model("b")  # loaded again; a goes
        assert cache_of(loader) == ["c", "b"]
        assert loader.deleted == ["b", "a"]

    run(backend, main)
    assert loader.loads == ["a", "b", "c", "b"]
    assert len(loader.made) == 4  # still referenced: __del__ ran because it was called


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_del_is_awaited_and_a_failing_del_does_not_fail_the_load(backend: str) -> None:
    events: list[str] = []

    class AsyncModel:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        async def __del__(self) -> None:  # type: ignore[misc]
            await anyio.sleep(0)
            events.append(f"del {self.model_id}")
            if self.model_id == "bad":
                raise RuntimeError("cannot free")

    kept: list[AsyncModel] = []

    @multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> AsyncModel:
        kept.append(AsyncModel(model_id))
        return kept[-1]

    async def main() -> None:
        await load("bad")
        model = await load("next")  # evicts "bad", whose __del__ raises: logged only
        assert model.model_id == "next"
        await load("last")

    run(backend, main)
    assert events == ["del bad", "del next"]
    # Python calls __del__ again when a model is garbage collected (under Ray
    # too); an async one would then make a coroutine nobody awaits.
    AsyncModel.__del__ = lambda self: None  # type: ignore[method-assign,assignment]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_load_caches_nothing_and_the_next_call_loads_again(backend: str) -> None:
    attempts: list[str] = []

    @multiplexed
    async def load(model_id: str) -> str:
        attempts.append(model_id)
        if len(attempts) == 1:
            raise OSError("weights not found")
        return f"model {model_id}"

    async def main() -> str:
        with pytest.raises(OSError, match="weights not found"):
            await load("a")
        return await load("a")

    assert run(backend, main) == "model a"
    assert attempts == ["a", "a"]


def test_no_limit_with_minus_one_and_each_object_has_its_own_cache() -> None:
    class Many:
        def __init__(self) -> None:
            self.loads: list[str] = []

        @multiplexed(max_num_models_per_replica=-1)
        async def get(self, model_id: str) -> str:
            self.loads.append(model_id)
            return model_id

    one, two = Many(), Many()

    async def main() -> None:
        for i in range(10):
            await one.get(str(i))
        for i in range(10):
            await one.get(str(i))
        await two.get("0")

    run("trio", main)
    assert one.loads == [str(i) for i in range(10)]
    assert two.loads == ["0"]


def test_the_process_reports_the_model_ids_and_their_changes() -> None:
    @multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> str:
        return model_id

    async def main() -> None:
        seen = multiplex.changes()
        await load("process-wide-1")
        assert multiplex.changes() != seen
        with anyio.fail_after(1):
            await multiplex.wait_changed(seen)  # returns at once: it changed
        assert "process-wide-1" in multiplex.model_ids()
        await load("process-wide-2")
        ids = multiplex.model_ids()
        assert "process-wide-2" in ids and "process-wide-1" not in ids
        assert multiplex.in_use()
        await multiplex.unload_all()
        assert "process-wide-2" not in multiplex.model_ids()

    run("asyncio", main)


# --------------------------------------------------------------------------- validation


def test_validation_follows_ray_serve() -> None:
    with pytest.raises(TypeError, match="max_num_models_per_replica must be an integer"):
        multiplexed(max_num_models_per_replica="1")  # type: ignore[call-overload]
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_num_models_per_replica must be positive"):
            multiplexed(max_num_models_per_replica=bad)
    with pytest.raises(TypeError, match="must be used with a function or method"):
        multiplexed(3)  # type: ignore[call-overload]

    def sync_load(model_id: str) -> str:
        return model_id

    with pytest.raises(TypeError, match="can only be used to decorate async functions"):
        multiplexed(sync_load)
    with pytest.raises(TypeError, match="can only be used to decorate async functions"):
        multiplexed(max_num_models_per_replica=2)(sync_load)

    async def no_argument() -> None:
        return None

    async def three(self: Any, model_id: str, extra: str) -> None:
        return None

    for fn in (no_argument, three):
        with pytest.raises(TypeError, match="at least one 'model_id: str' argument"):
            multiplexed(fn)


def test_model_ids_must_be_non_empty_strings() -> None:
    @multiplexed
    async def load(model_id: str) -> str:
        return model_id

    async def main() -> None:
        with pytest.raises(TypeError, match="The model ID must be a string"):
            await load(1)
        with pytest.raises(ValueError, match="The model ID cannot be empty"):
            await load("")
        with pytest.raises(TypeError, match="exactly one argument"):
            await load()

    run("trio", main)


# --------------------------------------------------------------------------- routing


def replica(rid: str, models: tuple[str, ...] = (), **hints: float) -> _Replica:
    r = _Replica(rid, f"tcp://{rid}")
    r.models = frozenset(models)
    r.hints = dict(hints)
    return r


def test_routing_prefers_replicas_that_hold_the_model() -> None:
    a, b, c = replica("a", ("m1",)), replica("b", ("m1", "m2")), replica("c")
    assert _for_model([a, b, c], "m1", now=0.0) == [a, b]
    assert _for_model([a, b, c], "m2", now=0.0) == [b]


def test_routing_falls_back_to_the_replicas_with_the_fewest_models() -> None:
    a, b, c = replica("a", ("m1",)), replica("b", ("m1", "m2")), replica("c")
    assert _for_model([a, b, c], "m3", now=0.0) == [c]
    # Holders without room are not candidates: the fewest of the others.
    assert _for_model([a, c], "m2", now=0.0) == [c]
    assert _for_model([a, b], "m3", now=0.0) == [a]


def test_a_caller_counts_its_recent_sends_as_held_until_they_expire() -> None:
    a, b = replica("a", m9=MODEL_HINT_TTL_S), replica("b")
    assert _for_model([a, b], "m9", now=0.0) == [a]  # sent there, not reported yet
    assert _for_model([a, b], "m8", now=0.0) == [b]  # a counts as holding one model
    assert _for_model([a, b], "m9", now=MODEL_HINT_TTL_S + 1) == [a, b]  # expired
