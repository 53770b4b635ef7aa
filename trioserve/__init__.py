"""trioserve: serve Python classes and functions as scalable HTTP services.

The programming model of Ray Serve without a Ray cluster: code written for Ray
Serve runs with ``import trioserve as serve``. The controller keeps every
decision as an event in an append-only SQLite log that can be replayed.

Start here: :func:`deployment` makes a class a :class:`Deployment`,
``.bind()`` makes it an :class:`Application`, :func:`run` serves it and
returns a :class:`~trioserve.handle.DeploymentHandle`. :func:`open_instance`
does the same inside a trio or asyncio program.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioserve.api import (
        delete,
        get_app_handle,
        get_deployment_handle,
        run,
        shutdown,
        start,
        status,
    )
    from trioserve.core.config import AutoscalingConfig, HTTPOptions
    from trioserve.core.deployment import Application, Deployment, deployment
    from trioserve.exceptions import (
        BackPressureError,
        DeployFailedError,
        DeploymentUnavailableError,
        RayServeException,
        ReplicaDiedError,
        RequestCancelledError,
    )
    from trioserve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
    from trioserve.instance import ServeInstance, open_instance
    from trioserve.replica.asgi import ingress
    from trioserve.replica.batching import batch
    from trioserve.replica.host import ReplicaContext, get_multiplexed_model_id, get_replica_context
    from trioserve.replica.multiplex import multiplexed
    from trioserve.schema import ServeStatus

# Names are imported on first use, so that a replica process, which imports
# ``trioserve.replica``, does not pay for the controller and the event log.
_LAZY = {
    "delete": "trioserve.api",
    "get_app_handle": "trioserve.api",
    "get_deployment_handle": "trioserve.api",
    "run": "trioserve.api",
    "shutdown": "trioserve.api",
    "start": "trioserve.api",
    "status": "trioserve.api",
    "AutoscalingConfig": "trioserve.core.config",
    "HTTPOptions": "trioserve.core.config",
    "Application": "trioserve.core.deployment",
    "Deployment": "trioserve.core.deployment",
    "deployment": "trioserve.core.deployment",
    "BackPressureError": "trioserve.exceptions",
    "DeployFailedError": "trioserve.exceptions",
    "DeploymentUnavailableError": "trioserve.exceptions",
    "RayServeException": "trioserve.exceptions",
    "ReplicaDiedError": "trioserve.exceptions",
    "RequestCancelledError": "trioserve.exceptions",
    "DeploymentHandle": "trioserve.handle",
    "DeploymentResponse": "trioserve.handle",
    "DeploymentResponseGenerator": "trioserve.handle",
    "ServeInstance": "trioserve.instance",
    "open_instance": "trioserve.instance",
    "ingress": "trioserve.replica.asgi",
    "batch": "trioserve.replica.batching",
    "ReplicaContext": "trioserve.replica.host",
    "get_multiplexed_model_id": "trioserve.replica.host",
    "get_replica_context": "trioserve.replica.host",
    "multiplexed": "trioserve.replica.multiplex",
    "ServeStatus": "trioserve.schema",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trioserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "Application",
    "AutoscalingConfig",
    "BackPressureError",
    "DeployFailedError",
    "Deployment",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "DeploymentUnavailableError",
    "HTTPOptions",
    "RayServeException",
    "ReplicaContext",
    "ReplicaDiedError",
    "RequestCancelledError",
    "ServeInstance",
    "ServeStatus",
    "__version__",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "ingress",
    "multiplexed",
    "open_instance",
    "run",
    "shutdown",
    "start",
    "status",
]
