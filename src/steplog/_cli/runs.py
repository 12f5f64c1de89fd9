"""``steplog runs``: a store's runs, newest first, with a few latest metric values."""

from __future__ import annotations

import argparse
import collections
from typing import Any

from .._heartbeat import status_word
from ..store import StoreError
from . import CommandError
from .common import URI_HELP, duration, fmt_time, fmt_value, natural_key, open_store, print_lines, short_ids, table

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``steplog runs``."""
    p = subparsers.add_parser(
        "runs",
        help="list runs: id, name, experiment, status, start, duration, latest metrics",
        description="List a store's runs, newest first, with a few latest metric values.",
    )
    p.add_argument("--uri", default=None, help=URI_HELP)
    p.add_argument("--experiment", "-e", default=None, help="only this experiment's runs (name or id)")
    p.add_argument(
        "--status", "-s", default=None, type=str.upper, help="only runs with this status: RUNNING, FINISHED, ..."
    )
    p.add_argument(
        "--metric",
        "-m",
        action="append",
        default=None,
        metavar="KEY",
        help="a metric column to show (repeatable; default: the 3 keys most runs have)",
    )
    p.add_argument("--limit", "-n", type=int, default=50, help="show at most this many runs (0: all; default 50)")
    p.set_defaults(func=_runs)


def _runs(args: argparse.Namespace) -> int:
    store = open_store(args.uri)
    try:
        runs = store.runs(args.experiment, status=args.status)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    if not runs:
        where = f"experiment {args.experiment!r} of " if args.experiment else ""
        status = f"{args.status} " if args.status else ""
        print(f"no {status}runs in {where}{store.root}")
        return 0
    total = len(runs)
    if args.limit > 0:
        runs = runs[: args.limit]
    if args.metric:
        keys = list(dict.fromkeys(args.metric))
    else:
        counts = collections.Counter(k for r in runs for k in r.metric_keys)
        # the keys most runs have; among those, the ones people compare runs by (loss, accuracy) first
        keys = [
            k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], not _headline(kv[0]), natural_key(kv[0])))[:3]
        ]
    names = {e.experiment_id: e.name for e in store.experiments(include_deleted=True)}
    short = short_ids([r.run_id for r in runs])
    rows = []
    for run in runs:
        cells = [
            short[run.run_id],
            run.run_name or "-",
            names.get(run.experiment_id, run.experiment_id),
            status_word(run),
            fmt_time(run.start_time),
            duration(run),
        ]
        for key in keys:
            point = run.latest.get(key)
            cells.append("-" if point is None else fmt_value(point.value))
        rows.append(cells)
    headers = ["ID", "NAME", "EXPERIMENT", "STATUS", "START", "DURATION", *keys]
    lines = table(headers, rows, right=[False] * 5 + [True] * (1 + len(keys)))
    if total > len(runs):
        lines.append(f"... and {total - len(runs)} older runs (--limit 0 shows all)")
    print_lines(lines)
    return 0


def _headline(key: str) -> bool:
    """True for a metric people usually compare runs by (a loss, an accuracy, a score)."""
    name = key.rsplit("/", 1)[-1].lower()
    return any(word in name for word in ("loss", "acc", "score", "reward", "f1", "auc", "perplexity"))
