"""Jobs: everything between a request arriving and its answer leaving.

``inbound`` reads requests off /swarm/infer streams and writes their answers;
``service`` runs a request here or hands it to ``dispatch``, which asks the
pure ``router`` where it should go (scored candidates, ``peer_health``
breakers) and sends it with ``outbound``, failing over by the error's code.
``admission`` is the per-model priority gate in front of local runners, fair
between the peers that send work (``fair_queue``, pure); ``fairness`` says whose
each job is and keeps each peer's limits and counts (the ledger, pure).
``verify`` runs routed jobs again elsewhere (spot checks, ``verify: N``), the
pure ``compare`` says whether two answers agree and ``judge`` who was wrong, and
``reputation`` keeps what was found per peer and holds liars back from plans.
"""
