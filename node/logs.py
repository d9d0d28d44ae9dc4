"""Logging, configured by the node at start (never at import time).

libp2p sets its logger to propagate=False on import and is noisy at INFO
(every dial, every DHT step), so it gets our handler and its own, higher level.
Call this after libp2p is imported (the CLI does, at start).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str = "INFO", *, libp2p_level: str | None = None) -> None:
    """Our level for our loggers; libp2p speaks only when debugging.

    libp2p logs every failed dial at ERROR; in a swarm, peers come and go, and
    the node reports what matters (unreachable peers, refusals) itself.
    """
    if libp2p_level is None:
        libp2p_level = "WARNING" if level.upper() == "DEBUG" else "CRITICAL"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
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
