"""What the simulated nodes sent, per phase and kind, and per node for the hot spots.

Every message is counted once as sent by one node and received by another, in
wire bytes (``sizes.wire``: payload plus framing). Per-node rates divide by the
node-seconds the phase held (live nodes integrated over its time), so joins and
leaves under churn are weighed by how long each node was there.
"""

from __future__ import annotations

from collections import defaultdict

from .model import SimConfig

PHASES = ("warmup", "rest", "churn")
KINDS = ("heartbeat", "full", "sample", "dial", "close", "dht", "roster")


class Traffic:
    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self.messages: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        # Per phase: node -> bytes sent + received (for the busiest nodes).
        self.per_node: dict[str, dict[int, int]] = {p: defaultdict(int) for p in PHASES}
        self.node_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._live = 0
        self._since = 0.0
        self.refused = 0  # link requests a full node turned down

    def count(self, now: float, a: int, b: int, kind: str, nbytes: int, messages: int = 1) -> None:
        phase = self._config.phase(now)
        key = (phase, kind)
        self.messages[key] += messages
        self.bytes[key] += nbytes
        per = self.per_node[phase]
        per[a] += nbytes
        per[b] += nbytes

    def live(self, now: float, count: int) -> None:
        """The number of live nodes changed to ``count`` at ``now``."""
        self._advance(now)
        self._live = count

    def _advance(self, now: float) -> None:
        config = self._config
        edges = (config.warmup_s, config.warmup_s + config.rest_s, config.end_s)
        t = self._since
        for phase, edge in zip(PHASES, edges, strict=True):
            if t < edge and now > t:
                upto = min(now, edge)
                self.node_seconds[phase] += self._live * (upto - t)
                t = upto
        self._since = max(self._since, now)

    def close(self, now: float) -> None:
        self._advance(now)

    def rates(self, phase: str) -> dict[str, float]:
        """Messages and bytes sent per node per second in ``phase``, in all and by kind."""
        seconds = self.node_seconds[phase] or 1.0
        out: dict[str, float] = {
            "messages_per_node_s": sum(self.messages[(phase, k)] for k in KINDS) / seconds,
            "bytes_per_node_s": sum(self.bytes[(phase, k)] for k in KINDS) / seconds,
        }
        for k in KINDS:
            out[f"bytes_per_node_s_{k}"] = self.bytes[(phase, k)] / seconds
        return out

    def busiest(self, phase: str, seconds: float) -> float:
        """The busiest node's bytes sent and received per second in ``phase``."""
        per = self.per_node[phase]
        return max(per.values(), default=0) / (seconds or 1.0)
