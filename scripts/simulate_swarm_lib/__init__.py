"""The swarm simulator's parts (``scripts/simulate_swarm.py`` runs them)."""
