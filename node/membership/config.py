"""Membership's config: how often peers prove they are alive, and when they are dropped."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import ConfigError

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

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s * LAGGARD_FACTOR < self.dead_after_s:
            raise ConfigError(
                f"heartbeat must be positive and {LAGGARD_FACTOR} times it shorter than dead_after"
            )
