"""Reach's config and vocabulary: how this node decides whether it is publicly
reachable, and the words records and status use for the answer.

``--reachability auto`` (the default) learns it from peers that dial this node
back over a fresh connection (``node.reach.dialback``, rules in
``node.reach.reachability``); ``public`` and ``private`` say it outright.
``--public-addr`` names addresses that reach this node from anywhere (a port
forwarded on the router, a VPS's address): they are announced as they are and
count as configuration (public), so they cannot go with ``private``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from protocols.errors import ConfigError


class Mode(enum.StrEnum):
    AUTO = "auto"
    PUBLIC = "public"
    PRIVATE = "private"


class Reach(enum.StrEnum):
    """A verdict, as capability records (``reach``) and status carry it."""

    PUBLIC = "public"  # peers dial us directly
    PRIVATE = "private"  # they cannot: behind a NAT or a firewall
    UNKNOWN = "unknown"  # not known yet (no peer has dialled us back)


MAX_PUBLIC_ADDRS = 8


@dataclass(frozen=True, slots=True)
class ReachConfig:
    mode: Mode = Mode.AUTO
    public_addrs: tuple[str, ...] = ()  # multiaddrs without /p2p, announced as given
    # A dial-back answer counts for this long; the verdict is re-checked every
    # recheck_s (one peer asked) and at once when this node's addresses change.
    answer_valid_s: float = 900.0
    recheck_s: float = 300.0
    reask_after_s: float = 30.0  # the same peer is asked at most this often
    max_asking: int = 2  # dial-back requests of ours in flight at once
    ask_timeout_s: float = 12.0  # one request, its dials included

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ConfigError(
                f"reachability must be one of {', '.join(m.value for m in Mode)}"
            ) from None
        if self.public_addrs and self.mode is Mode.PRIVATE:
            raise ConfigError("--public-addr and --reachability private exclude each other")
        if len(self.public_addrs) > MAX_PUBLIC_ADDRS:
            raise ConfigError(f"at most {MAX_PUBLIC_ADDRS} public addresses")
        for addr in self.public_addrs:
            if not (addr.startswith("/") and "/p2p-circuit" not in addr):
                raise ConfigError(f"public address {addr!r}: give a multiaddr like /ip4/.../tcp/N")
        for name in ("answer_valid_s", "recheck_s", "reask_after_s", "ask_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"reach {name} must be a positive number")
        if self.max_asking < 1:
            raise ConfigError("reach max_asking must be at least 1")

    @property
    def configured(self) -> Reach | None:
        """The verdict configuration gives (None: learn it from dial-backs)."""
        if self.mode is Mode.PUBLIC or (self.mode is Mode.AUTO and self.public_addrs):
            return Reach.PUBLIC
        if self.mode is Mode.PRIVATE:
            return Reach.PRIVATE
        return None
