"""``runtime_env``: the environment a replica runs in (Ray's option, local paths only).

A deployment's ``ray_actor_options["runtime_env"]`` may hold:

``env_vars``
    ``{name: value}``, strings only: set in the replica's environment.
``working_dir``
    A local folder, or a local ``.zip`` file. The replica runs with it as its
    current directory and first ``sys.path`` entry. A folder is used in place; a
    zip is extracted once into ``<state dir>/cache/working_dir/<digest>/``
    (digest of the zip's bytes) and used from there; when the archive holds a
    single top-level folder and nothing else, that folder is the working dir.
    A remote URI (``s3://``, ``https://``, ``gs://``...) is refused: trioserve
    runs on one machine and fetches nothing.
``pip``
    Requirements (a list of strings, ``{"packages": [...]}`` or the path of a
    ``requirements.txt``) installed into a virtual environment made for that
    set of requirements: ``<state dir>/cache/pip/<digest>/venv``, built once
    (under a file lock, so replicas starting together build it once) and
    reused by every replica asking for the same set. It is made with
    ``--system-site-packages`` and sees the launching interpreter's
    site-packages after its own, so trioserve and its dependencies import as
    in the parent, while the listed requirements take precedence. A failed
    build is not kept: the replica fails to start, with the tail of pip's
    output as the reason. The build's output goes to the replica's log file.

``config`` and ``excludes`` are accepted and have no effect (``excludes``
filters uploads to a cluster, which trioserve never makes). Any other key is
refused with the list of supported ones.

:func:`validate_runtime_env` runs when a deployment is declared (pure checks
plus file-system existence); :func:`prepare_async` runs in the launcher, on its
event loop, before the replica process starts: pip and the venv creation run as
subprocesses that a cancellation kills, and a builder waiting for another's
file lock polls it, so that a shutdown never waits for a build.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread

__all__ = [
    "IGNORED_KEYS",
    "SUPPORTED_KEYS",
    "PreparedEnv",
    "RuntimeEnvError",
    "cache_dir",
    "child_pythonpath",
    "parent_site_dirs",
    "pip_env_digest",
    "prepare",
    "prepare_async",
    "run_command",
    "validate_runtime_env",
]

SUPPORTED_KEYS = ("env_vars", "working_dir", "pip")
IGNORED_KEYS = ("config", "excludes")
PIP_TAIL_LINES = 25
"""How many of pip's last output lines a failed build reports."""

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RuntimeEnvError(ValueError):
    """A ``runtime_env`` that trioserve cannot honour, or that failed to build."""


# --------------------------------------------------------------------- validation


def validate_runtime_env(runtime_env: Any) -> dict[str, Any]:
    """Check ``runtime_env``; return it normalised.

    ``working_dir`` becomes an absolute path, ``pip`` a list of requirement
    strings, ``env_vars`` a dict of strings. Raises :class:`RuntimeEnvError`.
    """
    if runtime_env is None:
        return {}
    if hasattr(runtime_env, "to_dict") and not isinstance(runtime_env, Mapping):
        runtime_env = runtime_env.to_dict()
    if not isinstance(runtime_env, Mapping):
        raise RuntimeEnvError(f"runtime_env must be a dict, got {runtime_env!r}")
    unknown = sorted(str(k) for k in runtime_env if k not in SUPPORTED_KEYS + IGNORED_KEYS)
    if unknown:
        raise RuntimeEnvError(
            f"Unsupported runtime_env field(s) {', '.join(map(repr, unknown))}; trioserve "
            f"supports {', '.join(SUPPORTED_KEYS)} (and ignores {', '.join(IGNORED_KEYS)})."
        )
    out: dict[str, Any] = {k: v for k, v in runtime_env.items() if k in IGNORED_KEYS}
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        out["env_vars"] = _check_env_vars(env_vars)
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None:
        out["working_dir"] = _check_working_dir(working_dir)
    pip = runtime_env.get("pip")
    if pip is not None:
        packages = _check_pip(pip)
        if packages:
            out["pip"] = packages
    return out


def _check_env_vars(env_vars: Any) -> dict[str, str]:
    if not isinstance(env_vars, Mapping):
        raise RuntimeEnvError(f"runtime_env env_vars must be a dict, got {env_vars!r}")
    for key, value in env_vars.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RuntimeEnvError(
                "runtime_env env_vars must be a dict of str to str, got "
                f"{key!r}: {value!r} ({type(value).__name__}); write the value as a string"
            )
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise RuntimeEnvError(f"runtime_env env_vars: invalid variable name {key!r}")
    return dict(env_vars)


def _check_working_dir(working_dir: Any) -> str:
    if isinstance(working_dir, os.PathLike):
        working_dir = os.fspath(working_dir)
    if not isinstance(working_dir, str) or not working_dir:
        raise RuntimeEnvError(f"runtime_env working_dir must be a path (str), got {working_dir!r}")
    if _URI.match(working_dir):
        raise RuntimeEnvError(
            "trioserve supports only local paths for runtime_env working_dir "
            f"(got {working_dir!r}); download or unpack it on this machine and pass "
            "the folder or .zip file's path instead."
        )
    path = Path(working_dir).expanduser().absolute()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise RuntimeEnvError(
                f"runtime_env working_dir {working_dir!r} is a file but not a .zip archive; "
                "pass a folder or a .zip file"
            )
        return str(path)
    raise RuntimeEnvError(
        f"runtime_env working_dir {working_dir!r} does not exist (resolved to {str(path)!r})"
    )


def _check_pip(pip: Any) -> list[str] | dict[str, list[str]]:
    """The requirements; with ``pip_install_options``, ``{"packages", "pip_install_options"}``
    (kept apart: the options are not requirements, and their order matters)."""
    if isinstance(pip, Mapping):
        unknown = sorted(set(pip) - {"packages", "pip_check", "pip_version", "pip_install_options"})
        if unknown:
            raise RuntimeEnvError(
                f"runtime_env pip: unknown field(s) {', '.join(map(repr, unknown))}"
            )
        packages = pip.get("packages", [])
        options = pip.get("pip_install_options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise RuntimeEnvError("runtime_env pip pip_install_options must be a list of str")
        requirements = _pip_requirements(packages)
        if options and requirements:
            return {"packages": requirements, "pip_install_options": list(options)}
        return requirements
    return _pip_requirements(pip)


def _pip_requirements(pip: Any) -> list[str]:
    if isinstance(pip, (str, os.PathLike)):
        path = Path(pip).expanduser()
        if not path.is_file():
            raise RuntimeEnvError(
                f"runtime_env pip {str(pip)!r}: a string must be the path of a "
                "requirements.txt file, and there is no such file"
            )
        lines = [line.split(" #")[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    if isinstance(pip, (list, tuple)):
        for item in pip:
            if not isinstance(item, str) or not item.strip():
                raise RuntimeEnvError(
                    f"runtime_env pip must be a list of requirement strings, got {item!r}"
                )
        return [item.strip() for item in pip]
    raise RuntimeEnvError(
        f"runtime_env pip must be a list of requirements, a dict with 'packages' or the path "
        f"of a requirements.txt, got {pip!r}"
    )


# --------------------------------------------------------------------- preparing


@dataclasses.dataclass(frozen=True)
class PreparedEnv:
    """What a launcher needs to start a process in a runtime env."""

    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    working_dir: str | None = None
    """The folder to run in and put first on ``sys.path``."""
    python: str | None = None
    """The interpreter of the pip environment, when there is one."""


def cache_dir() -> Path:
    """``<state dir>/cache`` (the state dir of :func:`trioserve.instance.state_home`)."""
    from trioserve.instance import state_home

    return state_home() / "cache"


def prepare(
    runtime_env: Mapping[str, Any] | None,
    *,
    python: str = sys.executable,
    log: IO[str] | None = None,
) -> PreparedEnv:
    """:func:`prepare_async` on an event loop of its own; blocking (for a thread or a script)."""
    return anyio.run(functools.partial(prepare_async, runtime_env, python=python, log=log))


async def prepare_async(
    runtime_env: Mapping[str, Any] | None,
    *,
    python: str = sys.executable,
    log: IO[str] | None = None,
) -> PreparedEnv:
    """Make ``runtime_env`` ready, without blocking the event loop.

    Extracts a zipped working dir and builds the pip environment (their output
    and progress written to ``log``). Cancellable: a cancelled build kills the
    processes it started (their whole process group), leaves nothing in the
    cache, and a builder waiting for another's file lock stops waiting.
    Raises :class:`RuntimeEnvError`.
    """
    checked = validate_runtime_env(runtime_env)
    working_dir = checked.get("working_dir")
    if working_dir is not None and os.path.isfile(working_dir):
        working_dir = str(await _extract_zip(Path(working_dir), log))
    venv_python = None
    if checked.get("pip"):
        packages, options = _pip_parts(checked["pip"])
        venv_python = str(await _pip_env(packages, python, log, options))
    return PreparedEnv(
        env_vars=dict(checked.get("env_vars", {})), working_dir=working_dir, python=venv_python
    )


def _pip_parts(pip: Any) -> tuple[list[str], list[str]]:
    """``(packages, pip_install_options)`` of a validated ``pip`` value."""
    if isinstance(pip, Mapping):
        return list(pip["packages"]), list(pip.get("pip_install_options") or [])
    return list(pip), []


def _say(log: IO[str] | None, message: str) -> None:
    if log is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"INFO {stamp} runtime_env -- {message}\n")
        log.flush()


LOCK_POLL_S = 0.1
"""How often a builder waiting for another's file lock tries to take it again."""


@contextlib.asynccontextmanager
async def _locked(path: Path, log: IO[str] | None = None, what: str = "") -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path`` (between processes and threads alike).

    Waited for without blocking the event loop, and cancellably: a non-blocking
    attempt, repeated every :data:`LOCK_POLL_S` while another holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        waiting = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    _say(log, f"waiting for {what or path.stem}: another process is making it")
                await anyio.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:24]


async def _extract_zip(archive: Path, log: IO[str] | None) -> Path:
    """Extract ``archive`` once into the cache; the working dir inside it."""
    digest = await anyio.to_thread.run_sync(_file_digest, archive)
    root = cache_dir() / "working_dir" / digest
    done = root / ".complete"
    if not done.exists():
        async with _locked(root.parent / f"{digest}.lock", log, f"working_dir {digest}"):
            if not done.exists():
                await anyio.to_thread.run_sync(_unzip, archive, root, log)
    entries = [p for p in root.iterdir() if p.name != ".complete" and p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def _unzip(archive: Path, root: Path, log: IO[str] | None) -> None:
    """Extract ``archive`` into ``root`` (through a temporary folder), then mark it complete."""
    _say(log, f"extracting working_dir {archive} into {root}")
    if root.exists():
        shutil.rmtree(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)  # zipfile drops absolute and ".." parts
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (root / ".complete").write_text(str(archive))


def pip_env_digest(
    requirements: Sequence[str],
    python: str = sys.executable,
    install_options: Sequence[str] = (),
) -> str:
    """The cache key of a pip environment: the requirements (sorted: their order
    does not matter), pip's install options (apart, and in their order: it may
    matter) and the base interpreter."""
    key: dict[str, Any] = {"pip": sorted(requirements), "python": os.path.abspath(python)}
    if install_options:
        key["pip_install_options"] = list(install_options)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]


def parent_site_dirs() -> list[str]:
    """This interpreter's site-packages folders (those a pip environment keeps seeing)."""
    dirs: list[str] = []
    paths = sysconfig.get_paths()
    candidates = [paths.get("purelib"), paths.get("platlib"), *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    for d in candidates:
        if d and os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


_ANSWER = "trioserve-answer: "
"""The prefix of the line that carries a query's answer (whatever else the interpreter prints)."""

_SITE_QUERY = (
    "import json, os, site, sysconfig\n"
    "p = sysconfig.get_paths()\n"
    "c = [p.get('purelib'), p.get('platlib'), *site.getsitepackages()]\n"
    "c += [site.getusersitepackages()] if site.ENABLE_USER_SITE else []\n"
    "out = []\n"
    "[out.append(d) for d in c if d and os.path.isdir(d) and d not in out]\n"
    f"print({_ANSWER!r} + json.dumps(out))\n"
)
_PURELIB_QUERY = f"import sysconfig; print({_ANSWER!r} + sysconfig.get_paths()['purelib'])"


async def run_command(argv: Sequence[str], on_line: Callable[[str], object]) -> int:
    """Run ``argv``, each line of its output (stdout and stderr) to ``on_line``; its exit code.

    It runs in a process group of its own. Cancelled, the whole group is killed
    (pip's own children too) and the process reaped before the cancellation
    goes on.
    """
    process = await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""},
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace"))
        if pending:
            on_line(pending.decode(errors="replace"))
        return await process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def _run(argv: Sequence[str], log: IO[str] | None, tail: collections.deque[str]) -> int:
    """:func:`run_command`, its output line by line to ``log`` and ``tail``."""

    def on_line(line: str) -> None:
        tail.append(line)
        if log is not None:
            log.write(line + "\n")
            log.flush()

    return await run_command(argv, on_line)


async def _ask(python: str, code: str, tail: collections.deque[str]) -> tuple[int, str | None]:
    """Run ``code`` with ``python``: its exit code and answer (other output goes to ``tail``)."""
    lines: list[str] = []
    exit_code = await run_command([python, "-c", code], lines.append)
    answers = [line[len(_ANSWER) :] for line in lines if line.startswith(_ANSWER)]
    tail.extend(line for line in lines if not line.startswith(_ANSWER))
    return exit_code, answers[-1] if answers else None


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


async def _pip_env(
    requirements: Sequence[str],
    python: str,
    log: IO[str] | None,
    install_options: Sequence[str] = (),
) -> Path:
    """The python of the environment with ``requirements``, built if need be."""
    digest = pip_env_digest(requirements, python, install_options)
    described = " ".join([*install_options, *requirements])
    root = cache_dir() / "pip" / digest
    venv = root / "venv"
    done = root / "complete.json"
    if done.exists():
        _say(log, f"reusing pip environment {digest} ({described})")
        return _venv_python(venv)
    async with _locked(cache_dir() / "pip" / f"{digest}.lock", log, f"pip environment {digest}"):
        if done.exists():
            _say(log, f"reusing pip environment {digest} ({described})")
            return _venv_python(venv)
        _say(log, f"building pip environment {digest} in {venv}: {described}")
        started = time.monotonic()
        if root.exists():
            shutil.rmtree(root)  # what a failed or interrupted build left
        root.mkdir(parents=True)
        tail: collections.deque[str] = collections.deque(maxlen=PIP_TAIL_LINES)
        try:
            await _build(venv, requirements, install_options, python, log, tail)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        record = {"pip": list(requirements), "python": python}
        if install_options:
            record["pip_install_options"] = list(install_options)
        done.write_text(json.dumps(record) + "\n")
        _say(log, f"built pip environment {digest} in {time.monotonic() - started:.1f}s")
    return _venv_python(venv)


async def _build(
    venv: Path,
    requirements: Sequence[str],
    install_options: Sequence[str],
    python: str,
    log: IO[str] | None,
    tail: collections.deque[str],
) -> None:
    def fail(what: str, code: int) -> RuntimeEnvError:
        lines = "\n".join(tail)
        return RuntimeEnvError(
            f"runtime_env pip: {what} failed (exit code {code}) for {list(requirements)}:\n{lines}"
        )

    code = await _run([python, "-m", "venv", "--system-site-packages", str(venv)], log, tail)
    if code != 0:
        raise fail("creating the virtual environment", code)
    # A venv made from a venv's python sees the *base* interpreter's packages,
    # not the parent venv's: add the launching interpreter's site-packages
    # (processing their .pth files, so editable installs work), after its own.
    code, parents_json = await _ask(python, _SITE_QUERY, tail)
    own_code, own = await _ask(str(_venv_python(venv)), _PURELIB_QUERY, tail)
    if parents_json is None or own is None:
        raise fail("inspecting the interpreters", code or own_code)
    parents = [d for d in json.loads(parents_json) if d != own]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in parents)
    Path(own, "_trioserve_parent.pth").write_text(lines)
    code = await _run(
        [
            str(_venv_python(venv)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *install_options,
            *requirements,
        ],
        log,
        tail,
    )
    if code != 0:
        raise fail("pip install", code)


def child_pythonpath(
    pythonpath: str | None, prepared: PreparedEnv, user: str | None = None
) -> str | None:
    """The ``PYTHONPATH`` of a replica in ``prepared`` given the launcher's.

    The working dir goes first. With a pip environment, this interpreter's
    site-packages are dropped from it: the environment sees them after its own
    packages (through a ``.pth`` file), so that its requirements take precedence.
    ``user`` is a ``PYTHONPATH`` the user set in ``env_vars``: it goes after the
    working dir.
    """
    entries = [p for p in (pythonpath or "").split(os.pathsep) if p]
    if prepared.python is not None:
        drop = set(parent_site_dirs())
        entries = [p for p in entries if p not in drop]
    head = [prepared.working_dir] if prepared.working_dir else []
    if user:
        head.append(user)
    result = os.pathsep.join([*head, *entries])
    return result
