"""Updates that fail, and replicas that will not stop, on the live system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import trioserve
import trioserve as serve
from tests.apps import web
from tests.conftest import pid_alive
from trioserve.core import events as ev
from trioserve.exceptions import DeployFailedError
from trioserve.store import EventLog

DEADLINE_S = 60.0


def test_a_failed_new_version_leaves_the_old_one_serving(serve_instance: Any) -> None:
    handle = serve.run(web.Flaky.options(num_replicas=2).bind("v1"), name="f", route_prefix="/f")
    url = serve.status().http_url
    with pytest.raises(DeployFailedError, match="version bad cannot start"):
        serve.run(web.Flaky.options(num_replicas=2).bind("bad"), name="f", route_prefix="/f")

    app = serve.status().applications["f"]
    assert app.status == "DEPLOY_FAILED"
    dep = app.deployments["Flaky"]
    assert dep.status == "DEPLOY_FAILED"
    assert "Traceback" in dep.message and "version bad cannot start" in dep.message
    assert dep.replica_states.get("RUNNING") == 2  # the old replicas still run
    assert handle.remote().result(timeout_s=DEADLINE_S) == "v1"
    assert httpx.get(f"{url}/f", timeout=DEADLINE_S).text == "v1"

    # A fixed version then replaces the old one.
    handle = serve.run(web.Flaky.options(num_replicas=2).bind("v2"), name="f", route_prefix="/f")
    assert handle.remote().result(timeout_s=DEADLINE_S) == "v2"
    assert serve.status().applications["f"].status == "RUNNING"


async def test_a_replica_that_will_not_stop_is_killed_after_the_stop_timeout(
    serve_home: Path,
) -> None:
    async with trioserve.open_instance(proxy_location="Disabled", stop_timeout_s=2.0) as inst:
        handle = await inst.run(web.Stubborn.bind(), name="s", route_prefix=None)
        assert await handle.remote() == "here"
        (replica,) = (await inst.status()).applications["s"].deployments["Stubborn"].replicas
        await inst.delete("s")  # drains; __del__ hangs; SIGKILL after the stop timeout
        with anyio.fail_after(DEADLINE_S):
            while pid_alive(replica.pid):
                await anyio.sleep(0.05)
        run_dir = inst.run_dir
    with EventLog.open(run_dir / "events.db", create=False) as log:
        events = [s.event for s in log.read()]
    killed = [e for e in events if isinstance(e, ev.ReplicaKilled)]
    assert [e.replica for e in killed] == [replica.replica_id]
    assert "stop" in killed[0].reason
    assert any(
        isinstance(e, ev.ReplicaExited) and e.replica == replica.replica_id and e.exit_code == -9
        for e in events
    )
