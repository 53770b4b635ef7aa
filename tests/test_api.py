"""The synchronous Ray Serve API against an embedded instance with real replica processes."""

from __future__ import annotations

import os
import pickle

import pytest

import trioserve as serve
from tests.apps import concepts
from tests.conftest import pid_alive, proxy_pids, wait_gone_and_reaped
from trioserve.exceptions import (
    DeployFailedError,
    DeploymentUnavailableError,
    RayServeException,
    TrioserveDeprecationWarning,
)
from trioserve.handle import DeploymentHandle
from trioserve.store import EventLog


def test_run_returns_the_ingress_handle_of_a_running_app(serve_instance):
    handle = serve.run(concepts.Greeter.bind("Hello world!"))
    assert isinstance(handle, DeploymentHandle)
    assert handle.remote().result() == "Hello world!"
    app = serve.status().applications["default"]
    assert app.status == "RUNNING"
    assert app.deployments["Greeter"].status == "HEALTHY"
    assert app.deployments["Greeter"].replica_states == {"RUNNING": 1}


def test_composition_through_handles(serve_instance):
    handle = serve.run(concepts.Ingress.bind(concepts.Hello.bind(), concepts.World.bind()))
    assert handle.remote().result() == "Hello world!"
    assert set(serve.status().applications["default"].deployments) == {"Hello", "World", "Ingress"}


def test_get_app_handle_and_get_deployment_handle(serve_instance):
    serve.run(concepts.Adder.bind(concepts.double.bind(), 3), name="math_app", route_prefix=None)
    assert serve.get_app_handle("math_app").remote(5).result() == 13
    assert serve.get_deployment_handle("double", app_name="math_app").remote(5).result() == 10
    # Inside a replica the application defaults to the replica's own.
    assert serve.get_app_handle("math_app").via_lookup.remote(5).result() == 13
    with pytest.raises(RayServeException, match="Application 'nope' does not exist"):
        serve.get_app_handle("nope")
    with pytest.raises(RayServeException, match="specify an application name"):
        serve.get_deployment_handle("double")
    with pytest.raises(RayServeException, match="'missing' does not exist"):
        serve.get_deployment_handle("missing", app_name="math_app")


def test_two_apps_side_by_side_and_prefix_conflicts(serve_instance):
    a = serve.run(concepts.Greeter.bind("a"), name="a", route_prefix="/a")
    b = serve.run(concepts.Greeter.bind("b"), name="b", route_prefix="/b")
    assert (a.remote().result(), b.remote().result()) == ("a", "b")
    with pytest.raises(ValueError, match='Prefix /a is being used by application "a"'):
        serve.run(concepts.Greeter.bind("c"), name="c", route_prefix="/a")
    assert set(serve.status().applications) == {"a", "b"}


def test_running_the_same_name_again_updates_in_place(serve_instance):
    handle = serve.run(concepts.Worker.bind("v1"), name="w")
    first = handle.whoami.remote().result()
    # Only the replica count changes: the running replica stays.
    serve.run(concepts.Worker.options(num_replicas=2).bind("v1"), name="w")
    dep = serve.status().applications["w"].deployments["Worker"]
    assert dep.replica_states == {"RUNNING": 2}
    assert first["pid"] in {r.pid for r in dep.replicas}
    # New constructor arguments: new replicas replace the old ones.
    handle = serve.run(concepts.Worker.options(num_replicas=2).bind("v2"), name="w")
    tags = {handle.whoami.remote().result()["tag"] for _ in range(10)}
    assert tags == {"v2"}
    assert first["pid"] not in {
        r.pid for r in serve.status().applications["w"].deployments["Worker"].replicas
    }


def test_a_failing_constructor_fails_run_with_the_traceback(serve_instance):
    with pytest.raises(DeployFailedError, match="the model file is missing") as info:
        serve.run(concepts.Broken.bind(), name="broken")
    assert isinstance(info.value, RuntimeError)
    app = serve.status().applications["broken"]
    assert app.status == "DEPLOY_FAILED"
    assert "Traceback" in app.deployments["Broken"].message
    # The instance keeps serving other applications.
    assert serve.run(concepts.Greeter.bind("still here"), name="ok", route_prefix="/ok")
    assert serve.get_app_handle("ok").remote().result() == "still here"


def test_delete_removes_the_app_and_its_handles_fail_clearly(serve_instance):
    handle = serve.run(concepts.Greeter.bind("bye"), name="gone")
    assert handle.remote().result() == "bye"
    serve.delete("gone")
    assert "gone" not in serve.status().applications
    with pytest.raises(DeploymentUnavailableError, match="does not exist"):
        serve.get_deployment_handle("Greeter", "gone", _check_exists=False).remote().result(
            timeout_s=60
        )
    serve.delete("never-existed")  # nothing to do, no error


def test_shutdown_stops_replicas_and_status_is_empty_after(serve_home):
    handle = serve.run(concepts.Worker.bind())
    pid = handle.pid.remote().result()
    [proxy] = proxy_pids(serve_home)  # the instance serves HTTP by default
    assert pid_alive(proxy)
    serve.shutdown()

    assert not pid_alive(pid)
    wait_gone_and_reaped([proxy], "the HTTP proxy process")
    assert serve.status().applications == {}
    serve.shutdown()  # a second shutdown does nothing


def test_get_replica_context_outside_a_replica_raises():
    with pytest.raises(RayServeException, match="may only be called from within"):
        serve.get_replica_context()
    assert serve.get_multiplexed_model_id() == ""


def test_the_run_folder_keeps_the_log_after_shutdown(serve_home):
    serve.run(concepts.Greeter.bind("logged"), name="kept")
    serve.shutdown()
    latest = serve_home / "latest"
    assert latest.is_symlink()
    with EventLog.open(latest / "events.db", create=False) as log:
        kinds = [e.kind for e in log.read()]
    assert "AppDeployed" in kinds and "ReplicaRunning" in kinds
    assert (latest / "logs").is_dir()
    assert oct((latest / "secret").stat().st_mode & 0o777) == "0o600"


def test_deployment_deploy_serves_at_slash_name_and_warns(serve_instance, monkeypatch):
    from trioserve import exceptions

    monkeypatch.setattr(exceptions, "_warned", set())
    with pytest.warns(TrioserveDeprecationWarning, match=r"serve\.run"):
        concepts.Greeter.deploy("old style")
    app = serve.status().applications["Greeter"]
    assert app.route_prefix == "/Greeter"
    with pytest.warns(TrioserveDeprecationWarning, match="get_app_handle"):
        handle = concepts.Greeter.get_handle()
    assert handle.remote().result() == "old style"


def test_dag_driver_routes_to_applications_and_warns(serve_instance, monkeypatch):
    from trioserve import exceptions
    from trioserve.drivers import DAGDriver

    monkeypatch.setattr(exceptions, "_warned", set())
    with pytest.warns(TrioserveDeprecationWarning, match="DAGDriver"):
        app = DAGDriver.bind(
            {"/double": concepts.double.bind(), "/hi": concepts.Greeter.bind("hi")}
        )
    handle = serve.run(app)
    assert handle.predict_with_route.remote("/double", 21).result() == 42
    assert handle.predict_with_route.remote("/hi").result() == "hi"
    with pytest.raises(RayServeException, match="no route '/nope'"):
        handle.predict_with_route.remote("/nope").result()


def test_handles_pickle_and_keep_working(serve_instance):
    handle = serve.run(concepts.Worker.bind(), name="p")
    again = pickle.loads(pickle.dumps(handle.options(method_name="add")))
    assert again.remote(2, 3).result() == 5
    assert again.deployment_name == "Worker" and again.app_name == "p"
    assert os.getpid() != handle.pid.remote().result()
