"""Log formats and the request-context filter, without a process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trioserve.core import logs
from trioserve.replica.host import RequestContext

FIELDS = {"application": "app", "deployment": "Model", "replica": "app#Model#1"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    current: list[RequestContext | None] = [None]
    handler = logs.setup(
        "replica", FIELDS, lambda: current[0], stream=out, file_name="replica-x.log"
    )
    out.current = current  # type: ignore[attr-defined]
    out.handler = handler  # type: ignore[attr-defined]
    try:
        yield out
    finally:
        logs.apply_logging_config(None)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_text_lines_name_the_replica_and_the_request(stream: io.StringIO) -> None:
    user = logging.getLogger("my_app")
    user.info("outside")
    stream.current[0] = RequestContext(request_id="rid-1", route="/r")  # type: ignore[attr-defined]
    user.info("inside %s", "a request")
    first, second = stream.getvalue().splitlines()
    assert first.startswith("INFO ") and first.endswith(" app Model app#Model#1 -- outside")
    assert second.endswith(" app Model app#Model#1 rid-1 -- inside a request")


def test_json_lines_use_rays_field_names(stream: io.StringIO) -> None:
    logs.apply_logging_config({"encoding": "JSON", "additional_log_standard_attrs": ["funcName"]})
    stream.current[0] = RequestContext(request_id="rid-2", route="/r")  # type: ignore[attr-defined]
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("my_app").exception("failed")
    logs.access(logging.getLogger("trioserve.replica"), "GET", "/r/x", 200, 1.25)
    failed, access = (json.loads(line) for line in stream.getvalue().splitlines())
    assert failed["levelname"] == "ERROR" and failed["logger"] == "my_app"
    assert failed["message"] == "failed" and "ValueError: boom" in failed["exc_text"]
    assert failed["funcName"] == "test_json_lines_use_rays_field_names"
    assert {
        k: failed[k] for k in ("application", "deployment", "replica", "request_id", "route")
    } == {
        **FIELDS,
        "request_id": "rid-2",
        "route": "/r",
    }
    assert access["message"] == "GET /r/x 200 1.2ms" or access["message"] == "GET /r/x 200 1.3ms"
    assert (access["method"], access["status"], access["latency_ms"]) == ("GET", 200, 1.25)


def test_level_and_access_log_switches(stream: io.StringIO) -> None:
    assert logs.access_log_enabled()
    logs.apply_logging_config({"log_level": "WARNING", "enable_access_log": False})
    assert not logs.access_log_enabled()
    logging.getLogger("my_app").info("hidden")
    logging.getLogger("my_app").warning("shown")
    assert "hidden" not in stream.getvalue() and "shown" in stream.getvalue()
    logs.apply_logging_config({"log_level": "INFO"})
    assert logs.access_log_enabled()


def test_logs_dir_moves_the_records(stream: io.StringIO, tmp_path: Path) -> None:
    logs.apply_logging_config({"logs_dir": str(tmp_path / "elsewhere")})
    logging.getLogger("my_app").info("moved")
    logs.apply_logging_config({})
    logging.getLogger("my_app").info("back")
    assert "moved" in (tmp_path / "elsewhere" / "replica-x.log").read_text()
    assert "moved" not in stream.getvalue() and "back" in stream.getvalue()


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="TEXT or JSON"):
        logs.check_logging_config({"encoding": "XML"})
    with pytest.raises(ValueError, match="not a logging level"):
        logs.check_logging_config({"log_level": "LOUD"})
    logs.check_logging_config({"encoding": "json", "log_level": "debug"})


def test_check_logging_config_names_the_field_and_its_valid_values() -> None:
    with pytest.raises(ValueError, match=r"encoding must be TEXT or JSON, got 'XML'"):
        logs.check_logging_config({"encoding": "XML"})
    with pytest.raises(ValueError, match=r"log_level 'LOUD'.*DEBUG, INFO, WARNING, ERROR"):
        logs.check_logging_config({"log_level": "LOUD"})
    with pytest.raises(ValueError, match=r"Unknown logging_config field\(s\) 'level'.*log_level"):
        logs.check_logging_config({"level": "INFO"})
    with pytest.raises(ValueError, match="enable_access_log must be True or False"):
        logs.check_logging_config({"enable_access_log": "no"})
    with pytest.raises(ValueError, match="additional_log_standard_attrs must be a list"):
        logs.check_logging_config({"additional_log_standard_attrs": "lineno"})
    with pytest.raises(TypeError, match="must be a dict"):
        logs.check_logging_config("JSON")


def test_check_logging_config_returns_a_dict_of_a_ray_logging_config() -> None:
    class LoggingConfig:  # the shape of Ray's pydantic model
        def dict(self) -> dict[str, object]:
            return {"encoding": "JSON", "log_level": "INFO", "enable_access_log": True}

    assert logs.check_logging_config(LoggingConfig())["encoding"] == "JSON"
    assert logs.check_logging_config(None) == {}
    assert logs.check_logging_config({"log_level": 10}) == {"log_level": 10}


def test_the_proxys_logging_config_is_the_deployed_files_else_the_instances() -> None:
    from trioserve.core.controller import _published_values
    from trioserve.core.state import ClusterState

    state = ClusterState()
    assert "proxy_logging" not in _published_values(state)
    assert _published_values(state, None, {"encoding": "JSON"})["proxy_logging"] == {
        "encoding": "JSON"
    }
    state.deployed_config = {"applications": [], "logging_config": {"enable_access_log": False}}
    assert _published_values(state, None, {"encoding": "JSON"})["proxy_logging"] == {
        "enable_access_log": False
    }
    state.deployed_config = {"applications": []}  # a file without one: the instance's again
    assert _published_values(state, None, {"encoding": "JSON"})["proxy_logging"] == {
        "encoding": "JSON"
    }


class _Collect(logging.Handler):
    """A handler of the user's: it keeps the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _alone(stream: io.StringIO) -> Iterator[io.StringIO]:
    """The process's handler as the only one on the root logger, as in a replica
    or the proxy (pytest adds handlers of its own to the root for each test)."""
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers = [stream.handler]  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        root.handlers = saved


def _access() -> None:
    logs.access(
        logging.getLogger("trioserve.replica"),
        "GET",
        "/r/x",
        200,
        1.5,
        request_id="rid-3",
        route="/r",
    )


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_an_access_line_reads_the_same_with_or_without_a_users_handler(
    stream: io.StringIO, encoding: str
) -> None:
    logs.apply_logging_config({"encoding": encoding})
    users = _Collect()
    with _alone(stream):
        _access()  # the process's handler alone: made without a LogRecord
        logging.getLogger().addHandler(users)
        _access()  # a handler of the user's too: an ordinary record, which it gets
    made_directly, from_a_record = stream.getvalue().splitlines()
    if encoding == "JSON":
        a, b = json.loads(made_directly), json.loads(from_a_record)
        assert abs(a.pop("timestamp_ns") - b.pop("timestamp_ns")) < 60e9
        a.pop("asctime"), b.pop("asctime")
        assert a == b
        assert a["message"] == "GET /r/x 200 1.5ms" and a["request_id"] == "rid-3"
        assert a["logger"] == "trioserve.replica" and a["replica"] == "app#Model#1"
    else:
        # "INFO <date> <time> <fields> -- <message>": all but the time the same
        a_head, a_rest = made_directly.split(" -- ")
        b_head, b_rest = from_a_record.split(" -- ")
        assert a_rest == b_rest == "GET /r/x 200 1.5ms"
        assert a_head.split()[3:] == b_head.split()[3:] == ["app", "Model", "app#Model#1", "rid-3"]
        assert a_head.split()[0] == "INFO" and len(a_head.split()[2]) == len("10:00:00,123")
    assert [r.getMessage() for r in users.records] == ["GET /r/x 200 1.5ms"]


def test_additional_standard_attrs_still_come_from_a_record(stream: io.StringIO) -> None:
    logs.apply_logging_config({"additional_log_standard_attrs": ["funcName"]})
    with _alone(stream):
        _access()
    assert stream.getvalue().rstrip("\n").endswith("-- GET /r/x 200 1.5ms funcName=access")


def test_access_lines_of_a_loop_turn_are_written_at_its_end_in_order(stream: io.StringIO) -> None:
    """On asyncio and trio: the turn's access lines go out together, once the
    turn ends, and before any record logged after them."""

    async def turn() -> list[str]:
        _access()
        _access()
        written_during_the_turn = stream.getvalue()
        logging.getLogger("my_app").warning("after two requests")
        return [written_during_the_turn, stream.getvalue()]

    async def asyncio_main() -> list[str]:
        seen = await turn()
        await asyncio.sleep(0)
        _access()
        await asyncio.sleep(0)
        return seen

    async def trio_main() -> list[str]:
        seen = await turn()
        _access()
        await trio.sleep(0)
        await trio.sleep(0)
        return seen

    for main in (lambda: asyncio.run(asyncio_main()), lambda: trio.run(trio_main)):
        stream.seek(0)
        stream.truncate()
        with _alone(stream):
            during, after_warning = main()
        assert during == ""
        lines = stream.getvalue().splitlines()
        assert [line.split(" -- ")[1] for line in lines] == [
            "GET /r/x 200 1.5ms",
            "GET /r/x 200 1.5ms",
            "after two requests",
            "GET /r/x 200 1.5ms",
        ]
        assert after_warning.count("GET /r/x") == 2


def test_an_access_line_outside_any_loop_is_written_at_once(stream: io.StringIO) -> None:
    with _alone(stream):
        thread = threading.Thread(target=_access)
        thread.start()
        thread.join()
        assert stream.getvalue().rstrip("\n").endswith("-- GET /r/x 200 1.5ms")


def test_a_file_handler_writes_the_lines_of_the_last_turn_when_closed(
    stream: io.StringIO, tmp_path: Path
) -> None:
    async def main() -> None:
        _access()
        assert (tmp_path / "replica-x.log").read_text() == ""
        logs.apply_logging_config({})  # back to the stream: the file handler closes

    with _alone(stream):
        logs.apply_logging_config({"logs_dir": str(tmp_path)})
        asyncio.run(main())
    assert (tmp_path / "replica-x.log").read_text().rstrip("\n").endswith("-- GET /r/x 200 1.5ms")


def test_no_more_than_a_bounded_number_of_lines_wait_for_the_end_of_a_turn(
    stream: io.StringIO,
) -> None:
    """Should a loop stop without another turn, its lines are not all held back."""

    async def one_long_turn() -> int:
        for _ in range(logs.LineHandler.MAX_WAITING_LINES):
            _access()
        return stream.getvalue().count("GET /r/x")

    with _alone(stream):
        assert asyncio.run(one_long_turn()) == logs.LineHandler.MAX_WAITING_LINES
