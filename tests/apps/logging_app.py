"""Deployments the logging tests serve: they log through their own loggers."""

from __future__ import annotations

import logging
import os

from starlette.requests import Request

import trioserve as serve

user_log = logging.getLogger("my_app")


@serve.deployment
class Chatty:
    """Logs an INFO and a WARNING line naming ``tag`` with the user's logger, in a request."""

    async def __call__(self, request: Request) -> dict[str, str]:
        tag = request.query_params.get("tag", "-")
        user_log.info("user info line %s", tag)
        user_log.warning("user warning line %s", tag)
        return {"tag": tag, "pid": str(os.getpid())}


@serve.deployment
class SyncChatty:
    """As :class:`Chatty`, from a sync method (run in a worker thread), through a handle."""

    def __call__(self, tag: str) -> str:
        logging.getLogger("trioserve").info("sync user line %s", tag)
        return tag
