"""The ``steplog`` command's entry point (``steplog = steplog.cli:main``); the commands live in ``steplog._cli``."""

from __future__ import annotations

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
