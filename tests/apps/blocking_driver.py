"""A script that serves with ``serve.run(..., blocking=True)`` until Ctrl-C, then says so."""

import trioserve as serve
from tests.apps import concepts

serve.run(concepts.Worker.bind(), name="blocking", blocking=True)
print("stopped", flush=True)
