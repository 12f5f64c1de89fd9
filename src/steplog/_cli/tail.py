"""``steplog tail RUN [--follow]``: the latest value of each metric of a run, live on a terminal (rich)."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from typing import Any, TextIO

from .._heartbeat import is_dead, status_word
from .._records import MetricPoint, RunStatus
from ..store import StoreError
from . import CommandError
from .common import (
    LATEST,
    URI_HELP,
    AnyRun,
    duration,
    fmt_time,
    fmt_value,
    get_run,
    natural_key,
    open_store,
    print_lines,
    table,
)

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``steplog tail``."""
    p = subparsers.add_parser(
        "tail",
        help="the latest value of each metric of a run, live with --follow",
        description="Show the latest value, step and point count of each metric of a run. With --follow, "
        "keep showing them as the run writes, until it ends or Ctrl-C: a live table on a terminal "
        "(rich, the tail extra), one plain line per new value when the output is a pipe or file.",
    )
    p.add_argument("run", metavar="RUN", help="run id, a unique prefix of one, or latest (the newest run)")
    p.add_argument("--follow", "-f", action="store_true", help="keep going until the run ends (or Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between two looks (default 1)")
    style = p.add_mutually_exclusive_group()
    style.add_argument("--plain", action="store_true", help="plain text lines even on a terminal")
    style.add_argument("--rich", action="store_true", help="a rich table even when the output is not a terminal")
    p.add_argument("--uri", default=None, help=URI_HELP)
    p.set_defaults(func=_tail)


def _tail(args: argparse.Namespace) -> int:
    if args.interval <= 0 or not math.isfinite(args.interval):
        raise CommandError(f"--interval must be a positive number of seconds, not {args.interval}")
    use_rich = args.rich or (not args.plain and sys.stdout.isatty())
    if use_rich:
        try:
            import rich  # noqa: F401
        except ImportError:
            raise CommandError(
                "steplog tail draws its live table with rich: pip install 'steplog[tail]' (or use --plain)"
            ) from None
    store = open_store(args.uri)
    run_id = get_run(store, args.run).run_id if args.run == LATEST else args.run
    try:
        watcher = store.watch(run_id)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        if use_rich:
            _tail_rich(watcher, args)
        else:
            _tail_plain(watcher, args)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a user stops following: not an error
    return 0


def _snapshot_rows(watcher: Any) -> list[list[str]]:
    return [
        [key, fmt_value(p.value), str(p.step), str(watcher.counts.get(key, 0)), fmt_time(p.timestamp)[11:]]
        for key, p in sorted(watcher.latest.items(), key=lambda kv: natural_key(kv[0]))
    ]


_TAIL_HEADERS = ("KEY", "LATEST", "STEP", "POINTS", "AT")


def _refresh(watcher: Any, previous: AnyRun) -> AnyRun:
    """The run's metadata now, or as last seen while its meta.yaml is mid-rewrite (MLflow rewrites in place)."""
    try:
        run: AnyRun = watcher.run()
        return run
    except StoreError:
        return previous


def _header(run: AnyRun) -> str:
    return f"run {run.run_id} ({run.run_name or '-'}): {run.status.name}, {duration(run)}"


def _tail_plain(watcher: Any, args: argparse.Namespace) -> None:
    out = sys.stdout
    watcher.poll()
    run = watcher.run()
    print_lines([_header(run), *table(_TAIL_HEADERS, _snapshot_rows(watcher), [False, True, True, True])])
    out.flush()
    if not args.follow:
        return
    while run.status == RunStatus.RUNNING and not is_dead(run):
        time.sleep(args.interval)
        changed = watcher.poll()
        run = _refresh(watcher, run)
        if run.status != RunStatus.RUNNING or is_dead(run):
            changed.update(watcher.poll())  # what was written between the look and the close
        _print_changes(changed, watcher, out)
    out.write(f"run {run.run_id[:8]} ended: {status_word(run)}, {duration(run)}\n")
    out.flush()


def _print_changes(changed: dict[str, MetricPoint], watcher: Any, out: TextIO) -> None:
    if not changed:
        return
    now = dt.datetime.now().strftime("%H:%M:%S")
    out.write(
        "".join(
            f"{now}  {key}  step {p.step}  {fmt_value(p.value)}  ({watcher.counts.get(key, 0)} points)\n"
            for key, p in sorted(changed.items(), key=lambda kv: natural_key(kv[0]))
        )
    )
    out.flush()


def _tail_rich(watcher: Any, args: argparse.Namespace) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    console = Console(force_terminal=True if args.rich else None)

    def render(run: AnyRun) -> Group:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for i, header in enumerate(_TAIL_HEADERS):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in _snapshot_rows(watcher):
            table.add_row(*row)
        status_style = {RunStatus.RUNNING: "yellow", RunStatus.FINISHED: "green"}.get(run.status, "red")
        title = Text.assemble(
            ("run ", "dim"), (run.run_id[:8], "bold"), f" ({run.run_name or '-'})  ", (run.status.name, status_style),
            f"  {duration(run)}",
        )  # fmt: skip
        return Group(title, table)

    watcher.poll()
    run = watcher.run()
    if not args.follow:
        console.print(render(run))
        return
    with Live(render(run), console=console, refresh_per_second=4, auto_refresh=False) as live:
        while run.status == RunStatus.RUNNING and not is_dead(run):
            time.sleep(args.interval)
            watcher.poll()
            run = _refresh(watcher, run)
            if run.status != RunStatus.RUNNING:
                watcher.poll()
            live.update(render(run), refresh=True)
