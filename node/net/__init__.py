"""Transport, as the node uses it: the libp2p host built the one way that holds in
py-libp2p 0.8.1 (``host``), length-prefixed msgpack frames over a libp2p stream
(``framed``), and who may use this node (``access``: allow-list, swarm key)."""
