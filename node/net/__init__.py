"""Transport, as the node uses it: the libp2p host built the one way that holds in
py-libp2p 0.8.1 (``host``), length-prefixed msgpack frames over any byte stream
(``frames``) and over a libp2p stream (``framed``), the daemon's local socket for
the CLI of its own machine (``local``), and who may use this node (``access``:
allow-list, swarm key)."""
