"""Membership's config: how often peers prove they are alive, and when they are dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.errors import ConfigError

from .link_policy import LinkPolicy

# The higher id of a pair heartbeats only after this many intervals of silence:
# later than the lower id's beats are due (at most 1.6 intervals apart, given the
# checks' jitter), well before a peer is dropped.
LAGGARD_FACTOR = 1.7


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    heartbeat_s: float = 5.0
    dead_after_s: float = 15.0
    relink_after_s: float = 3.0  # at most one link attempt per peer this often
    max_linking: int = 16  # link attempts at once
    events_buffer: int = 256
    # Which peers are linked, at most links.max_links of them (--max-links).
    links: LinkPolicy = field(default_factory=LinkPolicy)
    known_max: int = 1024  # peers known but not linked, the stalest forgotten first

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s * LAGGARD_FACTOR < self.dead_after_s:
            raise ConfigError(
                f"heartbeat must be positive and {LAGGARD_FACTOR} times it shorter than dead_after"
            )
