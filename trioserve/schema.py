"""What ``serve.status()`` returns: Ray Serve's status objects, read from the controller.

``serve.status().applications["default"].status == "RUNNING"`` works as in Ray
Serve (statuses are string enums). trioserve adds each deployment's
``target_replicas`` and its ``replicas`` (id, state, pid, reason).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from trioserve.core.state import AppStatus as ApplicationStatus
from trioserve.core.state import DeploymentStatus

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "ReplicaStatusOverview",
    "ServeStatus",
]

_TRIGGERS = {
    DeploymentStatus.HEALTHY: "CONFIG_UPDATE_COMPLETED",
    DeploymentStatus.UPDATING: "CONFIG_UPDATE_STARTED",
    DeploymentStatus.UPSCALING: "UPSCALE_COMPLETED",
    DeploymentStatus.DOWNSCALING: "DOWNSCALE_COMPLETED",
    DeploymentStatus.UNHEALTHY: "HEALTH_CHECK_FAILED",
    DeploymentStatus.DEPLOY_FAILED: "REPLICA_STARTUP_FAILED",
}


@dataclasses.dataclass(frozen=True)
class ReplicaStatusOverview:
    """One replica: its id, state (STARTING, RUNNING, DRAINING, STOPPING) and why."""

    replica_id: str
    state: str
    pid: int | None
    since: float
    reason: str


@dataclasses.dataclass(frozen=True)
class DeploymentStatusOverview:
    """A deployment's status, message and replica counts by state."""

    status: DeploymentStatus
    status_trigger: str
    replica_states: dict[str, int]
    message: str = ""
    target_replicas: int = 0
    replicas: tuple[ReplicaStatusOverview, ...] = ()


@dataclasses.dataclass(frozen=True)
class ApplicationStatusOverview:
    """An application's status and message, and its deployments'."""

    status: ApplicationStatus
    message: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatusOverview]
    route_prefix: str | None = None
    ingress: str = ""


@dataclasses.dataclass(frozen=True)
class ServeStatus:
    """The instance's applications and its HTTP proxy.

    ``proxies`` maps ``"local"`` to the proxy's status (``HEALTHY``,
    ``STARTING``, ``UNHEALTHY``) as Ray Serve maps nodes; empty when no proxy
    runs. trioserve adds ``http_url``, where the proxy listens (with the port
    it got when port 0 was asked for), and ``proxy_message``, why it is
    unhealthy.
    """

    proxies: dict[str, str] = dataclasses.field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = dataclasses.field(default_factory=dict)
    target_capacity: float | None = None
    http_url: str = ""
    proxy_message: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeStatus:
        """Read the controller's ``status()`` answer."""
        apps: dict[str, ApplicationStatusOverview] = {}
        for name, app in data.get("applications", {}).items():
            deployments = {}
            for dname, dep in app["deployments"].items():
                status = DeploymentStatus(dep["status"])
                deployments[dname] = DeploymentStatusOverview(
                    status=status,
                    status_trigger=_TRIGGERS[status],
                    replica_states=dict(dep["replica_states"]),
                    message=dep["message"],
                    target_replicas=dep["target_replicas"],
                    replicas=tuple(
                        ReplicaStatusOverview(
                            replica_id=r["id"],
                            state=r["state"],
                            pid=r["pid"],
                            since=r["since"],
                            reason=r["reason"],
                        )
                        for r in dep["replicas"]
                    ),
                )
            apps[name] = ApplicationStatusOverview(
                status=ApplicationStatus(app["status"]),
                message=app["message"],
                last_deployed_time_s=app["deployed_at"],
                deployments=deployments,
                route_prefix=app["route_prefix"],
                ingress=app["ingress"],
            )
        proxy = data.get("proxy")
        if not proxy:
            return cls(applications=apps)
        return cls(
            proxies={"local": proxy["status"]},
            applications=apps,
            http_url=proxy["url"],
            proxy_message=proxy["message"],
        )
