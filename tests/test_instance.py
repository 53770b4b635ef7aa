"""open_instance: library mode inside trio and asyncio programs; placement by resources."""

from __future__ import annotations

import anyio
import pytest

import trioserve
from tests.apps import concepts
from trioserve.exceptions import DeployFailedError, DeploymentUnavailableError, RayServeException

DEADLINE_S = 60.0


async def test_open_instance_in_trio(serve_home):
    async with trioserve.open_instance() as serve:
        handle = await serve.run(
            concepts.Ingress.bind(concepts.Hello.bind(), concepts.World.bind())
        )
        assert await handle.remote() == "Hello world!"
        status = await serve.status()
        assert status.applications["default"].status == "RUNNING"
        assert (serve.run_dir / "events.db").exists()
        other = await serve.get_app_handle("default")
        assert await other.remote() == "Hello world!"
        await serve.delete("default")
        assert (await serve.status()).applications == {}


def test_open_instance_in_asyncio(serve_home):
    async def main():
        async with trioserve.open_instance() as serve:
            handle = await serve.run(concepts.Greeter.bind("from asyncio"), name="a")
            return await handle.remote()

    assert anyio.run(main, backend="asyncio") == "from asyncio"


async def test_deploy_failure_raises_in_library_mode(serve_home):
    async with trioserve.open_instance() as serve:
        with pytest.raises(DeployFailedError, match="the model file is missing"):
            await serve.run(concepts.Broken.bind(), name="b")
        handle = await serve.get_app_handle("b")
        with pytest.raises(DeploymentUnavailableError, match="failed to deploy"):
            await handle.remote()


async def test_replicas_wait_for_resources_and_status_says_why(serve_home):
    async with trioserve.open_instance(resources={"GPU": 1, "CPU": 2}) as serve:
        gpu = concepts.Worker.options(num_replicas=2, ray_actor_options={"num_gpus": 1})
        await serve.deploy(gpu.bind(), name="gpu", route_prefix=None)
        with anyio.fail_after(DEADLINE_S):
            while True:
                dep = (await serve.status()).applications["gpu"].deployments["Worker"]
                if dep.replica_states.get("RUNNING") == 1 and "cannot be placed" in dep.message:
                    break
                await anyio.sleep(0.05)
        assert "GPU" in dep.message
        handle = await serve.get_app_handle("gpu")
        # The placed replica got GPU 0 through CUDA_VISIBLE_DEVICES.
        env = await handle.cuda.remote()
        assert env == "0"
        # Needing more than the instance has: pending, saying it can never fit.
        big = concepts.Worker.options(ray_actor_options={"num_cpus": 4})
        await serve.deploy(big.bind(), name="big", route_prefix="/big")
        with anyio.fail_after(DEADLINE_S):
            while True:
                dep = (await serve.status()).applications["big"].deployments["Worker"]
                if "more than the instance has" in dep.message:
                    break
                await anyio.sleep(0.05)


def test_http_options_from_merges_the_default_port_and_proxy_location(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trioserve.core.config import HTTPOptions
    from trioserve.instance import http_options_from

    monkeypatch.setenv("TRIOSERVE_DEFAULT_HTTP_PORT", "9123")
    assert http_options_from().port == 9123
    assert http_options_from({"host": "0.0.0.0"}) == HTTPOptions(host="0.0.0.0", port=9123)
    assert http_options_from({"port": 0}).port == 0
    assert http_options_from(HTTPOptions(port=1)).port == 1
    assert not http_options_from(None, "Disabled").enabled
    monkeypatch.setenv("TRIOSERVE_DEFAULT_HTTP_PORT", "eighty")
    with pytest.raises(RayServeException, match="TRIOSERVE_DEFAULT_HTTP_PORT"):
        http_options_from()


def test_http_options_without_a_host_keep_the_proxy_off_whatever_the_location() -> None:
    import warnings

    from trioserve.core.config import HTTPOptions
    from trioserve.instance import http_options_from

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not http_options_from(HTTPOptions(host=None), "HeadOnly").enabled
        assert not http_options_from({"host": None}, "EveryNode").enabled
    assert http_options_from({"port": 0}, "HeadOnly").enabled
