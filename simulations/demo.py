"""A guided scenario: the controller at work in the simulated world.

``python -m simulations.demo`` deploys an application, crashes a replica,
rolls out a new version, ships a broken version, autoscales another
application from zero and back, deletes it, restarts the controller - then
replays the event log from its file and prints every event, one line each,
and verifies the log.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from simulations.world import BAD_VERSION, World, sim_config
from trioserve.core.journal import verify
from trioserve.core.logview import format_line
from trioserve.core.state import app_status, replay
from trioserve.store import EventLog


def run(log_path: Path, seed: int = 7) -> World:
    world = World(seed, log_path)
    world.deploy("shop", [("Ingress", "v1", sim_config(3)), ("Model", "m1", sim_config(2))])
    world.advance(6)
    world.crash(0)
    world.advance(6)
    world.deploy("shop", [("Ingress", "v2", sim_config(3)), ("Model", "m1", sim_config(2))])
    world.advance(15)
    world.deploy("shop", [("Ingress", BAD_VERSION, sim_config(3)), ("Model", "m1", sim_config(2))])
    world.advance(40)
    world.deploy("chat", [("Bot", "v1", sim_config(autoscaling=True, min_replicas=0))])
    world.set_load("chat", "Bot", 12)
    world.advance(20)
    world.set_load("chat", "Bot", 0)
    world.advance(40)
    world.restart_controller()
    world.delete("chat")
    world.advance(10)
    world.check_safety()
    return world


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trioserve-demo-") as tmp:
        path = Path(tmp) / "events.db"
        world = run(path)
        statuses = {name: app_status(app) for name, app in world.state.apps.items()}
        world.close()
        with EventLog.open(path, create=False) as log:
            events = list(log.read())
            print(f"# the event log, replayed from its file ({len(events)} events)\n")
            for stored in events:
                print(format_line(stored.seq, stored.event))
            state = replay(s.event for s in events)
            report = verify(log)
        print("\n# the state it replays to")
        for name, app in state.apps.items():
            status, message = statuses[name]
            print(
                f"application {name}: {status.value}  {message.splitlines()[0] if message else ''}"
            )
            for dep in app.deployments.values():
                running = sorted(r.id for r in dep.replicas.values())
                print(f"  {dep.name}: target {dep.target_replicas}, replicas {running}")
        print(
            f"\n# verify: {'ok' if report.ok else 'FAILED'} - {report.events} events, "
            f"{report.decisions} decisions re-derived, {report.snapshots} snapshot(s) checked"
        )
        return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
