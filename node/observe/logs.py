"""Logging, configured by the node at start (never at import time).

libp2p sets its logger to propagate=False on import and is noisy at INFO
(every dial, every DHT step), so it gets our handler and its own, higher level.
Call this after libp2p is imported (the CLI does, at start).

Every line logged while a job runs carries its request id (``[req=...]``): the
id travels with the job from the node that took it to the peer that ran it, so
grepping one id across the nodes' logs follows the job. ``--log-format json``
writes one JSON object per line for log collectors, with the id as a field.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s:%(job)s %(message)s"
# The id of the job the current task works on (set by the inference service).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _JobFilter(logging.Filter):
    """Adds ``job`` (`` [req=ID]`` or "") and ``request_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.job = f" [req={rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(
    level: str = "INFO", *, libp2p_level: str | None = None, json_lines: bool = False
) -> None:
    """Our level for our loggers; libp2p speaks only when debugging.

    libp2p logs every failed dial at ERROR; in a swarm, peers come and go, and
    the node reports what matters (unreachable peers, refusals) itself.
    """
    if libp2p_level is None:
        libp2p_level = "WARNING" if level.upper() == "DEBUG" else "CRITICAL"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobFilter())
    formatter = JsonFormatter() if json_lines else logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    lib = logging.getLogger("libp2p")
    lib.handlers[:] = [handler]
    lib.propagate = False
    lib.setLevel(libp2p_level.upper())
    # Some libp2p modules pin their own logger to INFO at import (the auto-connector
    # logs every 30 s): make every one of them inherit the level set above.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
    for noisy in ("multiaddr", "zeroconf", "async_service"):
        logging.getLogger(noisy).setLevel(libp2p_level.upper())
