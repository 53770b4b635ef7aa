"""The ``trioserve log`` commands on the event log of a real instance."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import trioserve
from tests.apps import concepts
from trioserve import cli
from trioserve.core import events as ev
from trioserve.store import EventLog, StoredEvent

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    """A finished instance's state dir and what its log holds."""

    home: Path
    run_dir: Path
    events: list[StoredEvent]

    @property
    def db(self) -> Path:
        return self.run_dir / "events.db"

    def seq_of(self, kind: str) -> int:
        return next(s.seq for s in self.events if s.kind == kind)


async def _deploy_and_delete(home: Path) -> Path:
    async with trioserve.open_instance(home=home, proxy_location="Disabled") as serve:
        handle = await serve.run(
            concepts.Ingress.bind(concepts.Hello.bind(), concepts.World.bind())
        )
        assert await handle.remote() == "Hello world!"
        await serve.delete("default")
        return serve.run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real instance, run once for the module: deploy a 3-deployment app, delete it."""
    home = tmp_path_factory.mktemp("cli") / "home"
    run_dir = trio.run(_deploy_and_delete, home)
    with EventLog.open(run_dir / "events.db", create=False) as log:
        events = list(log.read())
    return Run(home, run_dir, events)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def local_iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at).isoformat(timespec="milliseconds")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- show


def test_show_prints_every_event_with_its_reason(run: Run, capsys: pytest.CaptureFixture[str]):
    before = digest(run.db)
    assert cli.main(["log", "show", "--log", str(run.db)]) == 0
    out = lines_of(capsys.readouterr().out)
    assert len(out) == len(run.events)
    for line, stored in zip(out, run.events, strict=True):
        assert line.startswith(f"{local_iso(stored.at)}  #{stored.seq} ")
        assert f" {stored.kind} " in line
    deployed = out[run.seq_of("AppDeployed") - 1]
    assert "AppDeployed" in deployed and "default" in deployed
    assert "route '/'" in deployed and "Hello@" in deployed and "Ingress@" in deployed
    starting = [line for line in out if " ReplicaStarting " in line]
    assert len(starting) == 3
    assert all("scale up (code " in line for line in starting)
    assert any("default#Hello#" in line for line in starting)
    draining = [line for line in out if " ReplicaDraining " in line]
    assert draining and all(line.endswith("scale down") for line in draining)
    assert digest(run.db) == before, "reading the log changed it"


def test_show_takes_a_run_folder_or_the_latest_run(
    run: Run, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    assert cli.main(["log", "show", "--log", str(run.db)]) == 0
    by_file = capsys.readouterr().out
    assert cli.main(["log", "show", "--log", str(run.run_dir)]) == 0
    assert capsys.readouterr().out == by_file
    monkeypatch.setenv("TRIOSERVE_HOME", str(run.home))
    assert cli.main(["log", "show"]) == 0
    assert capsys.readouterr().out == by_file


def show(run: Run, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert cli.main(["log", "show", "--log", str(run.db), *args]) == 0
    return lines_of(capsys.readouterr().out)


def test_show_filters_narrow_and_combine(run: Run, capsys: pytest.CaptureFixture[str]):
    everything = show(run, capsys)

    kinds = show(run, capsys, "--kind", "ReplicaStarting", "replicarunning")
    assert len(kinds) == 6
    assert all(" ReplicaStarting " in x or " ReplicaRunning " in x for x in kinds)

    hello = show(run, capsys, "--deployment", "Hello")
    assert 0 < len(hello) < len(everything)
    assert all("default#Hello#" in x or "default/Hello" in x for x in hello)
    # Its replica's whole life, and the deployment's own event.
    for kind in ("ReplicaStarting", "ReplicaRunning", "ReplicaDraining", "ReplicaExited"):
        assert any(f" {kind} " in x for x in hello), kind
    assert any(" DeploymentRemoved " in x for x in hello)

    replica_id = next(
        s.event.replica
        for s in run.events
        if isinstance(s.event, ev.ReplicaStarting) and s.event.deployment == "World"
    )
    by_id = show(run, capsys, "--replica", replica_id)
    assert by_id and all(replica_id in x for x in by_id)
    assert show(run, capsys, "--replica", replica_id.rsplit("#", 1)[1]) == by_id

    app = show(run, capsys, "--app", "default")
    assert not any(" ControllerStarted " in x for x in app)
    assert len(app) == len(everything) - 1
    assert cli.main(["log", "show", "--log", str(run.db), "--app", "other"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no event matches" in captured.err

    both = show(run, capsys, "--kind", "ReplicaDraining", "--deployment", "World")
    assert len(both) == 1 and " ReplicaDraining " in both[0] and "#World#" in both[0]

    deleted = run.seq_of("AppDeleted")
    since_seq = show(run, capsys, "--since", str(deleted))
    assert since_seq == everything[deleted - 1 :]
    # A time: the events recorded at or after it (to the millisecond, rounded down).
    iso = local_iso(run.events[deleted - 1].at - 0.001)
    threshold = cli.parse_point(iso).at
    assert threshold is not None
    since_time = show(run, capsys, "--since", iso)
    assert everything[deleted - 1] in since_time
    assert since_time == [
        x for x, s in zip(everything, run.events, strict=True) if s.at >= threshold
    ]


def test_show_refuses_unknown_kinds_and_times(run: Run, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["log", "show", "--log", str(run.db), "--kind", "ReplicaStarted"]) == 2
    assert "unknown event kind 'ReplicaStarted'" in capsys.readouterr().err
    assert cli.main(["log", "show", "--log", str(run.db), "--since", "last tuesday"]) == 2
    assert "neither a seq number nor an ISO-8601 time" in capsys.readouterr().err


# -------------------------------------------------------------------------- replay


def test_replay_shows_the_state_at_a_seq_and_at_the_end(
    run: Run, capsys: pytest.CaptureFixture[str]
):
    before_delete = run.seq_of("AppDeleted") - 1
    assert cli.main(["log", "replay", "--log", str(run.db), "--at", str(before_delete)]) == 0
    text = capsys.readouterr().out
    assert f"after seq {before_delete} of {len(run.events)}" in text
    assert "application default: RUNNING, route prefix /, ingress Ingress" in text
    for name in ("Hello", "World", "Ingress"):
        assert f"deployment {name}: HEALTHY, target 1 replica(s)" in text
    replicas = [x.strip() for x in text.splitlines() if x.strip().startswith("replica ")]
    assert len(replicas) == 3
    assert all(": RUNNING, pid " in x and "(ready)" in x for x in replicas)

    args = ["log", "replay", "--log", str(run.db), "--at", str(before_delete), "--format", "json"]
    assert cli.main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["seq"] == before_delete and doc["last_seq"] == len(run.events)
    app = doc["applications"]["default"]
    assert app["status"] == "RUNNING" and app["route_prefix"] == "/"
    hello = app["deployments"]["Hello"]
    assert hello["status"] == "HEALTHY" and hello["target_replicas"] == 1
    (replica,) = hello["replicas"]
    assert replica["state"] == "RUNNING" and isinstance(replica["pid"], int)

    # By time: after the last event recorded at or before it (events in seq order).
    at = dt.datetime.fromtimestamp(run.events[before_delete - 1].at + 0.0005).isoformat()
    threshold = cli.parse_point(at).at
    assert threshold is not None
    expected = 0
    for stored in run.events:
        if stored.at > threshold:
            break
        expected = stored.seq
    assert expected >= before_delete
    assert cli.main([*args[:5], at, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == expected

    # Without --at: the end, where the application is gone.
    assert cli.main(["log", "replay", "--log", str(run.db)]) == 0
    text = capsys.readouterr().out
    assert f"after seq {len(run.events)} of {len(run.events)}" in text
    assert "no applications" in text and "default" not in text
    assert cli.main(["log", "replay", "--log", str(run.db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["applications"] == {}

    assert cli.main(["log", "replay", "--log", str(run.db), "--at", "0"]) == 0
    assert "before the first event" in capsys.readouterr().out
    beyond = str(len(run.events) + 1)
    assert cli.main(["log", "replay", "--log", str(run.db), "--at", beyond]) == 2
    assert f"there is no event seq {beyond}" in capsys.readouterr().err


# -------------------------------------------------------------------------- verify


def test_verify_passes_a_sound_log_and_names_the_seq_of_a_flipped_byte(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert cli.main(["log", "verify", "--log", str(run.db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {len(run.events)} events checked, 0 snapshot(s), ")
    assert "decisions re-derived" in out
    assert len(lines_of(out)) == 1

    copy = tmp_path / "events.db"
    with sqlite3.connect(run.db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    source.close()
    target.close()
    bad = run.seq_of("ReplicaStarting")
    db = sqlite3.connect(copy)
    try:
        (payload,) = db.execute("SELECT payload FROM events WHERE seq = ?", (bad,)).fetchone()
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0x01
        db.execute("UPDATE events SET payload = ? WHERE seq = ?", (bytes(flipped), bad))
        db.commit()
    finally:
        db.close()
    assert cli.main(["log", "verify", "--log", str(copy)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED at seq {bad}: ")
    assert "altered" in out


# -------------------------------------------------------------------------- export


def test_export_writes_one_json_object_per_event(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    target = tmp_path / "events.jsonl"
    args = ["log", "export", "--format", "jsonl", "--log", str(run.db)]
    assert cli.main([*args, "-o", str(target)]) == 0
    assert f"exported {len(run.events)} events" in capsys.readouterr().err
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(run.events) + 1))
    for record, stored in zip(records, run.events, strict=True):
        assert record["kind"] == stored.kind
        assert record["at"] == stored.at
        assert record["version"] == stored.event.VERSION
        assert record["family"] in ("intent", "observation", "decision")
    deployed = records[run.seq_of("AppDeployed") - 1]
    assert deployed["family"] == "intent" and deployed["app"] == "default"
    assert [d["name"] for d in deployed["deployments"]] == ["Hello", "World", "Ingress"]
    starting = records[run.seq_of("ReplicaStarting") - 1]
    assert starting["reason"] == "scale up" and starting["gpu_ids"] == []

    assert cli.main(args) == 0
    assert capsys.readouterr().out == target.read_text()

    assert cli.main([*args, "-o", str(run.db)]) == 2
    assert "refusing" in capsys.readouterr().err


# ----------------------------------------------------------------- errors and help


def test_a_missing_log_or_a_foreign_file_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    missing = tmp_path / "nowhere" / "events.db"
    for command in ("show", "replay", "verify", "export"):
        assert cli.main(["log", command, "--log", str(missing)]) == 2
        err = capsys.readouterr().err
        assert f"there is no event log at {missing}" in err
        assert "--log" in err
    assert not missing.parent.exists(), "a missing log must not be created"

    home = tmp_path / "empty-home"
    monkeypatch.setenv("TRIOSERVE_HOME", str(home))
    assert cli.main(["log", "show"]) == 2
    err = capsys.readouterr().err
    assert f"there is no event log at {home / 'latest' / 'events.db'}" in err
    assert "TRIOSERVE_HOME" in err and "--log" in err
    assert not home.exists()

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    assert cli.main(["log", "verify", "--log", str(text)]) == 2
    assert "is not a trioserve event log" in capsys.readouterr().err
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    before = digest(other)
    assert cli.main(["log", "show", "--log", str(other)]) == 2
    assert "is not a trioserve event log" in capsys.readouterr().err
    assert digest(other) == before


def test_help(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["--help"]) == 0
    assert "log" in capsys.readouterr().out
    assert cli.main(["log", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("show", "replay", "verify", "export"):
        assert command in out
    assert cli.main(["log", "show", "--help"]) == 0
    assert "--deployment" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "usage: trioserve" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "start", "deploy", "status", "config", "delete", "shutdown", "build"):
        assert command in out
    assert cli.main(["frobnicate"]) == 2
    capsys.readouterr()


# ---------------------------------------------------------- a log that is being written


async def test_reading_the_log_of_a_running_instance_disturbs_nothing(
    serve_home: Path, capsys: pytest.CaptureFixture[str]
):
    async with trioserve.open_instance(proxy_location="Disabled") as serve:
        handle = await serve.run(concepts.Greeter.bind("hi"), name="g")
        args = ["--log", str(serve.run_dir)]
        assert await trio.to_thread.run_sync(cli.main, ["log", "verify", *args]) == 0
        assert await trio.to_thread.run_sync(cli.main, ["log", "replay"]) == 0
        assert "application g: RUNNING" in capsys.readouterr().out
        # The instance goes on recording.
        assert await handle.remote() == "hi"
        await serve.delete("g")
        assert await trio.to_thread.run_sync(cli.main, ["log", "show", *args]) == 0
        out = capsys.readouterr().out
        assert " AppDeleted " in out and " ReplicaDraining " in out


# ---------------------------------------------------------------------- entry point


def test_the_command_runs_as_a_program(run: Run):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "trioserve.cli", "log", "show", "--log", str(run.db)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(lines_of(done.stdout)) == len(run.events)
    assert " AppDeployed " in done.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "trioserve.cli", "log", "verify", "--log", str(run.home / "x")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "there is no event log" in missing.stderr

    script = Path(sys.executable).with_name("trioserve")
    if script.exists():  # the console script of an installed trioserve
        done = subprocess.run(
            [str(script), "log", "verify", "--log", str(run.db)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("OK: ")
