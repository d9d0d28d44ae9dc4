"""The parts of scripts/bench_fairness.py (a package: the name bench_fairness is the shell
wrapper's), shared with tests/test_fair_share.py: the flood of one peer and the trickle
of another, measured against any node's address."""
