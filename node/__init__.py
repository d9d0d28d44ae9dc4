"""The swarm daemon: host, stream handlers, admission, CLI and client."""
