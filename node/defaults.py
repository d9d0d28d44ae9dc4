"""Defaults the ``swarm`` command's help names, importing nothing.

``swarm --help`` builds its parser from these without importing the modules
that use them (the node's config, the gateway, the router): those pull in
libp2p, numpy and the runners, a second of imports for a help text. Each
owner imports its default from here; a test holds ``STRATEGIES`` equal to the
router's ``Strategy``.
"""

from __future__ import annotations

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/7420"  # the node's libp2p address
DEFAULT_HTTP = "127.0.0.1:8470"  # the gateway's port when none is given; busy: a free one
DEFAULT_GRPC = "127.0.0.1:8471"  # the KServe v2 gRPC port when none is given; busy: a free one
# node.jobs.router.Strategy's values, in its order.
STRATEGIES = ("least-loaded", "round-robin", "best-performance", "local-first")
# node.reach.config.Mode's values, in its order.
REACHABILITY = ("auto", "public", "private")
