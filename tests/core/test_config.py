"""Deployment and autoscaling configuration: Ray Serve's fields, defaults and checks."""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from typing import Any

import msgpack
import pytest

from trioserve.core.config import (
    LIGHTWEIGHT_FIELDS,
    REPLICA_CONFIG_FIELDS,
    AutoscalingConfig,
    ConfigError,
    DeploymentConfig,
    HTTPOptions,
)


def autoscaling(**overrides: Any) -> AutoscalingConfig:
    fields: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 4.0,
    }
    fields.update(overrides)
    return AutoscalingConfig(**fields)


def deployment(**overrides: Any) -> DeploymentConfig:
    fields: dict[str, Any] = {
        "num_replicas": 2,
        "max_ongoing_requests": 8,
        "user_config": {"model": "gbm-v3", "thresholds": [0.25, 0.5], "eu": {"tax": 0.2}},
        "graceful_shutdown_wait_loop_s": 0.1,
        "graceful_shutdown_timeout_s": 1.0,
        "health_check_period_s": 0.5,
        "health_check_timeout_s": 1.0,
    }
    fields.update(overrides)
    return DeploymentConfig(**fields)


# --------------------------------------------------------------------------- defaults


def test_autoscaling_defaults_are_ray_serves() -> None:
    config = AutoscalingConfig()

    assert config.min_replicas == 1
    assert config.initial_replicas is None
    assert config.max_replicas == 1
    assert config.target_ongoing_requests == 2
    assert config.metrics_interval_s == 10
    assert config.look_back_period_s == 30
    assert config.smoothing_factor == 1
    assert config.upscaling_factor is None
    assert config.downscaling_factor is None
    assert config.upscale_delay_s == 30
    assert config.downscale_delay_s == 600
    assert config.downscale_to_zero_delay_s is None
    assert config.aggregation_function == "mean"
    assert (config.upscale_factor, config.downscale_factor) == (1, 1)


def test_deployment_defaults_are_ray_serves() -> None:
    config = DeploymentConfig()

    assert config.num_replicas == 1
    assert config.max_ongoing_requests == 5
    assert config.max_queued_requests == -1
    assert config.user_config is None
    assert config.autoscaling_config is None
    assert config.graceful_shutdown_wait_loop_s == 2
    assert config.graceful_shutdown_timeout_s == 20
    assert config.health_check_period_s == 10
    assert config.health_check_timeout_s == 30
    assert config.ray_actor_options is None
    assert config.version is None
    assert config.initial_target == 1


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas"),
        ({"min_replicas": 5, "max_replicas": 4}, "max_replicas (4)"),
        ({"initial_replicas": 0, "min_replicas": 1}, "initial_replicas (0)"),
        ({"initial_replicas": 5, "max_replicas": 4}, "initial_replicas (5)"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
        ({"target_ongoing_requests": -1.5}, "target_ongoing_requests"),
        ({"target_ongoing_requests": math.nan}, "target_ongoing_requests"),
        ({"target_ongoing_requests": math.inf}, "target_ongoing_requests"),
        ({"metrics_interval_s": 0}, "metrics_interval_s"),
        ({"look_back_period_s": 0}, "look_back_period_s"),
        ({"smoothing_factor": 0}, "smoothing_factor"),
        ({"upscale_smoothing_factor": -1}, "upscale_smoothing_factor"),
        ({"downscale_smoothing_factor": 0}, "downscale_smoothing_factor"),
        ({"upscaling_factor": 0}, "upscaling_factor"),
        ({"downscaling_factor": math.nan}, "downscaling_factor"),
        ({"upscale_delay_s": -0.5}, "upscale_delay_s"),
        ({"downscale_delay_s": -1}, "downscale_delay_s"),
        ({"downscale_to_zero_delay_s": -1}, "downscale_to_zero_delay_s"),
        ({"aggregation_function": "median"}, "aggregation_function"),
    ],
)
def test_invalid_autoscaling_value_is_refused_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        autoscaling(**overrides)

    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_zero_delays_and_zero_min_replicas_are_valid() -> None:
    config = autoscaling(
        min_replicas=0, upscale_delay_s=0, downscale_delay_s=0, downscale_to_zero_delay_s=0
    )

    assert config.start_replicas == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_replicas": 0}, "num_replicas"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"max_queued_requests": -2}, "max_queued_requests"),
        ({"graceful_shutdown_wait_loop_s": -1}, "graceful_shutdown_wait_loop_s"),
        ({"graceful_shutdown_timeout_s": -0.1}, "graceful_shutdown_timeout_s"),
        ({"health_check_period_s": 0}, "health_check_period_s"),
        ({"health_check_timeout_s": math.inf}, "health_check_timeout_s"),
    ],
)
def test_invalid_deployment_value_is_refused_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        deployment(**overrides)


def test_num_replicas_and_autoscaling_config_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="num_replicas is not allowed when autoscaling_config"):
        deployment(num_replicas=3, autoscaling_config=autoscaling())

    config = deployment(num_replicas=None, autoscaling_config=autoscaling())
    assert config.num_replicas is None


# -------------------------------------------------------------------- derived values


def test_initial_target_is_num_replicas_or_the_autoscaling_start() -> None:
    assert deployment(num_replicas=3).initial_target == 3
    assert deployment(num_replicas=None, autoscaling_config=autoscaling()).initial_target == 1
    started = autoscaling(min_replicas=1, initial_replicas=3, max_replicas=4)
    assert deployment(num_replicas=None, autoscaling_config=started).initial_target == 3
    scale_to_zero = autoscaling(min_replicas=0)
    assert deployment(num_replicas=None, autoscaling_config=scale_to_zero).initial_target == 0


def test_scaling_factor_prefers_the_newest_name() -> None:
    assert autoscaling(smoothing_factor=0.5).upscale_factor == 0.5
    assert autoscaling(smoothing_factor=0.5).downscale_factor == 0.5
    older = autoscaling(
        smoothing_factor=0.5, upscale_smoothing_factor=2, downscale_smoothing_factor=0.3
    )
    assert (older.upscale_factor, older.downscale_factor) == (2, 0.3)
    newest = autoscaling(
        smoothing_factor=0.5,
        upscale_smoothing_factor=2,
        downscale_smoothing_factor=0.3,
        upscaling_factor=3,
        downscaling_factor=0.1,
    )
    assert (newest.upscale_factor, newest.downscale_factor) == (3, 0.1)


# -------------------------------------------------------------------- lightweight digest


def test_replica_config_fields_are_the_in_place_fields_a_replica_uses() -> None:
    assert set(REPLICA_CONFIG_FIELDS) == set(LIGHTWEIGHT_FIELDS) - {
        "num_replicas",
        "autoscaling_config",
    }
    assert "version" not in LIGHTWEIGHT_FIELDS
    assert "ray_actor_options" not in LIGHTWEIGHT_FIELDS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_config", {"model": "gbm-v4", "thresholds": [0.25, 0.5], "eu": {"tax": 0.2}}),
        ("user_config", {"model": "gbm-v3", "thresholds": [0.25, 0.6], "eu": {"tax": 0.2}}),
        ("user_config", {"model": "gbm-v3", "thresholds": [0.25, 0.5], "eu": {"tax": 0.21}}),
        ("user_config", None),
        ("max_ongoing_requests", 9),
        ("max_queued_requests", 50),
        ("graceful_shutdown_wait_loop_s", 0.2),
        ("graceful_shutdown_timeout_s", 2.0),
        ("health_check_period_s", 0.25),
        ("health_check_timeout_s", 2.0),
        ("logging_config", {"log_level": "DEBUG"}),
    ],
)
def test_digest_changes_with_each_replica_side_field(field: str, value: Any) -> None:
    before = deployment()

    after = dataclasses.replace(before, **{field: value})

    assert after.lightweight_digest() != before.lightweight_digest()


@pytest.mark.parametrize(
    "changes",
    [
        {"num_replicas": 5},
        {"num_replicas": None, "autoscaling_config": autoscaling()},
        {"version": "2024-06-02"},
        {"ray_actor_options": {"num_cpus": 2}},
    ],
    ids=["num_replicas", "autoscaling_config", "version", "ray_actor_options"],
)
def test_digest_ignores_scaling_and_restart_fields(changes: dict[str, Any]) -> None:
    before = deployment()

    after = dataclasses.replace(before, **changes)

    assert after.lightweight_digest() == before.lightweight_digest()


def test_digest_ignores_a_change_of_autoscaling_bounds() -> None:
    narrow = deployment(num_replicas=None, autoscaling_config=autoscaling(max_replicas=2))
    wide = deployment(num_replicas=None, autoscaling_config=autoscaling(max_replicas=8))

    assert narrow.lightweight_digest() == wide.lightweight_digest()


def test_digest_survives_the_trip_through_the_event_log() -> None:
    config = deployment(logging_config={"log_level": "INFO"})
    travelled = DeploymentConfig.from_dict(
        msgpack.unpackb(msgpack.packb(config.to_dict()), strict_map_key=False)
    )

    assert travelled.lightweight_digest() == config.lightweight_digest()
    assert len(config.lightweight_digest()) == 16


# Regression test; the bug was: lightweight_digest msgpack-packs user_config in insertion order,
# so equal dicts with keys in another order get another digest (Ray Serve hashes
# json.dumps(sort_keys=True)); redeploying an unchanged user_config then reconfigures every
# replica.
def test_digest_ignores_the_key_order_of_an_equal_user_config() -> None:
    first = deployment(user_config={"model": "gbm-v3", "threshold": 0.5})
    second = deployment(user_config={"threshold": 0.5, "model": "gbm-v3"})
    assert first == second

    assert first.lightweight_digest() == second.lightweight_digest()


def test_user_config_that_is_not_json_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="user_config"):
        deployment(user_config={1: "one", "two": 2})
    with pytest.raises(ConfigError, match="user_config"):
        deployment(user_config={"model": object()})


def test_user_config_is_normalised_as_json_so_replay_equals_live() -> None:
    config = deployment(user_config={"sizes": (1, 2)})
    assert config.user_config == {"sizes": [1, 2]}
    assert DeploymentConfig.from_dict(config.to_dict()) == config


def test_autoscaling_config_without_num_replicas_needs_no_explicit_none() -> None:
    config = DeploymentConfig(autoscaling_config=AutoscalingConfig(max_replicas=3))
    assert config.num_replicas is None and config.initial_target == 1


# ------------------------------------------------------------------------ dict form


def test_to_dict_from_dict_round_trip_keeps_every_field() -> None:
    config = deployment(
        num_replicas=None,
        autoscaling_config=autoscaling(initial_replicas=2, downscale_to_zero_delay_s=3.0),
        max_queued_requests=20,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"A": "1"}}},
        logging_config={"log_level": "DEBUG"},
        version="2024-06-01",
    )

    data = config.to_dict()
    again = DeploymentConfig.from_dict(data)

    assert again == config
    assert isinstance(again.autoscaling_config, AutoscalingConfig)
    assert isinstance(data["autoscaling_config"], dict)
    assert data["autoscaling_config"]["downscale_to_zero_delay_s"] == 3.0
    assert set(data) == {f.name for f in dataclasses.fields(DeploymentConfig)}


def test_dict_form_survives_msgpack() -> None:
    config = deployment(num_replicas=None, autoscaling_config=autoscaling(upscaling_factor=1.5))

    packed = msgpack.packb(config.to_dict(), use_bin_type=True)

    assert DeploymentConfig.from_dict(msgpack.unpackb(packed, raw=False)) == config


def test_autoscaling_round_trip_keeps_every_field() -> None:
    config = autoscaling(
        min_replicas=0,
        initial_replicas=1,
        smoothing_factor=0.8,
        downscaling_factor=0.5,
        downscale_to_zero_delay_s=2.0,
        aggregation_function="max",
    )

    assert AutoscalingConfig.from_dict(config.to_dict()) == config


def test_unknown_deployment_field_is_refused_naming_it() -> None:
    data = deployment().to_dict()
    data["max_concurrent_queries"] = 10
    data["zzz_typo"] = 1

    with pytest.raises(
        ConfigError, match=r"unknown deployment config field.*max_concurrent_queries"
    ):
        DeploymentConfig.from_dict(data)


def test_unknown_autoscaling_field_is_refused_naming_it() -> None:
    data = deployment(num_replicas=None, autoscaling_config=autoscaling()).to_dict()
    data["autoscaling_config"]["target_num_ongoing_requests"] = 1

    with pytest.raises(
        ConfigError, match=r"unknown autoscaling_config field.*target_num_ongoing_requests"
    ):
        DeploymentConfig.from_dict(data)


def test_from_dict_validates_like_the_constructor() -> None:
    data = deployment().to_dict()
    data["health_check_period_s"] = 0

    with pytest.raises(ConfigError, match="health_check_period_s"):
        DeploymentConfig.from_dict(data)


# ----------------------------------------------------------------- HTTPOptions


def test_http_options_defaults_follow_ray_serve() -> None:
    options = HTTPOptions()
    assert (options.host, options.port, options.root_path) == ("127.0.0.1", 8000, "")
    # Ray Serve's DEFAULT_UVICORN_KEEP_ALIVE_TIMEOUT_S.
    assert options.request_timeout_s is None and options.keep_alive_timeout_s == 90
    assert options.enabled and options.location == "HeadOnly"
    assert (options.middlewares, options.num_cpus, options.root_url) == ([], 0, "")
    assert options.ssl_keyfile is options.ssl_certfile is None
    assert options.ssl_keyfile_password is options.ssl_ca_certs is None
    assert HTTPOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 70000}, "port must be an int"),
        ({"root_path": "base"}, "root_path must start with '/'"),
        ({"root_path": "/base/"}, "not end with '/'"),
        ({"request_timeout_s": 0}, "request_timeout_s must be a positive number"),
        ({"keep_alive_timeout_s": -1}, "keep_alive_timeout_s must be a positive number"),
        ({"event_loop": "gevent"}, "event_loop must be one of"),
        ({"location": "Everywhere"}, "proxy location must be one of"),
        ({"colour": "blue"}, "unknown http_options field"),
    ],
)
def test_http_options_refuse_bad_values_with_a_clear_error(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        HTTPOptions.from_dict(fields)


def test_proxy_location_disabled_or_noserver_runs_no_proxy() -> None:
    assert not HTTPOptions(location="Disabled").enabled
    assert HTTPOptions(location="NoServer").location == "Disabled"
    assert HTTPOptions(location="EveryNode").enabled


@pytest.mark.parametrize("fields", [{"host": None}, {"location": None}])
def test_no_host_or_no_location_runs_no_proxy_as_in_ray_serve(fields: dict[str, Any]) -> None:
    options = HTTPOptions.from_dict(fields)
    assert options.location == "Disabled" and not options.enabled
    assert options.host == "127.0.0.1"  # stays a str for whoever reads it
    assert HTTPOptions(**fields) == options
    assert HTTPOptions.from_dict(options.to_dict()) == options


def test_host_none_wins_over_a_proxy_location() -> None:
    assert not HTTPOptions.from_dict({"host": None, "location": "EveryNode"}).enabled


def test_ray_only_fields_are_accepted_ignored_and_warned_about_once() -> None:
    ray_fields: dict[str, Any] = {
        "middlewares": [object()],
        "num_cpus": 1,
        "root_url": "http://example.com",
        "ssl_keyfile": "key.pem",
        "ssl_certfile": "cert.pem",
        "ssl_keyfile_password": "secret",
        "ssl_ca_certs": "ca.pem",
    }
    with pytest.warns(UserWarning) as caught:
        options = HTTPOptions.from_dict({"port": 0, **ray_fields})
    [warning] = caught.list
    message = str(warning.message)
    for name in ray_fields:
        assert name in message
    assert "ignored" in message and "not HTTPS" in message
    assert "secret" not in message and "secret" not in repr(options)
    # They take no part: not passed on (to the proxy), not compared.
    data = options.to_dict()
    assert not set(ray_fields) & set(data)
    assert options == HTTPOptions(port=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HTTPOptions.from_dict(data) == options  # the trip does not warn again
        HTTPOptions(middlewares=[], num_cpus=0, root_url="")  # Ray's defaults: no warning


def test_one_ignored_field_gives_a_warning_naming_only_it() -> None:
    with pytest.warns(UserWarning, match="num_cpus: accepted") as caught:
        HTTPOptions(num_cpus=2)
    assert "HTTPS" not in str(caught.list[0].message)
    assert "middlewares" not in str(caught.list[0].message)


def test_proxy_location_enums_stand_for_their_value() -> None:
    class ProxyLocation(str, enum.Enum):  # noqa: UP042 (as ray.serve.config.ProxyLocation)
        EveryNode = "EveryNode"
        Disabled = "Disabled"

    assert HTTPOptions(location=ProxyLocation.EveryNode).location == "EveryNode"
    assert not HTTPOptions(location=ProxyLocation.Disabled).enabled
