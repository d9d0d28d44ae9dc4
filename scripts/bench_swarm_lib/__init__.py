"""The parts of scripts/bench_swarm.py (a package: the name bench_swarm is the shell
wrapper's)."""
