"""Autoscaling on the live system: real replicas, load from real callers.

Delays are shortened (``tests/apps/web.py``: ``FAST_SCALING``) so that a
scale-up and a scale-down each take seconds; the tests poll
``serve.status()`` with generous deadlines and never sleep to hope.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

import trioserve as serve
from tests.apps import web
from trioserve.core import events as ev
from trioserve.store import EventLog

DEADLINE_S = 90.0


def wait_for(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def deployment(app: str, name: str) -> Any:
    return serve.status().applications[app].deployments[name]


def running(app: str, name: str) -> int:
    return int(deployment(app, name).replica_states.get("RUNNING", 0))


def decisions(home: Path) -> list[ev.AutoscaleDecision]:
    with EventLog.open(home / "latest" / "events.db", create=False) as log:
        events = [stored.event for stored in log.read()]
    return [e for e in events if isinstance(e, ev.AutoscaleDecision)]


def test_load_scales_up_to_max_replicas_and_back_down_when_it_stops(
    serve_instance: Any, serve_home: Path, tmp_path: Path
) -> None:
    handle = serve.run(web.Busy.bind(), name="busy", route_prefix=None)
    gate = tmp_path / "gate"
    responses = [handle.remote(str(gate)) for _ in range(8)]  # 8 waiting, target 1 each

    wait_for(lambda: running("busy", "Busy") == 3, "three running replicas")
    dep = deployment("busy", "Busy")
    assert dep.target_replicas == 3  # max_replicas, although 8 would be wanted
    gate.touch()
    served_by = {r.result(timeout_s=DEADLINE_S) for r in responses}
    assert len(served_by) >= 2  # the new replicas took queued requests

    wait_for(lambda: deployment("busy", "Busy").target_replicas == 1, "the scale-down")
    wait_for(lambda: running("busy", "Busy") == 1, "one replica left")
    ups = [d for d in decisions(serve_home) if d.to_replicas > d.from_replicas]
    downs = [d for d in decisions(serve_home) if d.to_replicas < d.from_replicas]
    assert ups and downs
    assert max(d.to_replicas for d in decisions(serve_home)) <= 3  # never beyond max
    assert all(d.reason and d.evidence["samples"] for d in ups + downs)


def test_scale_to_zero_and_the_first_request_after_waits_for_a_replica(
    serve_instance: Any,
) -> None:
    handle = serve.run(web.Sleepy.bind(), name="sleepy", route_prefix="/sleepy")
    wait_for(lambda: deployment("sleepy", "Sleepy").target_replicas == 0, "scale to zero")
    wait_for(lambda: running("sleepy", "Sleepy") == 0, "no replica left")
    assert serve.status().applications["sleepy"].status == "RUNNING"

    # Through a handle: the request waits at the caller, which reports it.
    assert handle.remote().result(timeout_s=DEADLINE_S) == "awake"
    assert deployment("sleepy", "Sleepy").target_replicas >= 1

    wait_for(lambda: running("sleepy", "Sleepy") == 0, "scale to zero again")
    # Through HTTP: the proxy waits too, instead of answering 503.
    url = serve.status().http_url
    r = httpx.get(f"{url}/sleepy", timeout=DEADLINE_S)
    assert (r.status_code, r.text) == (200, "awake")


def test_status_shows_the_target_and_why(serve_instance: Any, tmp_path: Path) -> None:
    handle = serve.run(web.Busy.bind(), name="busy", route_prefix=None)
    gate = tmp_path / "gate"
    held = [handle.remote(str(gate)) for _ in range(4)]
    wait_for(lambda: deployment("busy", "Busy").target_replicas > 1, "a scale-up")
    dep = deployment("busy", "Busy")
    if dep.status == "UPSCALING":  # while the new replicas start, the message says why
        assert "upscale: mean load" in dep.message
    else:
        assert dep.status == "HEALTHY"
    gate.touch()
    for r in held:
        r.result(timeout_s=DEADLINE_S)
