"""What a node tells about itself: the live event ``feed`` (peers, jobs, load) for
WebSocket subscribers and the status page, Prometheus ``metrics``, and ``logs``
(text or JSON lines, tagged with the request id)."""
