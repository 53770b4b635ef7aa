"""Log formats and the request-context filter, without a process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from trioserve.core import logs
from trioserve.replica.host import RequestContext

FIELDS = {"application": "app", "deployment": "Model", "replica": "app#Model#1"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    current: list[RequestContext | None] = [None]
    logs.setup("replica", FIELDS, lambda: current[0], stream=out, file_name="replica-x.log")
    out.current = current  # type: ignore[attr-defined]
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
