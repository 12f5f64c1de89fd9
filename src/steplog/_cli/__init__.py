"""The ``steplog`` command: one module per subcommand in this package.

``runs``, ``show``, ``plot`` and ``tail`` read a store (``common`` opens a local one
or a tracking server); ``sync_command`` uploads a store to a server; ``fsck`` checks
and repairs a store. ``demo`` and ``bench`` live beside the package (``steplog._demo``,
``steplog._bench``). Each subcommand module which provides ``register(subparsers)``
(adding its parser, with ``func`` set to a callable taking the parsed args and
returning an exit status). User mistakes (a wrong run id, a missing store, a
missing extra) are one-line errors with what to do and a non-zero status, never
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._errors import StepLogError
from .._version import __version__

__all__ = ["CommandError", "build_parser", "main"]

# One line per subcommand module; each module registers its own parser(s).
_COMMAND_MODULES = (
    "steplog._demo",
    "steplog._cli.sync_command",
    "steplog._cli.runs",
    "steplog._cli.show",
    "steplog._cli.plot",
    "steplog._cli.tail",
    "steplog._bench",
    "steplog._cli.fsck",
)


class CommandError(StepLogError):
    """A user-facing command failure: printed as one line, exit status 1 (or ``status``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steplog",
        description="steplog: an asynchronous, buffered experiment logger writing MLflow's file store.",
    )
    parser.add_argument("--version", action="version", version=f"steplog {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``steplog`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = func(args)
    except KeyboardInterrupt:
        print("steplog: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except StepLogError as exc:
        print(f"steplog {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "status", 1)
    finally:
        common = sys.modules.get("steplog._cli.common")
        if common is not None:
            common.close_stores()
    return int(status or 0)
