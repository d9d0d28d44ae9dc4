"""The ``swarm`` command. ``parser`` builds its flags with the standard library
alone; ``main`` runs the command given, importing what that command uses, and
turns flags (and config.toml, ``config_file``) into typed configs once; nothing
below reads argv or env. ``local_client`` reaches the daemon of this machine on
its local socket, without libp2p. ``results`` and ``render`` are how answers
and status read on a terminal and as JSON."""
