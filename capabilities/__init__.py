"""What a node can do: hardware probe, models served, capability records."""
