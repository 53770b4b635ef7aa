"""The exceptions trioserve raises to its users, with Ray Serve's names where Ray has one."""

from __future__ import annotations

__all__ = [
    "BackPressureError",
    "DeployFailedError",
    "DeploymentUnavailableError",
    "RayServeException",
    "ReplicaDiedError",
    "ReplicaRejected",
    "RequestCancelledError",
    "TrioserveDeprecationWarning",
    "warn_deprecated",
]


class RayServeException(Exception):
    """Base of the errors trioserve raises about the serving system itself.

    Named as in Ray Serve so that ``except RayServeException`` keeps working.
    """


class ReplicaRejected(RayServeException):
    """A replica refused a request: it is at ``max_ongoing_requests`` or draining.

    Callers do not see this error: the router retries the request on another
    replica. It reaches user code only through a direct, unrouted RPC.
    """


class BackPressureError(RayServeException):
    """A caller already holds ``max_queued_requests`` requests waiting for a replica.

    Raised by ``DeploymentHandle.remote()`` (the proxy answers HTTP 503).
    """

    def __init__(self, *, num_queued_requests: int, max_queued_requests: int) -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        super().__init__(
            "Request dropped due to backpressure "
            f"(num_queued_requests={num_queued_requests}, "
            f"max_queued_requests={max_queued_requests})."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_back_pressure, (self.num_queued_requests, self.max_queued_requests))

    @property
    def message(self) -> str:
        return str(self)


def _back_pressure(num_queued: int, max_queued: int) -> BackPressureError:
    return BackPressureError(num_queued_requests=num_queued, max_queued_requests=max_queued)


class RequestCancelledError(RayServeException):
    """The request was cancelled (``response.cancel()``, or its caller was cancelled)."""

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        super().__init__(f"Request {request_id} was cancelled." if request_id else "Cancelled.")


class DeploymentUnavailableError(RayServeException):
    """The deployment cannot take requests: it failed to deploy, or it does not exist."""

    def __init__(self, deployment: str, app: str, reason: str = "it failed to deploy") -> None:
        self.deployment = deployment
        self.app = app
        self.reason = reason
        super().__init__(
            f"Deployment '{deployment}' in application '{app}' is unavailable because {reason}."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (DeploymentUnavailableError, (self.deployment, self.app, self.reason))

    @property
    def message(self) -> str:
        return str(self)


class ReplicaDiedError(RayServeException):
    """The replica handling a request died before it answered.

    The request is not retried, because it may have had effects; the next
    request goes to a live replica. (Ray Serve raises ``ActorDiedError`` here.)
    """


class DeployFailedError(RayServeException, RuntimeError):
    """``serve.run`` gave up: the application is ``DEPLOY_FAILED``.

    The message holds the application's status message with the traceback of
    the failing constructor. A ``RuntimeError``, as in Ray Serve.
    """


class TrioserveDeprecationWarning(FutureWarning):
    """A Ray Serve form that still works but has a current replacement.

    A ``FutureWarning``, so Python shows it to the people running the program;
    each form warns once per process.
    """


_warned: set[str] = set()


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn once per process that ``old`` is deprecated, naming the current form ``new``."""
    import warnings

    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"{old} is deprecated; use {new} instead.",
        TrioserveDeprecationWarning,
        stacklevel=stacklevel,
    )
