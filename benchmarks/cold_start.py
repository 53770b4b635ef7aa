"""Cold start: seconds from launching ``python script.py`` to its first HTTP response.

Run ``python -m benchmarks.cold_start`` (``--quick`` for fewer runs). The
script (written to a temporary folder) is what a user writes::

    import httpx
    import trioserve as serve

    @serve.deployment
    class A:
        def __call__(self) -> str:
            return "ok"

    serve.run(A.bind())
    print(httpx.get(URL).text)

with ``TRIOSERVE_HOME`` a fresh temporary folder (an empty event log, as on a
first run) and ``TRIOSERVE_DEFAULT_HTTP_PORT`` a free port, so the script
knows its URL. The figure is the wall time from ``Popen`` to the line the
script prints after the response (the script then shuts the instance down;
that is not timed). Baselines, from the same run: a script that starts a
bare hypercorn hello-world (asyncio/uvloop, in a thread of the script) and
makes the same ``httpx`` request; and ``python -c "import trioserve"``. Each
figure is the median of several launches, alternating.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.records import Record, markdown

__all__ = ["main", "records"]

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """\
import os

import httpx

import trioserve as serve


@serve.deployment
class A:
    def __call__(self) -> str:
        return "ok"


serve.run(A.bind())
port = os.environ["TRIOSERVE_DEFAULT_HTTP_PORT"]
response = httpx.get(f"http://127.0.0.1:{port}/")
print("RESPONSE", response.status_code, response.text, flush=True)
"""

BARE_SCRIPT = """\
import asyncio
import os
import socket
import threading

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config


async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"ok"})


port = int(os.environ["TRIOSERVE_DEFAULT_HTTP_PORT"])
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(128)
sock.setblocking(False)
config = Config()
config.bind = [f"fd://{sock.fileno()}"]
config.accesslog = None


async def main():
    await serve(app, config, mode="asgi", shutdown_trigger=asyncio.Event().wait)


def run():
    import uvloop

    uvloop.run(main())


threading.Thread(target=run, daemon=True).start()
response = httpx.get(f"http://127.0.0.1:{port}/")
print("RESPONSE", response.status_code, response.text, flush=True)
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: list[str], timeout: float = 60.0) -> tuple[float, float]:
    """Seconds from ``Popen`` to the ``RESPONSE`` line (or to exit without one), and to exit."""
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-cold-") as home:
        env = dict(os.environ)
        env["TRIOSERVE_HOME"] = home
        env["TRIOSERVE_DEFAULT_HTTP_PORT"] = str(_free_port())
        env["PYTHONPATH"] = str(ROOT)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert proc.stdout is not None
        answered = None
        for line in proc.stdout:
            if line.startswith("RESPONSE"):
                answered = time.perf_counter() - t0
                if not line.startswith("RESPONSE 200 ok"):
                    raise RuntimeError(f"unexpected response: {line!r}")
        code = proc.wait(timeout=timeout)
        exited = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"{argv} exited with {code}")
        return (exited if answered is None else answered), exited


def records(quick: bool = False) -> list[Record]:
    runs = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-cold-") as tmp:
        script = Path(tmp) / "script.py"
        script.write_text(SCRIPT)
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE_SCRIPT)
        py = sys.executable
        launch([py, "-c", "import trioserve"])  # warm the page cache
        ours: list[float] = []
        ours_exit: list[float] = []
        bares: list[float] = []
        imports: list[float] = []
        for _ in range(runs):
            first, done = launch([py, str(script)])
            ours.append(first)
            ours_exit.append(done)
            bares.append(launch([py, str(bare)])[0])
            imports.append(launch([py, "-c", "import trioserve"])[0])
            print(
                f"  cold start {first:.2f} s (exit {done:.2f} s), bare {bares[-1]:.2f} s, "
                f"import {imports[-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    ours_s = statistics.median(ours)
    note = f"median of {runs}; the script exits {statistics.median(ours_exit):.2f} s after launch"
    return [
        Record(
            "Cold start",
            "`python script.py` (`serve.run`, then one HTTP request) to the response",
            ours_s,
            "s",
            "same script with a bare hypercorn hello-world",
            statistics.median(bares),
            target="< 1.0 s",
            met=ours_s < 1.0,
            note=note,
            key="cold_start",
        ),
        Record(
            "Cold start",
            '`python -c "import trioserve"`',
            statistics.median(imports),
            "s",
            note=f"median of {runs}",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(markdown(records(args.quick)))


if __name__ == "__main__":
    main()
