"""A libp2p network notifee that cares about connections only.

libp2p's INotifee has six hooks; our watchers need two. Subclasses override
``on_connected``/``on_disconnected`` (called on the trio thread).
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import INotifee


class ConnectionNotifee(INotifee):
    def on_connected(self, conn: Any) -> None:
        """A connection opened."""

    def on_disconnected(self, conn: Any) -> None:
        """A connection closed."""

    async def connected(self, network: Any, conn: Any) -> None:
        self.on_connected(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.on_disconnected(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None
