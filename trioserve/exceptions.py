"""The exceptions trioserve raises to its users, with Ray Serve's names where Ray has one."""

from __future__ import annotations

__all__ = ["RayServeException", "ReplicaRejected"]


class RayServeException(Exception):
    """Base of the errors trioserve raises about the serving system itself.

    Named as in Ray Serve so that ``except RayServeException`` keeps working.
    """


class ReplicaRejected(RayServeException):
    """A replica refused a request: it is at ``max_ongoing_requests`` or draining.

    Callers do not see this error: the router retries the request on another
    replica. It reaches user code only through a direct, unrouted RPC.
    """
