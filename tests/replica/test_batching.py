"""``@serve.batch`` in-process: batch formation, results, errors, settings, cancellation.

Each scenario is an async function on anyio: the trio tests run it under
pytest-trio, and ``test_scenarios_on_asyncio`` runs every one of them again with
``anyio.run(..., backend="asyncio")``. Calls are held in flight with events;
timeouts appear only as generous deadlines, or where a batch must form by its
``batch_wait_timeout_s``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import trioserve as serve
from trioserve.exceptions import RayServeException
from trioserve.replica.host import RequestContext, _request

DEADLINE_S = 30.0
"""The longest any scenario may take, and a batch wait that never runs out."""

SHORT_WAIT_S = 0.2
"""A ``batch_wait_timeout_s`` that a scenario waits out on purpose."""


async def call(
    fn: Callable[[Any], Awaitable[Any]],
    x: Any,
    results: dict[Any, Any],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """``results[x] = await fn(x)`` (or the exception). Started with ``tg.start``,
    the request is queued before ``start`` returns."""
    task_status.started()
    try:
        results[x] = await fn(x)
    except Exception as exc:
        results[x] = exc


async def cancellable(
    fn: Callable[[Any], Awaitable[Any]],
    x: Any,
    results: dict[Any, Any],
    scope: anyio.CancelScope,
    done: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Like :func:`call`, inside ``scope``; sets ``done`` when it has returned."""
    try:
        with scope:
            task_status.started()
            results[x] = await fn(x)
    finally:
        done.set()


# --------------------------------------------------------------------------- scenarios


async def scenario_batches_form_by_size_then_by_timeout() -> None:
    sizes: list[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=SHORT_WAIT_S)
    async def times_ten(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [10 * x for x in xs]

    results: dict[Any, Any] = {}
    finished_at: dict[int, float] = {}

    async def one(i: int) -> None:
        results[i] = await times_ten(i)
        finished_at[i] = anyio.current_time()

    started = anyio.current_time()
    with anyio.fail_after(DEADLINE_S):
        # All ten are queued before the batching task first runs.
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
    assert sizes == [4, 4, 2]
    assert results == {i: 10 * i for i in range(10)}
    # The last two waited for the timeout, no full batch being in sight.
    last = sorted(finished_at.values())[-2:]
    assert all(t - started >= SHORT_WAIT_S for t in last)


async def scenario_an_exception_reaches_every_caller_of_its_batch_only() -> None:
    batches: list[list[int]] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
    async def fails_on_two(xs: list[int]) -> list[int]:
        batches.append(list(xs))
        if 2 in xs:
            raise ValueError("two is not welcome")
        return [x + 100 for x in xs]

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                await tg.start(call, fails_on_two, i, results)
    assert batches == [[0, 1], [2, 3], [4, 5]]
    assert results[0] == 100 and results[1] == 101
    assert results[4] == 104 and results[5] == 105
    for i in (2, 3):
        assert isinstance(results[i], ValueError)
        assert str(results[i]) == "two is not welcome"


async def scenario_a_result_of_the_wrong_length_is_a_clear_error() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
    async def drops_one(xs: list[int]) -> list[int]:
        return xs[:1]

    @serve.batch(max_batch_size=1)
    async def not_a_list(xs: list[int]) -> int:
        return 7

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            await tg.start(call, drops_one, 1, results)
            await tg.start(call, drops_one, 2, results)
        for i in (1, 2):
            assert isinstance(results[i], RayServeException)
            assert "input list has length 2 but the returned list has length 1" in str(results[i])
        with pytest.raises(TypeError, match="must return a list with one result per request"):
            await not_a_list(1)


def make_scaler_class() -> Any:
    """A class whose method's batching settings change at runtime, as from ``reconfigure``.

    Settings belong to the decorated function, so each scenario run makes its own class.
    """

    class Scaler:
        def __init__(self, factor: int) -> None:
            self.factor = factor
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
        async def scale(self, xs: list[int]) -> list[int]:
            self.sizes.append(len(xs))
            return [self.factor * x for x in xs]

        def reconfigure(self, config: dict[str, Any]) -> None:
            self.scale.set_max_batch_size(config["max_batch_size"])
            self.scale.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])

    return Scaler


async def scenario_setters_apply_to_the_next_batches() -> None:
    scaler = make_scaler_class()(3)

    async def burst(n: int) -> dict[Any, Any]:
        results: dict[Any, Any] = {}
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(call, scaler.scale, i, results)
        return results

    with anyio.fail_after(DEADLINE_S):
        assert await burst(4) == {i: 3 * i for i in range(4)}
        assert scaler.sizes == [2, 2]
        scaler.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": DEADLINE_S})
        assert scaler.scale._get_max_batch_size() == 4
        assert await burst(4) == {i: 3 * i for i in range(4)}
        assert scaler.sizes == [2, 2, 4]
        # A single call would wait DEADLINE_S for company; with no wait it runs at once.
        scaler.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0})
        assert scaler.scale._get_batch_wait_timeout_s() == 0
        assert await scaler.scale(5) == 15
        assert scaler.sizes == [2, 2, 4, 1]
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        scaler.scale.set_max_batch_size(0)


async def run_held_batches(limit: int) -> None:
    """Five one-request batches that stay in the function until released."""
    running = peak = calls = 0
    all_running = anyio.Event()
    release = anyio.Event()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=limit)
    async def held(xs: list[int]) -> list[int]:
        nonlocal running, peak, calls
        calls += 1
        running += 1
        peak = max(peak, running)
        if running == limit:
            all_running.set()
        await release.wait()
        running -= 1
        return xs

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, held, i, results)
            await all_running.wait()
            await anyio.wait_all_tasks_blocked()
            assert (calls, running) == (limit, limit)  # the others wait for a slot
            release.set()
    assert results == {i: i for i in range(5)}
    assert (calls, peak) == (5, limit)


async def scenario_max_concurrent_batches_bounds_the_batches_running_at_once() -> None:
    for limit in (1, 2):
        await run_held_batches(limit)


async def scenario_a_caller_cancelled_while_queued_leaves_the_queue() -> None:
    batches: list[list[str]] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
    async def echo(xs: list[str]) -> list[str]:
        batches.append(list(xs))
        return xs

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        scope, done = anyio.CancelScope(), anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(cancellable, echo, "gone", results, scope, done)
            scope.cancel()
        async with anyio.create_task_group() as tg:
            await tg.start(call, echo, "a", results)
            await tg.start(call, echo, "b", results)
    assert batches == [["a", "b"]]
    assert results == {"a": "a", "b": "b"}


async def scenario_a_caller_cancelled_during_its_batch_leaves_the_others_results() -> None:
    batches: list[list[str]] = []
    entered, release = anyio.Event(), anyio.Event()
    completed = False

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=DEADLINE_S)
    async def slow_upper(xs: list[str]) -> list[str]:
        nonlocal completed
        batches.append(list(xs))
        entered.set()
        await release.wait()
        completed = True
        return [x.upper() for x in xs]

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        scope, done = anyio.CancelScope(), anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(call, slow_upper, "a", results)
            await tg.start(cancellable, slow_upper, "b", results, scope, done)
            await tg.start(call, slow_upper, "c", results)
            await entered.wait()
            scope.cancel()
            await done.wait()
            release.set()
    assert batches == [["a", "b", "c"]]
    assert completed
    assert results == {"a": "A", "c": "C"}


async def scenario_queues_are_per_instance() -> None:
    class Tagger:
        def __init__(self, tag: str) -> None:
            self.tag = tag
            self.batches: list[list[int]] = []

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
        async def tag_all(self, xs: list[int]) -> list[str]:
            self.batches.append(list(xs))
            return [f"{self.tag}{x}" for x in xs]

    a, b = Tagger("a"), Tagger("b")
    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for i, obj in enumerate([a, b, a, b]):
                await tg.start(call, obj.tag_all, i, results)
    assert a.batches == [[0, 2]] and b.batches == [[1, 3]]
    assert results == {0: "a0", 1: "b1", 2: "a2", 3: "b3"}


async def scenario_arguments_are_batched_by_parameter() -> None:
    seen: list[dict[str, Any]] = []

    class Model:
        @serve.batch(max_batch_size=3, batch_wait_timeout_s=DEADLINE_S)
        async def combine(
            self, a: list[int], b: list[int], *, scale: list[int | None] | None = None
        ) -> list[int]:
            # A keyword that some callers pass reaches the function as a list
            # holding the parameter's default for the callers that did not.
            seen.append({"a": a, "b": b, "scale": scale})
            factors = scale or [None] * len(a)
            return [(x + y) * (f or 1) for x, y, f in zip(a, b, factors, strict=True)]

    model = Model()
    results: dict[Any, Any] = {}

    async def one(key: str, *args: int, **kwargs: int) -> None:
        results[key] = await model.combine(*args, **kwargs)

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for key, args, kwargs in [
                ("positional", (1, 2), {}),
                ("keywords", (), {"b": 4, "a": 3}),
                ("scaled", (5,), {"b": 6, "scale": 10}),
            ]:
                tg.start_soon(functools.partial(one, key, *args, **kwargs))
    assert results == {"positional": 3, "keywords": 7, "scaled": 110}
    [batch] = seen
    assert sorted(zip(batch["a"], batch["b"], batch["scale"], strict=True)) == [
        (1, 2, None),
        (3, 4, None),
        (5, 6, 10),
    ]
    with pytest.raises(TypeError):
        await model.combine(1)  # checked against the signature before queueing


async def scenario_streaming_batches() -> None:
    closed = anyio.Event()
    steps = 0

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=DEADLINE_S)
    async def countdown(ns: list[int]) -> Any:
        nonlocal steps
        try:
            for step in range(10):
                steps += 1
                yield [StopIteration if step >= n else (n, step) for n in ns]
        finally:
            closed.set()

    results: dict[Any, Any] = {}

    async def collect(n: int) -> None:
        results[n] = [out async for out in countdown(n)]

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for n in (0, 1, 2):
                tg.start_soon(collect, n)
        await closed.wait()
    assert results == {0: [], 1: [(1, 0)], 2: [(2, 0), (2, 1)]}
    assert steps == 3  # every stream had ended at the third step: the generator was stopped

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
    async def breaks(xs: list[int]) -> Any:
        yield [x * 2 for x in xs]
        yield xs[:1]

    async def collect_until_error(x: int) -> None:
        outputs: list[Any] = []
        try:
            async for out in breaks(x):
                outputs.append(out)
        except RayServeException as exc:
            outputs.append(str(exc))
        results[x] = outputs

    results.clear()
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect_until_error, 1)
            tg.start_soon(collect_until_error, 2)
    for x in (1, 2):
        assert results[x][0] == 2 * x
        assert "input list has length 2 but the returned list has length 1" in results[x][1]


async def scenario_batch_size_fn_measures_batches() -> None:
    batches: list[list[str]] = []

    @serve.batch(
        max_batch_size=5,
        batch_wait_timeout_s=DEADLINE_S,
        batch_size_fn=lambda texts: sum(len(t) for t in texts),
    )
    async def lengths(texts: list[str]) -> list[int]:
        batches.append(list(texts))
        return [len(t) for t in texts]

    results: dict[Any, Any] = {}
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for text in ["aa", "bbb", "c", "dddd"]:
                await tg.start(call, lengths, text, results)
        with pytest.raises(RuntimeError, match="Size of item is greater than max_batch_size"):
            await lengths("xxxxxx")
    assert batches == [["aa", "bbb"], ["c", "dddd"]]
    assert results == {"aa": 2, "bbb": 3, "c": 1, "dddd": 4}


async def scenario_the_batch_sees_its_multiplexed_model_id() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DEADLINE_S)
    async def which_model(xs: list[str]) -> list[str]:
        return [serve.get_multiplexed_model_id()] * len(xs)

    async def as_model(model: str, x: str, results: dict[Any, Any]) -> None:
        _request.set(RequestContext(multiplexed_model_id=model))
        results[x] = await which_model(x)

    for models, expected in [(("m1", "m1"), "m1"), (("m1", "m2"), "")]:
        results: dict[Any, Any] = {}
        with anyio.fail_after(DEADLINE_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(as_model, models[0], "x", results)
                tg.start_soon(as_model, models[1], "y", results)
        assert results == {"x": expected, "y": expected}


SCENARIOS = [
    scenario_batches_form_by_size_then_by_timeout,
    scenario_an_exception_reaches_every_caller_of_its_batch_only,
    scenario_a_result_of_the_wrong_length_is_a_clear_error,
    scenario_setters_apply_to_the_next_batches,
    scenario_max_concurrent_batches_bounds_the_batches_running_at_once,
    scenario_a_caller_cancelled_while_queued_leaves_the_queue,
    scenario_a_caller_cancelled_during_its_batch_leaves_the_others_results,
    scenario_queues_are_per_instance,
    scenario_arguments_are_batched_by_parameter,
    scenario_streaming_batches,
    scenario_batch_size_fn_measures_batches,
    scenario_the_batch_sees_its_multiplexed_model_id,
]


# --------------------------------------------------------------------------- trio


async def test_batches_form_by_size_then_by_timeout() -> None:
    await scenario_batches_form_by_size_then_by_timeout()


async def test_an_exception_reaches_every_caller_of_its_batch_only() -> None:
    await scenario_an_exception_reaches_every_caller_of_its_batch_only()


async def test_a_result_of_the_wrong_length_is_a_clear_error() -> None:
    await scenario_a_result_of_the_wrong_length_is_a_clear_error()


async def test_setters_apply_to_the_next_batches() -> None:
    await scenario_setters_apply_to_the_next_batches()


async def test_max_concurrent_batches_bounds_the_batches_running_at_once() -> None:
    await scenario_max_concurrent_batches_bounds_the_batches_running_at_once()


async def test_a_caller_cancelled_while_queued_leaves_the_queue() -> None:
    await scenario_a_caller_cancelled_while_queued_leaves_the_queue()


async def test_a_caller_cancelled_during_its_batch_leaves_the_others_results() -> None:
    await scenario_a_caller_cancelled_during_its_batch_leaves_the_others_results()


async def test_queues_are_per_instance() -> None:
    await scenario_queues_are_per_instance()


async def test_arguments_are_batched_by_parameter() -> None:
    await scenario_arguments_are_batched_by_parameter()


async def test_streaming_batches() -> None:
    await scenario_streaming_batches()


async def test_batch_size_fn_measures_batches() -> None:
    await scenario_batch_size_fn_measures_batches()


async def test_the_batch_sees_its_multiplexed_model_id() -> None:
    await scenario_the_batch_sees_its_multiplexed_model_id()


# --------------------------------------------------------------------------- asyncio


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__[len("scenario_") :])
def test_scenarios_on_asyncio(scenario: Callable[[], Awaitable[None]]) -> None:
    anyio.run(scenario, backend="asyncio")


@serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
async def module_level(xs: list[int]) -> list[int]:
    return [-x for x in xs]


def test_one_function_serves_successive_event_loops() -> None:
    """Each loop gets its own queue: nothing of a finished loop is reused."""

    async def main() -> list[int]:
        results: dict[Any, Any] = {}
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, module_level, i, results)
        return [results[i] for i in range(3)]

    for backend in ("asyncio", "trio", "asyncio"):
        assert anyio.run(main, backend=backend) == [0, -1, -2]


# --------------------------------------------------------------------------- validation


def test_decorator_forms_and_defaults() -> None:
    @serve.batch
    async def bare(xs: list[int]) -> list[int]:
        return xs

    @serve.batch()
    async def called(xs: list[int]) -> list[int]:
        return xs

    for fn in (bare, called):
        assert fn._get_max_batch_size() == 10
        assert fn._get_batch_wait_timeout_s() == 0.01
        assert fn.__name__ in ("bare", "called")

    @serve.batch(max_batch_size=4.0, batch_wait_timeout_s=0)  # type: ignore[call-overload,untyped-decorator]
    async def float_size(xs: list[int]) -> list[int]:
        return xs

    assert float_size._get_max_batch_size() == 4

    @serve.batch
    async def stream(xs: list[int]) -> Any:
        yield xs

    decorator = serve.batch(max_batch_size=3)
    one, two = decorator(bare), decorator(called)
    one.set_max_batch_size(5)
    assert two._get_max_batch_size() == 3  # settings belong to each decorated function


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 1.5}, TypeError, "max_batch_size must be integer >= 1, got 1.5"),
        ({"max_batch_size": "2"}, TypeError, "max_batch_size must be integer >= 1, got 2"),
        (
            {"batch_wait_timeout_s": -0.1},
            ValueError,
            "batch_wait_timeout_s must be a float >= 0, got -0.1",
        ),
        (
            {"batch_wait_timeout_s": "a"},
            TypeError,
            "batch_wait_timeout_s must be a float >= 0, got a",
        ),
        (
            {"max_concurrent_batches": 0},
            TypeError,
            "max_concurrent_batches must be an integer >= 1, got 0",
        ),
        ({"batch_size_fn": 3}, TypeError, "batch_size_fn must be a callable or None"),
    ],
)
def test_invalid_options_raise_when_decorating(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        serve.batch(**options)


def test_only_async_functions_can_be_batched() -> None:
    def sync(xs: list[int]) -> list[int]:
        return xs

    def sync_generator(xs: list[int]) -> Any:
        yield xs

    for fn in (sync, sync_generator):
        with pytest.raises(TypeError, match="must be 'async def'"):
            serve.batch(fn)
        with pytest.raises(TypeError, match="must be 'async def'"):
            serve.batch(max_batch_size=2)(fn)
    with pytest.raises(TypeError, match="can only be used to decorate functions or methods"):
        serve.batch(5)  # type: ignore[call-overload]


def test_batch_is_exported() -> None:
    from trioserve.replica import batching

    assert "batch" in serve.__all__ and "batch" in dir(serve)
    assert serve.batch is batching.batch
