"""HTTP ingress on hypercorn.

:mod:`trioserve.proxy.app` is the ASGI app that routes requests to ingress
replicas; :mod:`trioserve.proxy.process` is the process the controller runs
it in.
"""
