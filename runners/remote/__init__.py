"""Runners that forward work to HTTP inference servers, and the transport they share.

``endpoint`` moves bytes to one backend with limits, retries, a circuit breaker
and API-key multiplexing; ``errors`` says what a failure means to a caller;
``resilience`` holds the pure pieces; the protocol modules (``openai_compat``)
turn swarm requests into a backend's calls.
"""
