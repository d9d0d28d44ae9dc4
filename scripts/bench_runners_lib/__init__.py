"""The sections of scripts/bench_runners.py (a package: the name bench_runners is the
shell wrapper's)."""
