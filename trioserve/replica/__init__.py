"""The replica process: hosts one user object and serves calls to it.

* :mod:`trioserve.replica.host` - :class:`ReplicaHost`, the user object and the
  RPC methods that reach it (calls, health, reconfigure, drain, stats).
* :mod:`trioserve.replica.process` - the process itself, ``python -m trioserve.replica``.
"""

from trioserve.replica.host import ReplicaContext, ReplicaHost, get_replica_context

__all__ = ["ReplicaContext", "ReplicaHost", "get_replica_context"]
