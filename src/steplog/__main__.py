"""``python -m steplog`` runs the ``steplog`` command."""

import sys

from ._cli import main

sys.exit(main())
