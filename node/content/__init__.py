"""Models that travel between peers, addressed by their content.

``shares`` (what this node shares and the manifests of its files), ``blob``
(the /swarm/blob/1.0.0 protocol: server and client), ``pull`` (fetching from
several providers at once, resumable) and ``progress`` (a bar on a terminal,
lines otherwise). The manifest itself and the content id are in
``protocols.content``.
"""
