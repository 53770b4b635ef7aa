"""A stand-in for a replica process in the launcher's tests: ``python -m tests.apps.sleeper``.

It handles its lifeline exactly as a replica does (with the replica's own
``watch_lifeline``: end-of-file on the pipe means SIGTERM to itself), exits
with ``--term-code`` on SIGTERM, prints ``--say`` on stdout and on stderr, and
with ``--heartbeat FILE`` keeps writing a growing counter to ``FILE`` so that a
test can see that it is still running. It prints ``ready`` once its SIGTERM
handler and lifeline watcher are in place.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from types import FrameType

from trioserve.core.launcher import watch_lifeline

SAFETY_LIMIT_S = 600.0
"""Never outlive a test run by much, whatever happens to the test."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.apps.sleeper")
    p.add_argument("--say", default="")
    p.add_argument("--term-code", type=int, default=0)
    p.add_argument("--heartbeat", default=None)
    p.add_argument("--lifeline-fd", type=int, default=None)
    args = p.parse_args(argv)
    pid = os.getpid()

    def on_term(signum: int, frame: FrameType | None) -> None:
        print(f"sleeper {pid}: SIGTERM, exiting with code {args.term_code}", flush=True)
        sys.exit(args.term_code)

    signal.signal(signal.SIGTERM, on_term)
    if args.lifeline_fd is not None:
        threading.Thread(
            target=watch_lifeline, args=(args.lifeline_fd, "replica"), daemon=True
        ).start()
    print(f"sleeper {pid}: {args.say}", flush=True)
    print(f"sleeper {pid}: on stderr: {args.say}", file=sys.stderr, flush=True)
    lifeline = "none" if args.lifeline_fd is None else f"fd {args.lifeline_fd}"
    print(f"sleeper {pid}: lifeline {lifeline}", flush=True)
    print(f"sleeper {pid}: ready", flush=True)
    deadline = time.monotonic() + SAFETY_LIMIT_S
    beat = 0
    while time.monotonic() < deadline:
        if args.heartbeat:
            beat += 1
            tmp = f"{args.heartbeat}.tmp"
            with open(tmp, "w") as f:
                f.write(str(beat))
            os.replace(tmp, args.heartbeat)
        time.sleep(0.05)
    print(f"sleeper {pid}: safety limit reached", flush=True)


if __name__ == "__main__":
    main()
