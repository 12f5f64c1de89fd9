"""``python -m steplog`` runs the ``steplog`` command."""

import sys

from .cli import main

sys.exit(main())
