"""How work runs on a node: the runner interface and its implementations."""
