"""scripts/bench_nat.py's parts: the daemons in NAT namespaces (``nodes``) and what
is measured of them (``measure``). A package: the name bench_nat is the shell
wrapper's."""
