"""Reach: how a node is reached, and reaches peers, across NAT routers.

- ``reachability``: whether this node is publicly reachable, learnt from peers
  that dial it back over a fresh connection (``dialback``, the protocol) or
  from configuration (``config``), a pure reducer; ``monitor`` runs it (asks,
  answers, holds the verdict); which of its addresses others can dial
  (``addresses``: what records and the DHT announce; private ones stay on the
  LAN, for mDNS); ``records``: the record keys reach owns (``reach``,
  ``relay``, ``forwards``: models passed on to peers others cannot dial);
- ``relay_service``: circuit relay v2 (hop) on public nodes, with bounded
  reservations and circuits;
- ``relays``: on NATed nodes, reservations on at least two relays, renewed,
  checked for liveness by us (a frozen relay stays "open" to libp2p), moved
  when a relay goes;
- ``circuits``: dialling a peer through its relays when no direct dial works
  (py-libp2p's swarm drops every /p2p-circuit address), and DCUtR's upgrade of
  a relayed connection to a direct one; each connection's kind (direct,
  hole-punched, relayed) for status and routing;
- ``conns``: what a py-libp2p connection is (live, relayed, inbound), and
  ``ping``: our own liveness check under a deadline.

py-libp2p 0.8.1 ships relay v2, DCUtR and AutoNAT but wires none of them;
what we found wrong with them is in ../shared/design/LIBP2P.md ("Behind NAT").
"""
