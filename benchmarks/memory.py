"""Memory: total RSS of the controller, the proxy and one idle replica.

Run ``python -m benchmarks.memory``. A script (in a temporary folder, with a
fresh ``TRIOSERVE_HOME``) calls ``serve.run`` on a one-replica deployment and
waits; the benchmark sends it one HTTP request, lets it idle for a moment,
and reads from ``/proc`` the memory of the script's process (the driver,
which hosts the embedded controller) and of its descendants, told apart by
their command lines (``-m trioserve.proxy``, ``-m trioserve.replica``).

RSS is ``VmRSS`` of ``/proc/<pid>/status``; PSS (``Pss`` of
``/proc/<pid>/smaps_rollup``) divides the pages the processes share (the
interpreter, shared libraries) among them, so the sum of PSS is the fairer
total. Baselines from the same run: a bare hypercorn hello-world process
(asyncio/uvloop, as the proxy) after one request, and an idle
``python -c "import trioserve"``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.cold_start import _free_port
from benchmarks.records import Record, markdown

__all__ = ["main", "records", "rss_pss"]

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 2.0

SCRIPT = """\
import sys

import trioserve as serve


@serve.deployment
class A:
    def __call__(self) -> str:
        return "ok"


serve.run(A.bind())
print("READY", flush=True)
sys.stdin.read()
"""

BARE_SCRIPT = """\
import asyncio
import os
import socket

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config


async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"ok"})


sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(os.environ["TRIOSERVE_DEFAULT_HTTP_PORT"])))
sock.listen(128)
sock.setblocking(False)
config = Config()
config.bind = [f"fd://{sock.fileno()}"]
config.accesslog = None
print("READY", flush=True)
uvloop.run(serve(app, config, mode="asgi"))
"""

IDLE_SCRIPT = "import sys, trioserve; print('READY', flush=True); sys.stdin.read()"


def rss_pss(pid: int) -> tuple[float, float]:
    """RSS and PSS of ``pid`` in MB (10^6 bytes); PSS is NaN where unreadable."""
    rss = pss = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024 / 1e6
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return rss, pss


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children()
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "controller (driver)"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"trioserve.proxy" in cmdline:
        return "proxy"
    if b"trioserve.replica" in cmdline:
        return "replica"
    return "other: " + b" ".join(cmdline[:3]).decode(errors="replace")


def _measure(script: str, *, request: bool) -> dict[str, tuple[float, float]]:
    """Start ``script``, wait for READY, (request once), settle; memory by role."""
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-mem-") as home:
        env = dict(os.environ)
        env["TRIOSERVE_HOME"] = home
        port = _free_port()
        env["TRIOSERVE_DEFAULT_HTTP_PORT"] = str(port)
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=home,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"the script did not start: {line!r}")
            if request:
                for _ in range(50):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                            r.read()
                        break
                    except OSError:
                        time.sleep(0.1)
            time.sleep(SETTLE_S)
            out: dict[str, tuple[float, float]] = {}
            for pid in _descendants(proc.pid):
                try:
                    rss, pss = rss_pss(pid)
                except OSError:
                    continue
                role = _role(pid, proc.pid)
                old = out.get(role, (0.0, 0.0))
                out[role] = (old[0] + rss, old[1] + pss)
            return out
        finally:
            assert proc.stdin is not None
            proc.stdin.close()  # the trioserve and idle scripts exit; the bare one is ended
            if script == BARE_SCRIPT:
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def records(quick: bool = False) -> list[Record]:
    ours = _measure(SCRIPT, request=True)
    bare = _measure(BARE_SCRIPT, request=True)
    idle = _measure(IDLE_SCRIPT, request=False)
    print(f"  trioserve: {ours}\n  bare: {bare}\n  idle import: {idle}", file=sys.stderr)
    for role in ("controller (driver)", "proxy", "replica"):
        if role not in ours:
            raise RuntimeError(f"no {role} process found: {ours}")
    rss = sum(v[0] for v in ours.values())
    pss = sum(v[1] for v in ours.values())
    bare_rss, bare_pss = bare["controller (driver)"]
    idle_rss, _ = idle["controller (driver)"]
    parts = ", ".join(f"{role} {v[0]:.0f}" for role, v in ours.items())
    return [
        Record(
            "Memory",
            "RSS, controller + proxy + 1 idle replica",
            rss,
            "MB",
            "bare hypercorn hello-world process",
            bare_rss,
            target="< 150 MB",
            met=rss < 150,
            note=f"MB by process: {parts}",
            key="memory_rss",
        ),
        Record(
            "Memory",
            "PSS (shared pages divided), controller + proxy + 1 idle replica",
            pss,
            "MB",
            "bare hypercorn hello-world process",
            bare_pss,
        ),
        Record(
            "Memory",
            "RSS of the replica process",
            ours["replica"][0],
            "MB",
            'idle `python -c "import trioserve"`',
            idle_rss,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(markdown(records(args.quick)))


if __name__ == "__main__":
    main()
