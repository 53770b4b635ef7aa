"""runtime_env: validation at declaration, and preparing it (zip, pip) without a replica."""

from __future__ import annotations

import fcntl
import functools
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import trioserve as serve
from tests.apps.wheels import make_wheel
from tests.conftest import POLL_DEADLINE_S, pid_alive, poll_until
from trioserve.core import runtime_env as rt
from trioserve.core.runtime_env import RuntimeEnvError, prepare, validate_runtime_env


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRIOSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("uri", ["s3://bucket/code.zip", "https://example.com/a.zip", "gs://b/c"])
def test_a_remote_working_dir_is_refused_at_declaration(uri: str) -> None:
    with pytest.raises(ValueError, match="supports only local paths for runtime_env working_dir"):

        @serve.deployment(ray_actor_options={"runtime_env": {"working_dir": uri}})
        def f() -> None:
            pass

    @serve.deployment
    def g() -> None:
        pass

    with pytest.raises(ValueError, match=f"got '{uri}'"):
        g.options(ray_actor_options={"runtime_env": {"working_dir": uri}})


def test_a_missing_working_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeEnvError, match="does not exist"):
        validate_runtime_env({"working_dir": str(tmp_path / "nowhere")})


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "code.txt").write_text("x")
    with pytest.raises(RuntimeEnvError, match=r"not a \.zip"):
        validate_runtime_env({"working_dir": str(tmp_path / "code.txt")})


def test_env_vars_must_be_strings() -> None:
    with pytest.raises(RuntimeEnvError, match="str to str"):
        validate_runtime_env({"env_vars": {"N": 1}})
    with pytest.raises(RuntimeEnvError, match="must be a dict"):
        validate_runtime_env({"env_vars": ["A=1"]})
    assert validate_runtime_env({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}


def test_unsupported_fields_are_refused_and_rays_harmless_ones_accepted(tmp_path: Path) -> None:
    with pytest.raises(RuntimeEnvError, match=r"'conda'.*supports env_vars, working_dir, pip"):
        validate_runtime_env({"conda": "env.yaml"})
    out = validate_runtime_env(
        {"working_dir": str(tmp_path), "excludes": ["*.pt"], "config": {"setup_timeout_seconds": 1}}
    )
    assert out["working_dir"] == str(tmp_path)
    assert out["excludes"] == ["*.pt"]


def test_relative_working_dir_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "code").mkdir()
    monkeypatch.chdir(tmp_path)
    assert validate_runtime_env({"working_dir": "code"})["working_dir"] == str(tmp_path / "code")

    @serve.deployment(ray_actor_options={"runtime_env": {"working_dir": "code"}})
    def f() -> None:
        pass

    assert f.ray_actor_options is not None
    assert f.ray_actor_options["runtime_env"]["working_dir"] == str(tmp_path / "code")


def test_pip_forms(tmp_path: Path) -> None:
    assert validate_runtime_env({"pip": ["a==1", " b "]})["pip"] == ["a==1", "b"]
    assert validate_runtime_env({"pip": {"packages": ["a"], "pip_check": False}})["pip"] == ["a"]
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\na==1\n\nb  # why\n")
    assert validate_runtime_env({"pip": str(req)})["pip"] == ["a==1", "b"]
    with pytest.raises(RuntimeEnvError, match=r"requirements\.txt"):
        validate_runtime_env({"pip": str(tmp_path / "missing.txt")})
    with pytest.raises(RuntimeEnvError, match="list of requirement strings"):
        validate_runtime_env({"pip": [1]})
    assert rt.pip_env_digest(["b", "a"]) == rt.pip_env_digest(["a", "b"])
    assert rt.pip_env_digest(["a"]) != rt.pip_env_digest(["a", "b"])


# ------------------------------------------------------------------ preparing


def test_a_zip_is_extracted_once_into_the_cache(tmp_path: Path, home: Path) -> None:
    archive = tmp_path / "code.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("project/mod.py", "VALUE = 1\n")
    log = io.StringIO()
    first = prepare({"working_dir": str(archive)}, log=log)
    assert first.working_dir is not None
    # A single top-level folder is the working dir, as Ray unwraps it.
    assert Path(first.working_dir).name == "project"
    assert (Path(first.working_dir) / "mod.py").read_text() == "VALUE = 1\n"
    assert Path(first.working_dir).is_relative_to(home / "cache" / "working_dir")
    again = prepare({"working_dir": str(archive)}, log=log)
    assert again.working_dir == first.working_dir
    assert log.getvalue().count("extracting working_dir") == 1


def test_a_folder_is_used_in_place_with_env_vars(tmp_path: Path, home: Path) -> None:
    done = prepare({"working_dir": str(tmp_path), "env_vars": {"A": "b"}})
    assert done == rt.PreparedEnv(env_vars={"A": "b"}, working_dir=str(tmp_path), python=None)
    assert not (home / "cache").exists()


def test_child_pythonpath_puts_the_working_dir_first_and_drops_site_packages_for_pip() -> None:
    site_dir = rt.parent_site_dirs()[0]
    base = os.pathsep.join(["/src", site_dir])
    plain = rt.PreparedEnv(working_dir="/wd")
    assert rt.child_pythonpath(base, plain) == os.pathsep.join(["/wd", "/src", site_dir])
    venv = rt.PreparedEnv(working_dir="/wd", python="/v/bin/python")
    assert rt.child_pythonpath(base, venv, "/user") == os.pathsep.join(["/wd", "/user", "/src"])


def test_a_pip_environment_is_built_once_and_sees_the_parents_packages(
    tmp_path: Path, home: Path
) -> None:
    wheel = make_wheel(tmp_path / "wheels", "tinypkg_unit", "from-wheel")
    logs = [io.StringIO(), io.StringIO()]
    results: list[rt.PreparedEnv] = []

    def run(log: io.StringIO) -> None:
        results.append(prepare({"pip": [str(wheel)]}, log=log))

    # Two at once (as two replicas starting together): one builds, one waits and reuses.
    threads = [threading.Thread(target=run, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].python == results[1].python
    python = results[0].python
    assert python is not None
    text = logs[0].getvalue() + logs[1].getvalue()
    assert text.count("building pip environment") == 1
    assert text.count("reusing pip environment") == 1
    assert text.count("Successfully installed tinypkg-unit") == 1
    digest = rt.pip_env_digest([str(wheel)])
    assert (home / "cache" / "pip" / digest / "complete.json").exists()
    # The package, and trioserve with its dependencies (from the parent), import.
    out = subprocess.run(
        [python, "-c", "import tinypkg_unit, trioserve, anyio; print(tinypkg_unit.VALUE)"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from-wheel"
    assert sys.executable != python


def test_a_failed_pip_build_is_reported_with_pips_output_and_not_kept(
    tmp_path: Path, home: Path
) -> None:
    missing = str(tmp_path / "no_such_pkg-1.0-py3-none-any.whl")
    log = io.StringIO()
    with pytest.raises(RuntimeEnvError, match="pip install failed") as info:
        prepare({"pip": [missing]}, log=log)
    assert "no_such_pkg" in str(info.value)  # pip's own words, its output's tail
    digest = rt.pip_env_digest([missing])
    assert not (home / "cache" / "pip" / digest).exists()
    assert "no_such_pkg" in log.getvalue()


def test_pip_install_options_are_hashed_apart_from_the_packages_and_in_order() -> None:
    def digest(pip: dict[str, list[str]]) -> str:
        checked = validate_runtime_env({"pip": pip})["pip"]
        assert checked == pip  # options kept apart from the requirements, in their order
        return rt.pip_env_digest(
            checked["packages"], install_options=checked["pip_install_options"]
        )

    first = {
        "packages": ["x"],
        "pip_install_options": ["--index-url", "A", "--extra-index-url", "B"],
    }
    swapped = {
        "packages": ["x"],
        "pip_install_options": ["--index-url", "B", "--extra-index-url", "A"],
    }
    assert digest(first) != digest(swapped)
    # An option is not a requirement; the requirements' order still does not matter.
    assert rt.pip_env_digest(["x", "--pre"]) != rt.pip_env_digest(["x"], install_options=["--pre"])
    assert rt.pip_env_digest(["b", "a"], install_options=["--pre"]) == rt.pip_env_digest(
        ["a", "b"], install_options=["--pre"]
    )
    # Without options, the key is unchanged (environments built before are reused).
    assert rt.pip_env_digest(["x"], install_options=[]) == rt.pip_env_digest(["x"])


def _fake_python(folder: Path) -> Path:
    """An "interpreter" whose every run records itself, starts a child, and hangs."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{folder}/calls"\n'
        "sleep 600 &\n"
        f'echo $! >> "{folder}/pids"\n'
        f'echo $$ >> "{folder}/pids"\n'
        "wait\n"
    )
    script.chmod(0o755)
    return script


async def _wait_for(produce: Callable[[], object], what: str) -> object:
    """:func:`poll_until` for trio code."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not (value := produce()):
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await trio.sleep(0.05)
    return value


def test_a_cancelled_pip_build_kills_its_processes_and_keeps_nothing(
    tmp_path: Path, home: Path
) -> None:
    fake = _fake_python(tmp_path / "fake")
    pids = tmp_path / "fake" / "pids"
    log = io.StringIO()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(rt.prepare_async, {"pip": ["tinypkg"]}, python=str(fake), log=log)
            )
            # The venv step runs (the fake interpreter and its child are up): cancel.
            await _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, "pids")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "-m venv" in (tmp_path / "fake" / "calls").read_text()
    digest = rt.pip_env_digest(["tinypkg"], str(fake))
    assert not (home / "cache" / "pip" / digest).exists()  # no venv, no complete.json
    started = [int(p) for p in pids.read_text().split()]
    poll_until(lambda: not any(map(pid_alive, started)), "the build's processes to be killed")
    assert "built pip environment" not in log.getvalue()


def test_waiting_for_anothers_pip_build_does_not_block_the_loop_and_can_be_cancelled(
    tmp_path: Path, home: Path
) -> None:
    fake = _fake_python(tmp_path / "fake")
    digest = rt.pip_env_digest(["tinypkg"], str(fake))
    lock = home / "cache" / "pip" / f"{digest}.lock"
    lock.parent.mkdir(parents=True)
    log = io.StringIO()
    with open(lock, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another process builds it
        # Should the wait block the loop, the lock is let go (so this test fails, not hangs).
        safety = threading.Timer(POLL_DEADLINE_S, fcntl.flock, (held.fileno(), fcntl.LOCK_UN))
        safety.start()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        rt.prepare_async, {"pip": ["tinypkg"]}, python=str(fake), log=log
                    )
                )
                await _wait_for(lambda: "waiting for pip environment" in log.getvalue(), "wait")
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            safety.cancel()
    assert not (tmp_path / "fake" / "calls").exists()  # it never built
    assert not (home / "cache" / "pip" / digest).exists()


def test_a_relative_state_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trioserve.instance import state_home

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIOSERVE_HOME", "state")
    assert state_home() == tmp_path.resolve() / "state"
    assert rt.cache_dir() == tmp_path.resolve() / "state" / "cache"
    monkeypatch.setenv("TRIOSERVE_HOME", "~/somewhere")
    assert state_home() == (Path.home() / "somewhere").resolve()
