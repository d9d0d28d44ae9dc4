"""The parts of scripts/bench_gateway.py (a package: the name bench_gateway is the shell
wrapper's)."""
