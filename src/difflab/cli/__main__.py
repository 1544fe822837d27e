"""``python -m difflab.cli ...`` (as torchrun ``-m difflab.cli`` runs it): the ``difflab``
command."""

import sys

from . import main

sys.exit(main())
