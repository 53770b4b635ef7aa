"""Config files in Ray Serve's YAML schema: parsing, errors with lines, overrides, building."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import yaml

from tests.apps import configured
from tests.conftest import POLL_DEADLINE_S
from trioserve import config_file as cf
from trioserve.cli import main
from trioserve.config_file import (
    AppConfig,
    ConfigFileError,
    build_applications,
    build_config,
    build_from_config,
    dump_config,
    http_options_of,
    import_application,
    load_config_file,
    parse_config,
)
from trioserve.core.deployment import build_app

REPO = Path(__file__).resolve().parents[1]

# The production config example of Ray Serve's documentation, unchanged.
RAY_DOCS_CONFIG = """\
proxy_location: EveryNode

http_options:
  host: 0.0.0.0
  port: 8000

grpc_options:
  port: 9000
  grpc_servicer_functions: []

logging_config:
  encoding: TEXT
  log_level: INFO
  logs_dir: null
  enable_access_log: true

applications:
- name: app1
  route_prefix: /
  import_path: text_ml:app
  runtime_env:
    pip:
      - torch
      - transformers
  deployments:
  - name: Translator
    num_replicas: 1
    user_config:
      language: french
  - name: Summarizer
    num_replicas: 1
"""

CALCULATOR = """\
applications:
  - name: app1
    route_prefix: /calculator
    import_path: tests.apps.configured:app
    runtime_env:
      env_vars:
        CALC_MODE: fast
    deployments:
      - name: Multiplier
        num_replicas: 2
        user_config:
          factor: 3
  - name: app2
    route_prefix: /greet
    import_path: tests.apps.configured:build_greeter
    args:
      greeting: howdy
"""


def parse(text: str, base_dir: Path | None = None) -> object:
    return parse_config(textwrap.dedent(text), "config.yaml", base_dir=base_dir)


def test_a_config_from_ray_docs_parses_as_written() -> None:
    config = parse_config(RAY_DOCS_CONFIG, "serve_config.yaml")
    assert config.proxy_location == "EveryNode"
    assert config.http_options == {"host": "0.0.0.0", "port": 8000}
    assert config.logging_config == {
        "encoding": "TEXT",
        "log_level": "INFO",
        "logs_dir": None,
        "enable_access_log": True,
    }
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("app1", "/", "text_ml:app")
    assert app.runtime_env == {"pip": ["torch", "transformers"]}
    assert app.deployments == (
        {"name": "Translator", "num_replicas": 1, "user_config": {"language": "french"}},
        {"name": "Summarizer", "num_replicas": 1},
    )
    # The file's content comes back as given, grpc_options included.
    assert config.to_dict() == yaml.safe_load(RAY_DOCS_CONFIG)


def test_defaults_match_ray_serve() -> None:
    config = parse_config("applications:\n  - import_path: tests.apps.configured:app\n")
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.args, app.runtime_env) == ("default", "/", {}, {})
    assert app.deployments == ()
    assert config.http_options is None and config.logging_config is None


@pytest.mark.parametrize(
    ("text", "line", "key", "says"),
    [
        (
            """\
            applications: []
            proxy_locaton: EveryNode
            """,
            2,
            "proxy_locaton",
            "Did you mean 'proxy_location'?",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Multiplier
                    num_replica: 2
            """,
            5,
            "applications[0].deployments[0].num_replica",
            "unknown key in a deployment override",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Adder
                  - name: Multiplier
                    num_replicas: many
            """,
            6,
            "applications[0].deployments[1].num_replicas",
            'must be an integer greater than 0, or "auto"',
        ),
        (
            """\
            applications:
              - name: app1
                route_prefix: /one
            """,
            2,
            "applications[0].import_path",
            "required",
        ),
        (
            """\
            applications:
              - name: app1
                import_path: tests.apps.configured:app
              - name: app1
                route_prefix: /other
                import_path: tests.apps.configured:greeter
            """,
            4,
            "applications[1].name",
            'Found multiple configs for application "app1" (also at line 2)',
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
              - import_path: tests.apps.configured:greeter
                route_prefix: /greet
            """,
            3,
            "applications[1].name",
            'Found multiple configs for application "default"',
        ),
        (
            """\
            applications:
              - name: a
                import_path: tests.apps.configured:app
                route_prefix: /x
              - name: b
                import_path: tests.apps.configured:greeter
                route_prefix: /x
            """,
            7,
            "applications[1].route_prefix",
            'Found duplicate applications for route prefix "/x"',
        ),
        (
            """\
            applications:
              - name: app1
                route_prefix: /calculator
                import_path: calculator:app
                runtime_env:
                  working_dir: "https://github.com/ray-project/serve_config_examples/archive/HEAD.zip"
            """,
            6,
            "applications[0].runtime_env.working_dir",
            "trioserve supports only local paths",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                route_prefix: calculator
            """,
            3,
            "applications[0].route_prefix",
            'Route prefix must start with "/"',
        ),
        (
            """\
            applications:
              - import_path: app
            """,
            2,
            "applications[0].import_path",
            "must contain at least one dot or colon",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:build_greeter
                args: [1, 2]
            """,
            3,
            "applications[0].args",
            "must be a mapping",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                runtime_env:
                  conda: env.yaml
            """,
            4,
            "applications[0].runtime_env.conda",
            "supported keys: env_vars, working_dir, pip",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                runtime_env:
                  env_vars:
                    WORKERS: 4
            """,
            5,
            "applications[0].runtime_env.env_vars.WORKERS",
            "must be strings",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Multiplier
                    num_replicas: 2
                    autoscaling_config:
                      max_replicas: 3
            """,
            4,
            "applications[0].deployments[0]",
            "Manually setting num_replicas is not allowed when autoscaling_config is provided",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Multiplier
                    autoscaling_config:
                      min_replicas: 4
                      max_replicas: 2
            """,
            5,
            "applications[0].deployments[0].autoscaling_config",
            "max_replicas (2) must be greater than or equal to min_replicas (4)",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Multiplier
                    ray_actor_options:
                      num_cpu: 1
            """,
            6,
            "applications[0].deployments[0].ray_actor_options.num_cpu",
            "Did you mean 'num_cpus'?",
        ),
        (
            """\
            http_options:
              port: eighty
            applications: []
            """,
            2,
            "http_options.port",
            "must be a port number",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                port: 8000
            """,
            3,
            "applications[0].port",
            "under the top-level `http_options:`",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                name: a
                name: b
            """,
            4,
            None,
            "duplicate key 'name'",
        ),
    ],
)
def test_errors_name_the_file_the_line_and_the_key(
    text: str, line: int, key: str | None, says: str
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        parse(text)
    error = caught.value
    assert (error.source, error.line, error.key) == ("config.yaml", line, key)
    assert says in str(error)
    assert str(error).startswith(f"config.yaml:{line}: " + (f"{key}: " if key else ""))


def test_a_file_that_is_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("applications:\n  - import_path: a:b\n    args: {x: [1,\n")
    with pytest.raises(ConfigFileError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config_file(path)
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config_file(tmp_path / "missing.yaml")


def test_an_override_changes_only_the_fields_the_file_sets() -> None:
    config = parse(
        """\
        applications:
          - import_path: tests.apps.configured:app
            deployments:
              - name: Multiplier
                num_replicas: 2
                user_config:
                  factor: 3
        """
    )
    (built,) = build_applications(config)
    specs = {s.name: s for s in built.deployments}
    plain = {s.name: s for s in build_app(configured.app, "default", "/").deployments}
    multiplier = specs["Multiplier"].config
    assert multiplier.num_replicas == 2
    assert multiplier.user_config == {"factor": 3}
    assert multiplier.max_ongoing_requests == 7  # set in the code, not in the file
    assert specs["Multiplier"].code_version == plain["Multiplier"].code_version
    # The deployments the file does not mention are exactly as the code builds them.
    assert specs["Adder"] == plain["Adder"]
    assert specs["Calculator"] == plain["Calculator"]
    assert built.ingress == "Calculator" and built.route_prefix == "/"
    # The user's objects are left as they were.
    assert configured.app.deployment.name == "Calculator"
    assert configured.Multiplier.num_replicas == 1
    assert configured.Multiplier.user_config is None


def test_the_same_file_builds_the_same_specs_and_one_change_changes_one_deployment() -> None:
    config = parse_config(CALCULATOR, "calc.yaml")
    first = build_applications(config)
    again = build_applications(parse_config(CALCULATOR, "calc.yaml"))
    assert [b.deployments for b in first] == [b.deployments for b in again]
    assert [b.blobs for b in first] == [b.blobs for b in again]

    changed = build_applications(parse_config(CALCULATOR.replace("factor: 3", "factor: 4"), "c"))
    before = {(b.name, s.name): s for b in first for s in b.deployments}
    after = {(b.name, s.name): s for b in changed for s in b.deployments}
    differ = sorted(key for key in before if before[key] != after[key])
    assert differ == [("app1", "Multiplier")]
    # A user_config change updates replicas in place: the code version stays.
    key = ("app1", "Multiplier")
    assert after[key].code_version == before[key].code_version
    assert after[key].config.user_config == {"factor": 4}


def test_two_processes_build_the_same_code_versions(tmp_path: Path) -> None:
    path = tmp_path / "calc.yaml"
    path.write_text(CALCULATOR)
    script = (
        "import json, sys\n"
        "from trioserve.config_file import load_config_file, build_applications\n"
        "built = build_applications(load_config_file(sys.argv[1]))\n"
        "print(json.dumps([[s.name, s.code_version, s.init_args] for b in built "
        "for s in b.deployments]))\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, str(path)],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for seed in ("1", "2")
    ]
    assert json.loads(outputs[0]) == json.loads(outputs[1])


def test_builder_functions_get_the_args() -> None:
    app = import_application("tests.apps.configured:build_greeter", {"greeting": "bonjour"})
    assert app.deployment.name == "Greeter"
    assert app._args == ("bonjour",)
    typed = import_application(
        "tests.apps.configured:build_typed_greeter", {"greeting": "hey", "repeat": "2"}
    )
    assert typed._args == ("hey hey",)  # converted to the builder's pydantic model
    dotted = import_application("tests.apps.configured.greeter")
    assert dotted is configured.greeter


@pytest.mark.parametrize(
    ("import_path", "args", "says"),
    [
        ("tests.apps.configured:greeter", {"a": "1"}, "args are only accepted for builder"),
        ("tests.apps.configured:Greeter", {}, "did you forget .bind()?"),
        ("tests.apps.configured:not_an_app", {}, "Expected a built Serve application"),
        ("tests.apps.configured:build_nothing", {}, "must return an `Application`"),
        ("tests.apps.configured:missing", {}, "has no attribute 'missing'"),
        ("tests.apps.no_such_module:app", {}, "cannot import module 'tests.apps.no_such_module'"),
        ("tests.apps.configured:build_typed_greeter", {"repeat": "x"}, "do not fit GreeterArgs"),
    ],
)
def test_import_errors_say_what_to_do(import_path: str, args: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        import_application(import_path, args)
    assert says in str(caught.value)


def test_build_errors_point_at_the_entry(tmp_path: Path) -> None:
    config = parse(
        """\
        applications:
          - name: calc
            import_path: tests.apps.configured:app
            deployments:
              - name: Adder
              - name: Divider
                num_replicas: 2
        """
    )
    with pytest.raises(ConfigFileError) as caught:
        build_applications(config)
    assert caught.value.line == 6
    assert caught.value.key == "applications[0].deployments[1].name"
    assert "its deployments are: Multiplier, Adder, Calculator" in str(caught.value)

    config = parse(
        """\
        applications:
          - import_path: tests.apps.configured:nope
        """
    )
    with pytest.raises(ConfigFileError, match=r"config\.yaml:2: applications\[0\]\.import_path"):
        build_applications(config)


def test_the_runtime_env_reaches_every_deployment(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    config = parse(
        """\
        applications:
          - import_path: tests.apps.configured:app
            runtime_env:
              working_dir: code
              env_vars: {CALC_MODE: fast, SHARED: app}
            deployments:
              - name: Adder
                ray_actor_options:
                  num_cpus: 0.5
                  runtime_env:
                    env_vars: {SHARED: adder}
        """,
        base_dir=tmp_path,
    )
    (app,) = config.applications
    assert app.runtime_env["working_dir"] == str((tmp_path / "code").resolve())
    (built,) = build_applications(config)
    envs = {s.name: dict(s.config.ray_actor_options or {}) for s in built.deployments}
    workdir = str((tmp_path / "code").resolve())
    assert envs["Multiplier"]["runtime_env"]["env_vars"] == {"CALC_MODE": "fast", "SHARED": "app"}
    assert envs["Multiplier"]["runtime_env"]["working_dir"] == workdir
    assert envs["Adder"]["num_cpus"] == 0.5
    # The deployment's own keys win; env_vars are merged, as in Ray.
    assert envs["Adder"]["runtime_env"]["env_vars"] == {"CALC_MODE": "fast", "SHARED": "adder"}
    assert envs["Adder"]["runtime_env"]["working_dir"] == workdir


def test_a_relative_working_dir_starts_at_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "project" / "src").mkdir(parents=True)
    path = tmp_path / "project" / "serve.yaml"
    path.write_text(
        "applications:\n"
        "  - import_path: tests.apps.configured:app\n"
        "    runtime_env: {working_dir: src}\n"
    )
    (app,) = load_config_file(path).applications
    assert app.runtime_env["working_dir"] == str((tmp_path / "project" / "src").resolve())
    path.write_text(
        "applications:\n"
        "  - import_path: tests.apps.configured:app\n"
        "    runtime_env: {working_dir: elsewhere}\n"
    )
    with pytest.raises(ConfigFileError, match=r"serve\.yaml:3: .*not a folder or \.zip"):
        load_config_file(path)


def test_the_top_level_logging_config_is_the_default_of_each_app() -> None:
    config = parse(
        """\
        logging_config: {log_level: DEBUG}
        applications:
          - name: a
            route_prefix: /a
            import_path: tests.apps.configured:greeter
          - name: b
            route_prefix: /b
            import_path: tests.apps.configured:greeter
            logging_config: {log_level: WARNING}
        """
    )
    a, b = build_applications(config)
    assert a.deployments[0].config.logging_config == {"log_level": "DEBUG"}
    assert b.deployments[0].config.logging_config == {"log_level": "WARNING"}


def test_command_line_host_and_port_win_over_the_file() -> None:
    config = parse(
        """\
        proxy_location: HeadOnly
        http_options: {host: 0.0.0.0, port: 8123, request_timeout_s: 5}
        applications: []
        """
    )
    assert http_options_of(config) == {
        "host": "0.0.0.0",
        "port": 8123,
        "request_timeout_s": 5,
        "location": "HeadOnly",
    }
    options = http_options_of(config, host="127.0.0.1", port=0)
    assert (options["host"], options["port"]) == ("127.0.0.1", 0)


def test_build_writes_a_config_that_builds_the_same_specs(tmp_path: Path) -> None:
    written = build_config(["tests.apps.configured:app"])
    assert written["applications"] == [
        {
            "name": "app1",
            "route_prefix": "/",
            "import_path": "tests.apps.configured:app",
            "runtime_env": {},
            "deployments": [
                {"name": "Multiplier", "max_ongoing_requests": 7},
                {"name": "Adder"},
                {"name": "Calculator", "num_replicas": 1},
            ],
        }
    ]
    path = tmp_path / "serve.yaml"
    path.write_text(dump_config(written))
    (built,) = build_applications(load_config_file(path))
    assert built.deployments == build_app(configured.app, "app1", "/").deployments

    two = build_config(["tests.apps.configured:app", "tests.apps.configured:greeter"])
    assert [(a["name"], a["route_prefix"]) for a in two["applications"]] == [
        ("app1", "/app1"),
        ("app2", "/app2"),
    ]
    with pytest.raises(ConfigFileError, match=r"did you forget \.bind"):
        build_config(["tests.apps.configured:Greeter"])


def test_build_from_config_accepts_an_app_config_made_in_code() -> None:
    built = build_from_config(
        AppConfig(
            name="greet",
            route_prefix="/greet",
            import_path="tests.apps.configured:build_greeter",
            args={"greeting": "hi"},
            deployments=({"name": "Greeter", "num_replicas": 3},),
        )
    )
    assert (built.name, built.route_prefix, built.ingress) == ("greet", "/greet", "Greeter")
    assert built.deployments[0].config.num_replicas == 3


def test_trioserve_build_prints_or_writes_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "tests.apps.configured:app"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# This file was generated using the `trioserve build` command")
    assert yaml.safe_load(printed)["applications"][0]["import_path"] == "tests.apps.configured:app"

    target = tmp_path / "out.yaml"
    assert main(["build", "tests.apps.configured:app", "-o", str(target)]) == 0
    assert yaml.safe_load(target.read_text()) == yaml.safe_load(printed)

    assert main(["build", "tests.apps.configured:not_an_app"]) == 2
    assert "Expected a built Serve application" in capsys.readouterr().err


def test_trioserve_run_refuses_a_bad_file_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOSERVE_HOME", str(tmp_path / "home"))
    path = tmp_path / "bad.yaml"
    path.write_text(
        "applications:\n  - import_path: tests.apps.configured:app\n    deployments:\n"
        "      - name: Multiplier\n        max_ongoing_requests: 0\n"
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: applications[0].deployments[0].max_ongoing_requests" in err
    assert not (tmp_path / "home").exists()  # no instance was started

    assert main(["run", str(path), "--name", "x"]) == 2
    assert "cannot be used with a config file" in capsys.readouterr().err
    assert main(["run", "tests.apps.configured:greeter", "oops"]) == 2
    assert "is not key=value" in capsys.readouterr().err


async def test_redeploying_the_same_file_restarts_nothing_and_one_change_changes_one(
    serve_home: Path,
) -> None:
    import trioserve
    from trioserve.core import events as ev
    from trioserve.handle import DeploymentHandle
    from trioserve.store import EventLog

    async def deploy(text: str, inst: trioserve.ServeInstance) -> None:
        for built in build_applications(parse_config(text, "calc.yaml")):
            await inst.deploy(built)
        for app in ("app1", "app2"):
            await inst.wait_running(app)

    def replicas(status: object) -> dict[str, list[tuple[str, int | None]]]:
        return {
            name: [(r.replica_id, r.pid) for r in dep.replicas]
            for app in status.applications.values()  # type: ignore[attr-defined]
            for name, dep in app.deployments.items()
        }

    def started(run_dir: Path) -> int:
        with EventLog.open(run_dir / "events.db", create=False) as log:
            return sum(isinstance(s.event, ev.ReplicaStarting) for s in log.read())

    async with trioserve.open_instance(proxy_location="Disabled") as inst:
        await deploy(CALCULATOR, inst)
        first = replicas(await inst.status())
        starts = started(inst.run_dir)
        multiplier = DeploymentHandle("Multiplier", "app1")
        assert await multiplier.remote(5) == 15

        await deploy(CALCULATOR, inst)
        assert replicas(await inst.status()) == first
        assert started(inst.run_dir) == starts

        # A new user_config reconfigures the Multiplier replicas in place; nothing restarts.
        await deploy(CALCULATOR.replace("factor: 3", "factor: 4"), inst)
        assert replicas(await inst.status()) == first
        assert started(inst.run_dir) == starts
        with trio.fail_after(60):
            while (result := await multiplier.remote(5)) != 20:
                assert result == 15
                await trio.sleep(0.05)


@pytest.mark.parametrize(
    ("text", "line", "key", "says"),
    [
        (
            """\
            logging_config:
              encoding: XML
            applications:
              - import_path: tests.apps.configured:app
            """,
            2,
            "logging_config.encoding",
            "must be 'TEXT' or 'JSON', got 'XML'",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                logging_config: {log_level: LOUD}
            """,
            3,
            "applications[0].logging_config.log_level",
            "must be a logging level: one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            """\
            applications:
              - import_path: tests.apps.configured:app
                deployments:
                  - name: Adder
                    logging_config:
                      enable_access_log: false
                      encoding: XML
            """,
            7,
            "applications[0].deployments[0].logging_config.encoding",
            "must be 'TEXT' or 'JSON'",
        ),
    ],
)
def test_a_bad_logging_config_is_refused_at_its_line(
    text: str, line: int, key: str, says: str
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        parse_config(textwrap.dedent(text), "serve.yaml")
    assert (caught.value.line, caught.value.key) == (line, key)
    assert says in str(caught.value) and str(caught.value).startswith(f"serve.yaml:{line}: {key}")


def test_lower_case_logging_names_are_accepted_as_in_python() -> None:
    config = parse_config("logging_config: {encoding: json, log_level: debug}\napplications: []\n")
    assert config.logging_config == {"encoding": "json", "log_level": "debug"}


# ------------------------------------------------------------------ --reload


def test_watched_files_see_an_edit_that_keeps_the_mtime(tmp_path: Path) -> None:
    module = tmp_path / "helper.py"
    module.write_text("ANSWER = 1\n")
    before = cf._watched_files([tmp_path])
    stat = module.stat()
    module.write_text("ANSWER = 1000\n")
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # an edit within one clock tick
    assert cf._watched_files([tmp_path]) != before


def test_a_reload_versions_every_deployment_by_the_watched_files_contents(tmp_path: Path) -> None:
    config = parse_config(CALCULATOR, "calc.yaml")
    helper = tmp_path / "helper.py"
    helper.write_text("ANSWER = 'one'\n")
    _, first, seen = cf._build_watched([tmp_path], lambda: config)
    assert list(seen) == [str(helper)]
    _, again, _ = cf._build_watched([tmp_path], lambda: config)
    assert [b.deployments for b in first] == [b.deployments for b in again]

    helper.write_text("ANSWER = 'two'\n")  # a module the deployments' classes do not live in
    _, changed, _ = cf._build_watched([tmp_path], lambda: config)
    before = {s.name: s.code_version for b in first for s in b.deployments}
    after = {s.name: s.code_version for b in changed for s in b.deployments}
    assert before.keys() == after.keys()
    assert all(before[name] != after[name] for name in before)  # every replica rolls

    # An explicit version is the user's word on when replicas roll, as in Ray.
    versioned = cf.AppConfig(
        name="v",
        import_path="tests.apps.configured:greeter",
        deployments=({"name": "Greeter", "version": "7"},),
    )
    built = build_from_config(versioned)
    assert cf._with_files_version([built], "x")[0].deployments == built.deployments


def test_a_reload_imports_and_builds_in_a_worker_thread(tmp_path: Path) -> None:
    (tmp_path / "app_module.py").write_text("ANSWER = 1\n")
    loaded_on: list[int] = []

    def load() -> cf.ServeConfig:
        loaded_on.append(threading.get_ident())
        raise ConfigFileError("stop here")

    out = io.StringIO()
    state = cf._RunState(
        load=load,
        http_options={},
        reload=True,
        watch=[tmp_path],
        keep_modules=set(sys.modules),
        progress=cf._Progress(out),
    )

    async def wait_for(produce: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + POLL_DEADLINE_S
        while not produce():
            assert time.monotonic() < deadline, f"still waiting for {what}:\n{out.getvalue()}"
            await trio.sleep(0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cf._watch_and_reload, None, state)
            await wait_for(lambda: "Watching" in out.getvalue(), "the watch to start")
            (tmp_path / "app_module.py").write_text("ANSWER = 22\n")
            await wait_for(lambda: "still serving" in out.getvalue(), "the reload")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert loaded_on and threading.get_ident() not in loaded_on
