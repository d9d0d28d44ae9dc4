"""Membership: who is in the swarm and what each peer can do.

``peers`` keeps the peer table (fed by discovery hints, records and heartbeats,
reduced by the pure ``bootstrap.table``); ``caps`` is the /swarm/caps stream
protocol that swaps signed capability records and heartbeats, and signs ours.
"""
