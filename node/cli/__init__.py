"""The ``swarm`` command. ``main`` parses flags (and config.toml, ``config_file``)
into typed configs once; nothing below reads argv or env. ``render`` is how
answers and status read on a terminal and as JSON."""
