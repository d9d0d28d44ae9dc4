"""MCP (Model Context Protocol) tools of a node: list backends and peers, swarm
status, select a peer, route an inference, list tasks.

``tools`` defines them once; ``server`` serves them on the gateway's ``/mcp``
(streamable HTTP); ``bridge`` serves them on stdin/stdout for desktop MCP
clients by forwarding to a running daemon's ``/mcp``.
"""
