"""``python -m difflab ...``: the ``difflab`` command (``difflab.cli.main``)."""

import sys

from .cli import main

sys.exit(main())
