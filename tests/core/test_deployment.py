"""@serve.deployment, options, bind and build_app: validation and the specs built."""

from __future__ import annotations

import pickle
import warnings

import pytest

import trioserve as serve
from tests.apps import concepts
from trioserve.core.config import AutoscalingConfig, ConfigError
from trioserve.core.deployment import Application, Deployment, build_app
from trioserve.exceptions import RayServeException, TrioserveDeprecationWarning
from trioserve.handle import DeploymentHandle


class Model:
    def __init__(self, *args, **kwargs):
        self.args = args

    def __call__(self):
        return "ok"


def test_bare_decorator_makes_a_deployment_with_ray_defaults():
    d = serve.deployment(Model)
    assert isinstance(d, Deployment)
    assert d.name == "Model"
    assert d.num_replicas == 1
    assert d.max_ongoing_requests == 5
    assert d.max_queued_requests == -1
    assert d.user_config is None
    assert d.autoscaling_config is None
    assert d.config.graceful_shutdown_wait_loop_s == 2.0
    assert d.config.graceful_shutdown_timeout_s == 20.0
    assert d.config.health_check_period_s == 10.0
    assert d.config.health_check_timeout_s == 30.0
    assert d.ray_actor_options is None
    assert d.version is None


def test_decorator_with_options_and_on_functions():
    @serve.deployment(num_replicas=3, max_ongoing_requests=7, user_config={"a": 1})
    def f():
        return 1

    assert (f.name, f.num_replicas, f.max_ongoing_requests, f.user_config) == (
        "f",
        3,
        7,
        {"a": 1},
    )
    assert f.user_configured_option_names == {"num_replicas", "max_ongoing_requests", "user_config"}


def test_options_returns_a_changed_copy():
    d = serve.deployment(Model)
    e = d.options(name="Other", num_replicas=2)
    assert (d.name, d.num_replicas) == ("Model", 1)
    assert (e.name, e.num_replicas) == ("Other", 2)
    f = e.options(max_ongoing_requests=9)
    assert (f.name, f.num_replicas, f.max_ongoing_requests) == ("Other", 2, 9)


def test_options_switch_between_fixed_and_autoscaling():
    d = serve.deployment(Model).options(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert d.num_replicas is None and d.autoscaling_config.max_replicas == 4
    fixed = d.options(num_replicas=2)
    assert fixed.num_replicas == 2 and fixed.autoscaling_config is None
    auto = fixed.options(autoscaling_config={"max_replicas": 3})
    assert auto.num_replicas is None and auto.autoscaling_config.max_replicas == 3


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_replicas": 0}, ValueError, "num_replicas is expected to larger than 0"),
        (
            {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}},
            ValueError,
            "Manually setting num_replicas is not allowed when autoscaling_config is provided",
        ),
        ({"route_prefix": "/a"}, ValueError, "can no longer be specified at the deployment level"),
        ({"max_ongoing_requests": None}, ValueError, "must be non-null"),
        ({"max_ongoing_requests": 0}, ConfigError, "max_ongoing_requests must be > 0"),
        ({"max_queued_requests": 0}, ConfigError, "max_queued_requests"),
        ({"user_config": {"f": object()}}, ConfigError, "JSON-serializable"),
        ({"health_check_period_s": 0}, ConfigError, "health_check_period_s"),
        ({"graceful_shutdown_timeout_s": -1}, ConfigError, "graceful_shutdown_timeout_s"),
        ({"ray_actor_options": {"num_cpu": 1}}, ValueError, "Unknown ray_actor_options 'num_cpu'"),
        ({"logging_config": {"level": "INFO"}}, ValueError, "Unknown logging_config field"),
        (
            {"logging_config": {"encoding": "XML"}},
            ValueError,
            "logging_config encoding must be TEXT or JSON, got 'XML'",
        ),
        ({"logging_config": {"log_level": "LOUD"}}, ValueError, "log_level 'LOUD' is not a"),
        (
            {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}},
            ConfigError,
            "max_replicas",
        ),
        ({"num_replicas": "many"}, TypeError, "num_replicas"),
        ({"name": "a#b"}, ValueError, "must not contain"),
        ({"event_loop": "gevent"}, ConfigError, "event_loop"),
    ],
)
def test_invalid_options_raise_as_ray_serve_does(options, error, match):
    with pytest.raises(error, match=match):
        serve.deployment(**options)(Model)


def test_unknown_option_in_options_is_a_type_error():
    with pytest.raises(TypeError, match="num_replica"):
        serve.deployment(Model).options(num_replica=2)


def test_num_replicas_auto_means_ray_autoscaling_defaults():
    d = serve.deployment(num_replicas="auto")(Model)
    auto = d.autoscaling_config
    assert d.num_replicas is None
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 100, 2.0)
    e = serve.deployment(num_replicas="auto", autoscaling_config={"max_replicas": 7})(Model)
    assert (e.autoscaling_config.min_replicas, e.autoscaling_config.max_replicas) == (1, 7)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each deprecated form warns once per process: start this test with none warned."""
    from trioserve import exceptions

    monkeypatch.setattr(exceptions, "_warned", set())


def test_deprecated_option_names_work_and_warn_once(fresh_warnings):
    with pytest.warns(TrioserveDeprecationWarning, match="target_ongoing_requests"):
        cfg = AutoscalingConfig(target_num_ongoing_requests_per_replica=4)
    assert cfg.target_ongoing_requests == 4
    assert "target_num_ongoing_requests_per_replica" not in cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = AutoscalingConfig.from_dict({"target_num_ongoing_requests_per_replica": 3})
    assert again.target_ongoing_requests == 3
    with pytest.warns(TrioserveDeprecationWarning, match="max_ongoing_requests"):
        d = serve.deployment(max_concurrent_queries=9)(Model)
    assert d.max_ongoing_requests == 9


def test_deployments_cannot_be_called_and_functions_take_no_init_args():
    d = serve.deployment(Model)
    with pytest.raises(RuntimeError, match=r"Use `\.bind\(\)` instead"):
        d()
    with pytest.raises(ValueError, match="is a function"):
        concepts.double.bind(1)


def test_build_orders_children_first_and_names_collisions_like_ray():
    a = serve.deployment(Model).bind(1)
    b = serve.deployment(Model).bind(2)
    ingress = serve.deployment(Model).options(name="Ingress").bind(a, b, a)
    built = build_app(ingress, "app")
    assert [s.name for s in built.deployments] == ["Model", "Model_1", "Ingress"]
    assert built.ingress == "Ingress"
    init = pickle.loads(built.blobs[built.deployments[-1].init_args])
    assert init == (
        (
            DeploymentHandle("Model", "app"),
            DeploymentHandle("Model_1", "app"),
            DeploymentHandle("Model", "app"),
        ),
        {},
    )


def test_applications_nested_in_containers_become_handles():
    inner = concepts.double.bind()
    app = concepts.Holder.bind({"models": [inner], "scale": 3})
    built = build_app(app, "nest")
    args, _ = pickle.loads(built.blobs[built.deployments[-1].init_args])
    assert args == ({"models": [DeploymentHandle("double", "nest")], "scale": 3},)


def test_importable_code_is_imported_and_script_code_travels_by_value():
    built = build_app(concepts.Greeter.bind("hi"), "x")
    assert built.deployments[0].source == "import:tests.apps.concepts:Greeter"

    def local_function():
        return 1

    built = build_app(serve.deployment(local_function).bind(), "y")
    source = built.deployments[0].source
    assert source.startswith("blob:") and source[5:] in built.blobs


def test_code_version_follows_code_args_and_actor_options_not_config(fresh_warnings):
    def version(app):
        return build_app(app, "v").deployments[-1].code_version

    base = version(concepts.Greeter.bind("hi"))
    assert version(concepts.Greeter.bind("hi")) == base
    assert (
        version(concepts.Greeter.options(num_replicas=3, user_config={"a": 1}).bind("hi")) == base
    )
    assert version(concepts.Greeter.bind("other")) != base
    assert version(concepts.Greeter.options(ray_actor_options={"num_cpus": 1}).bind("hi")) != base
    assert version(concepts.Greeter.options(event_loop="trio").bind("hi")) != base
    with pytest.warns(TrioserveDeprecationWarning):
        pinned = serve.deployment(version="1")(Model)
    assert version(pinned.bind(1)) == version(pinned.bind(2))


def test_build_validates_app_name_route_prefix_and_target():
    app = concepts.Greeter.bind("hi")
    with pytest.raises(RayServeException, match="non-empty"):
        build_app(app, "")
    for prefix, match in [("a", "must start"), ("/a/", "cannot end"), ("/{x}", "wildcards")]:
        with pytest.raises(ValueError, match=match):
            build_app(app, "a", prefix)
    with pytest.raises(TypeError, match="expects an `Application`"):
        build_app(concepts.Greeter, "a")  # type: ignore[arg-type]
    assert isinstance(app, Application)


def test_unpicklable_arguments_are_a_clear_error():
    import threading

    with pytest.raises(TypeError, match=r"cannot be pickled"):
        build_app(concepts.Greeter.bind(threading.Lock()), "a")


def test_logging_config_of_run_fills_deployments_without_one():
    inner = concepts.double.options(logging_config={"log_level": "DEBUG"}).bind()
    app = concepts.Adder.bind(inner, 1)
    built = build_app(app, "log", logging_config={"log_level": "WARNING"})
    levels = {s.name: s.config.logging_config["log_level"] for s in built.deployments}
    assert levels == {"double": "DEBUG", "Adder": "WARNING"}


def test_a_bad_logging_config_is_refused_by_options_and_run_before_any_replica():
    with pytest.raises(ValueError, match="encoding must be TEXT or JSON, got 'XML'"):
        serve.deployment(Model).options(logging_config={"encoding": "XML"})
    with pytest.raises(ValueError, match=r"log_level 'LOUD' is not a logging level; use one of"):
        build_app(serve.deployment(Model).bind(), "a", logging_config={"log_level": "LOUD"})
    # Lower case names are accepted, as the replica applies them.
    d = serve.deployment(Model).options(logging_config={"encoding": "json", "log_level": "debug"})
    (spec,) = build_app(d.bind(), "b").deployments
    assert spec.config.logging_config == {"encoding": "json", "log_level": "debug"}
