"""Address text shared by the adapters: events carry transport addresses, without /p2p."""

from __future__ import annotations

from collections.abc import Iterable


def without_p2p(peer_id: str, addrs: Iterable[object]) -> tuple[str, ...]:
    """``addrs`` as strings, each without a trailing ``/p2p/<peer_id>``, deduplicated.

    Only the peer's own trailing id is cut, so a relayed address keeps its relay.
    """
    suffix = f"/p2p/{peer_id}"
    out: list[str] = []
    for addr in addrs:
        text = str(addr)
        text = text[: -len(suffix)] if text.endswith(suffix) else text
        if text and text not in out:
            out.append(text)
    return tuple(out)
