"""The parts of scripts/bench_discovery.py: shared pieces, loopback swarms, mDNS
processes in namespaces, and the report."""
