"""Test helper process: append batches to an event log, printing each committed seq.

Usage: ``python _writer.py DB BATCH_SIZE [durable|fast] [MAX_EVENTS]``

After each committed batch it prints the batch's last seq on its own line and
flushes, so the parent knows exactly what was committed. It stops after
MAX_EVENTS events (default 1,000,000), when its stdout is closed, or after a
minute: the parent normally kills it first.
"""

from __future__ import annotations

import sys
import time

from trioserve.core.events import ReplicaDrained
from trioserve.store import EventLog

SAFETY_LIMIT_S = 60.0


def main() -> None:
    path, batch_size = sys.argv[1], int(sys.argv[2])
    durable = (sys.argv[3] if len(sys.argv) > 3 else "durable") == "durable"
    max_events = int(sys.argv[4]) if len(sys.argv) > 4 else 1_000_000
    deadline = time.monotonic() + SAFETY_LIMIT_S
    with EventLog.open(path) as log:
        written = 0
        while written < max_events and time.monotonic() < deadline:
            batch = [
                ReplicaDrained(at=float(written + i), replica=f"r{written + i}")
                for i in range(batch_size)
            ]
            stored = log.append(batch, durable=durable)
            written += batch_size
            try:
                print(stored[-1].seq, flush=True)
            except BrokenPipeError:
                return


if __name__ == "__main__":
    main()
