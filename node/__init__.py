"""The swarm daemon: it composes the layers below into one running node.

Sub-packages, by concern (imports go from the top of this list down, never up):

- ``cli``         the ``swarm`` command: flags and config.toml into typed configs,
                  the commands, and how their answers print
- ``daemon``      one node's lifetime; ``wiring`` builds the running services as
                  one frozen record, ``status`` reads views off it, ``models`` is
                  the registry of runners this node serves
- ``gateway``     HTTP front ends (OpenAI, KServe v2, WebSocket, status page), one
                  module per API family; ``mcp`` the MCP tools
- ``jobs``        where a job goes and how it gets there: admission, routing,
                  dispatch with failover, the inbound and outbound stream sides
- ``membership``  who is in the swarm: the peer table fed by discovery, records and
                  heartbeats, and the caps protocol that carries them
- ``reach``       across NAT routers: reachability by dial-back, the addresses
                  announced, relay v2 (service and reservations), circuits, DCUtR
- ``observe``     what the node tells about itself: live feed, metrics, logs
- ``net``         the libp2p host, framed streams, and who may use this node

``client`` is the public Python client; ``errors`` the node layer's errors;
``json_values`` the one JSON form of swarm values for its own JSON clients.
"""
