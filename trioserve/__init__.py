"""trioserve: serve Python classes and functions as scalable HTTP services.

The programming model of Ray Serve without a Ray cluster. The controller keeps
every decision as an event in an append-only SQLite log that can be replayed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
