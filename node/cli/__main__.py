"""``python -m node.cli``: the ``swarm`` command."""

import sys

from node.cli.main import main

sys.exit(main())
