"""runtime_env on real replica processes: env vars, working dirs (folder, zip), pip."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.apps import runtime_env_app as apps
from tests.apps.wheels import make_wheel
from trioserve.core.runtime_env import pip_env_digest
from trioserve.exceptions import DeployFailedError

DEADLINE_S = 120.0


def replica_logs(home: Path) -> str:
    return "".join(
        p.read_text(errors="replace") for p in sorted((home / "latest" / "logs").glob("replica-*"))
    )


def test_env_vars_reach_the_replica(serve_instance: Any) -> None:
    serve = serve_instance
    handle = serve.run(
        apps.Environment.options(
            ray_actor_options={"runtime_env": {"env_vars": {"GREETING": "hello from env"}}}
        ).bind(),
        name="env",
        route_prefix=None,
    )
    assert handle.remote("GREETING").result(timeout_s=DEADLINE_S)["value"] == "hello from env"


def test_a_working_dir_folder_is_the_cwd_and_importable(
    serve_instance: Any, tmp_path: Path
) -> None:
    serve = serve_instance
    code = tmp_path / "code"
    code.mkdir()
    (code / "wd_folder_module.py").write_text("VALUE = 'from the folder'\n")
    (code / "data.txt").write_text("relative data")
    handle = serve.run(
        apps.Importer.options(ray_actor_options={"runtime_env": {"working_dir": str(code)}}).bind(),
        name="wd",
        route_prefix=None,
    )
    got = handle.remote("wd_folder_module", "data.txt").result(timeout_s=DEADLINE_S)
    assert got["value"] == "from the folder"
    assert got["data"] == "relative data"  # relative to the working dir: it is the cwd
    assert Path(got["file"]).parent == code


def test_a_zipped_working_dir_is_extracted_and_used(
    serve_instance: Any, serve_home: Path, tmp_path: Path
) -> None:
    serve = serve_instance
    archive = tmp_path / "code.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("wd_zip_module.py", "VALUE = 'from the zip'\n")
        z.writestr("data.txt", "zipped data")
    handle = serve.run(
        apps.Importer.options(
            num_replicas=2, ray_actor_options={"runtime_env": {"working_dir": str(archive)}}
        ).bind(),
        name="zip",
        route_prefix=None,
    )
    got = handle.remote("wd_zip_module", "data.txt").result(timeout_s=DEADLINE_S)
    assert (got["value"], got["data"]) == ("from the zip", "zipped data")
    assert Path(got["file"]).is_relative_to(serve_home / "cache" / "working_dir")
    assert replica_logs(serve_home).count("extracting working_dir") == 1


def test_a_pip_environment_is_built_once_offline_and_reused(
    serve_instance: Any, serve_home: Path, tmp_path: Path
) -> None:
    serve = serve_instance
    wheel = str(make_wheel(tmp_path / "wheels", "tinypkg_e2e", "installed by pip"))
    options = {"runtime_env": {"pip": [wheel]}}
    handle = serve.run(
        apps.Importer.options(num_replicas=2, ray_actor_options=options).bind(),
        name="pip",
        route_prefix=None,
    )
    seen = {}
    for _ in range(20):
        got = handle.remote("tinypkg_e2e").result(timeout_s=DEADLINE_S)
        seen[got["pid"]] = got
    for got in seen.values():
        assert got["value"] == "installed by pip"
        assert "/cache/pip/" in got["executable"]
        assert got["trioserve"]  # trioserve imports in the environment too
    root = serve_home / "cache" / "pip" / pip_env_digest([wheel])
    assert (root / "complete.json").exists()

    # Another application with the same requirements reuses the environment.
    other = serve.run(
        apps.Importer.options(name="Again", ray_actor_options=options).bind(),
        name="pip-again",
        route_prefix=None,
    )
    assert other.remote("tinypkg_e2e").result(timeout_s=DEADLINE_S)["value"] == "installed by pip"
    logs = replica_logs(serve_home)
    assert logs.count("building pip environment") == 1
    assert len(re.findall(r"Successfully installed tinypkg-e2e", logs)) == 1
    assert logs.count("reusing pip environment") == 2


def test_a_failing_pip_install_fails_the_deploy_with_pips_output(
    serve_instance: Any, serve_home: Path, tmp_path: Path
) -> None:
    serve = serve_instance
    missing = str(tmp_path / "missing_pkg-1.0-py3-none-any.whl")
    with pytest.raises(DeployFailedError) as info:
        serve.run(
            apps.Importer.options(ray_actor_options={"runtime_env": {"pip": [missing]}}).bind(),
            name="badpip",
            route_prefix=None,
        )
    message = serve.status().applications["badpip"].deployments["Importer"].message
    assert "pip install failed" in message and "missing_pkg" in message
    assert "missing_pkg" in str(info.value) or "pip" in str(info.value)
    assert not (serve_home / "cache" / "pip" / pip_env_digest([missing])).exists()
