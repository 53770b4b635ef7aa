"""One readable line per logged event: time, seq, kind, subject, reason.

Used wherever the log is shown to a person (``trioserve log show``, the demo
scenario of ``make run``). Pure: formatting only.
"""

from __future__ import annotations

from trioserve.core import events as ev
from trioserve.core.events import Event

__all__ = ["describe", "format_line"]


def describe(event: Event) -> str:
    """What the event says, in a few words: the reason of a decision, the detail
    of an observation, the gist of an intent."""
    if isinstance(event, ev.AppDeployed):
        parts = []
        for spec in event.deployments:
            config = spec.config
            auto = config.autoscaling_config
            size = (
                f"autoscaling {auto.min_replicas}..{auto.max_replicas}"
                if auto is not None
                else f"{config.num_replicas} replica(s)"
            )
            parts.append(f"{spec.name}@{spec.code_version} {size}")
        return f"route {event.route_prefix!r}: " + ", ".join(parts)
    if isinstance(event, ev.DeploymentScaled):
        return f"to {event.num_replicas} replica(s)"
    if isinstance(event, ev.ControllerStarted):
        return f"instance {event.instance_id}, pid {event.pid}, resources {event.resources}"
    if isinstance(event, ev.ReplicaRunning):
        return f"at {event.address}, pid {event.pid}"
    if isinstance(event, (ev.ReplicaStartFailed, ev.DeploymentFailed)):
        lines = event.error.strip().splitlines()
        return lines[-1] if lines else "no error text"
    if isinstance(event, ev.ReplicaDied):
        return f"{event.reason} (exit code {event.exit_code})"
    if isinstance(event, ev.ReplicaExited):
        return f"exit code {event.exit_code}"
    if isinstance(event, ev.ProxyStarted):
        return f"serving {event.url}, pid {event.pid}, {event.event_loop} loop"
    if isinstance(event, ev.ReplicaAdopted):
        return f"pid {event.pid}, kept running across a controller restart"
    if isinstance(event, ev.ConfigDeployed):
        names = [str(a.get("name", "default")) for a in event.config.get("applications", [])]
        return f"applications {', '.join(names) or '(none)'}"
    if isinstance(event, ev.ProxyExited):
        return f"pid {event.pid}, exit code {event.exit_code}: {event.reason}"
    if isinstance(event, ev.HealthCheckFailed):
        return f"{event.consecutive} in a row: {event.error}"
    if isinstance(event, ev.ReplicaStarting):
        gpus = f", GPUs {list(event.gpu_ids)}" if event.gpu_ids else ""
        return f"{event.reason} (code {event.code_version}{gpus})"
    if isinstance(event, ev.DeploymentPending):
        return event.message or "nothing pending any more"
    if isinstance(event, ev.ReplicaReconfigured):
        return f"config {event.config_version}"
    if isinstance(event, ev.AutoscaleDecision):
        return f"{event.from_replicas} -> {event.to_replicas}: {event.reason}"
    reason = getattr(event, "reason", None)
    return reason if isinstance(reason, str) else ""


def format_line(seq: int, event: Event) -> str:
    """``  12.500s  #37  ReplicaStarting  shop#Ingress#5  rolling update (code v2)``"""
    return f"{event.at:9.3f}s  #{seq:<5d} {event.KIND:<20} {event.subject():<24} {describe(event)}"
