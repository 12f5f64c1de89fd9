"""``steplog runs``, ``show``, ``plot`` and ``tail``: a store's runs in the terminal, a chart as a PNG.

Every command reads a local MLflow file store (steplog's or MLflow's own) through
:class:`steplog.Store`, found as ``start_run`` finds it: ``--uri``, else
``STEPLOG_TRACKING_URI``, then ``MLFLOW_TRACKING_URI``, then ``./mlruns``. A run is
named by its id or any unique prefix of it. ``plot`` needs matplotlib (the ``plot``
extra); ``tail`` draws a live table with rich (the ``tail`` extra) on a terminal and
prints plain lines when its output is a pipe or a file.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._records import MetricPoint, RunStatus
from ._run import resolve_tracking_uri
from .cli import CommandError
from .store import History, RunData, RunWatcher, Store, StoreError

__all__ = ["register"]

_URI_HELP = "the store: a directory or file: URI (default: STEPLOG_TRACKING_URI, MLFLOW_TRACKING_URI, ./mlruns)"


def register(subparsers: Any) -> None:
    """Add the ``runs``, ``show``, ``plot`` and ``tail`` subcommands."""
    p = subparsers.add_parser(
        "runs",
        help="list runs: id, name, experiment, status, start, duration, latest metrics",
        description="List a store's runs, newest first, with a few latest metric values.",
    )
    p.add_argument("--uri", default=None, help=_URI_HELP)
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

    p = subparsers.add_parser(
        "show",
        help="one run: status, times, params, tags, latest value and step count per metric",
        description="Show one run: status, times, params, tags, and per metric the latest value "
        "(MLflow's rule: the highest step), its step and the number of points.",
    )
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of one")
    p.add_argument("--uri", default=None, help=_URI_HELP)
    p.set_defaults(func=_show)

    p = subparsers.add_parser(
        "plot",
        help="plot metrics of one or more runs to an image (needs steplog[plot])",
        description="Plot metric histories to an image file: one panel per key, the runs overlaid "
        "with a legend. Arguments name runs (ids or unique prefixes) up to the first one that is a "
        "metric key of those runs; that one and the rest are keys. With --key, every argument is a run.",
        epilog="example: steplog plot 3f2a 9c1e train/loss val/loss -o loss.png --smooth 20",
    )
    p.add_argument("targets", nargs="+", metavar="RUN|KEY", help="runs first, then metric keys")
    p.add_argument("-o", "--output", required=True, help="the image to write (.png; .svg and .pdf work too)")
    p.add_argument("--key", "-k", action="append", default=None, help="a metric key (repeatable)")
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="centred moving average over N points, at most a tenth of a curve (raw curve kept faint)",
    )
    p.add_argument("--x", choices=("step", "time"), default="step", help="x axis: step, or time since run start")
    p.add_argument("--uri", default=None, help=_URI_HELP)
    p.set_defaults(func=_plot)

    p = subparsers.add_parser(
        "tail",
        help="the latest value of each metric of a run, live with --follow",
        description="Show the latest value, step and point count of each metric of a run. With --follow, "
        "keep showing them as the run writes, until it ends or Ctrl-C: a live table on a terminal "
        "(rich, the tail extra), one plain line per new value when the output is a pipe or file.",
    )
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of one")
    p.add_argument("--follow", "-f", action="store_true", help="keep going until the run ends (or Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between two looks (default 1)")
    style = p.add_mutually_exclusive_group()
    style.add_argument("--plain", action="store_true", help="plain text lines even on a terminal")
    style.add_argument("--rich", action="store_true", help="a rich table even when the output is not a terminal")
    p.add_argument("--uri", default=None, help=_URI_HELP)
    p.set_defaults(func=_tail)


# --------------------------------------------------------------------------- helpers


def _open_store(uri: str | None) -> Store:
    text = resolve_tracking_uri(uri)
    try:
        return Store(text)
    except StoreError as exc:
        hint = "" if uri is not None else "; pass --uri PATH or set STEPLOG_TRACKING_URI"
        raise CommandError(f"{exc}{hint}") from None


def _fmt_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(ms: int | None) -> str:
    if ms is None or ms < 0:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _fmt_value(value: float) -> str:
    return f"{value:.6g}"


def _duration(run: RunData) -> str:
    if run.start_time is None:
        return "-"
    if run.end_time is None:
        return _fmt_duration(int(time.time() * 1000) - run.start_time) if run.status == RunStatus.RUNNING else "-"
    return _fmt_duration(run.end_time - run.start_time)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> list[str]:
    """Aligned text columns (numbers right-aligned where ``right`` says so)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = list(right) + [False] * (len(headers) - len(right))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _short_ids(run_ids: Sequence[str], least: int = 8) -> dict[str, str]:
    """The shortest prefixes (at least ``least`` characters) that tell the given runs apart."""
    n = least
    while n < 32 and len({r[:n] for r in run_ids}) < len(set(run_ids)):
        n += 2
    return {r: r[:n] for r in run_ids}


def _print_lines(lines: Sequence[str], out: TextIO | None = None) -> None:
    (out or sys.stdout).write("".join(f"{line}\n" for line in lines))


# --------------------------------------------------------------------------- runs


def _runs(args: argparse.Namespace) -> int:
    store = _open_store(args.uri)
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
        keys = [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], not _headline(kv[0]), kv[0]))[:3]]
    names = {e.experiment_id: e.name for e in store.experiments(include_deleted=True)}
    short = _short_ids([r.run_id for r in runs])
    rows = []
    for run in runs:
        cells = [
            short[run.run_id],
            run.run_name or "-",
            names.get(run.experiment_id, run.experiment_id),
            run.status.name,
            _fmt_time(run.start_time),
            _duration(run),
        ]
        for key in keys:
            point = run.latest.get(key)
            cells.append("-" if point is None else _fmt_value(point.value))
        rows.append(cells)
    headers = ["ID", "NAME", "EXPERIMENT", "STATUS", "START", "DURATION", *keys]
    lines = _table(headers, rows, right=[False] * 5 + [True] * (1 + len(keys)))
    if total > len(runs):
        lines.append(f"... and {total - len(runs)} older runs (--limit 0 shows all)")
    _print_lines(lines)
    return 0


# --------------------------------------------------------------------------- show


def _show(args: argparse.Namespace) -> int:
    store = _open_store(args.uri)
    run = store.get_run(args.run)
    try:
        experiment = store.experiment(run.experiment_id).name
    except StoreError:
        experiment = "?"
    lines = [
        f"run         {run.run_id}",
        f"name        {run.run_name or '-'}",
        f"experiment  {experiment} (id {run.experiment_id})",
        f"status      {run.status.name}" + (" (deleted)" if run.lifecycle_stage == "deleted" else ""),
        f"start       {_fmt_time(run.start_time)}",
        f"end         {_fmt_time(run.end_time)}",
        f"duration    {_duration(run)}",
    ]
    if run.user_id:
        lines.append(f"user        {run.user_id}")
    if run.artifact_uri:
        lines.append(f"artifacts   {run.artifact_uri}")
    for title, values in (("params", run.params), ("tags", run.tags)):
        lines.append("")
        if not values:
            lines.append(f"{title}: none")
            continue
        lines.append(f"{title} ({len(values)}):")
        width = max(len(k) for k in values)
        lines.extend(f"  {k.ljust(width)}  {_one_line(v)}" for k, v in values.items())
    lines.append("")
    if not run.metric_keys:
        lines.append("metrics: none")
    else:
        rows = []
        for key in run.metric_keys:
            history = store.metric_history(run, key)
            point = history.latest()
            if point is None:
                rows.append([key, "-", "-", "0"])
            else:
                rows.append([key, _fmt_value(point.value), str(point.step), str(len(history))])
        lines.append(f"metrics ({len(rows)}):")
        lines.extend(
            "  " + line for line in _table(["KEY", "LATEST", "STEP", "POINTS"], rows, [False, True, True, True])
        )
    _print_lines(lines)
    return 0


def _one_line(text: str, width: int = 100) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# --------------------------------------------------------------------------- plot


def _plot(args: argparse.Namespace) -> int:
    if args.smooth < 1:
        raise CommandError(f"--smooth must be at least 1 (points per moving-average window), not {args.smooth}")
    store = _open_store(args.uri)
    runs, keys = _split_targets(store, args.targets, args.key)
    histories: dict[str, list[tuple[RunData, History]]] = {}
    for key in keys:
        having = [r for r in runs if key in r.metric_keys]
        if not having:
            metrics = sorted({k for r in runs for k in r.metric_keys})
            raise CommandError(f"no run given has a metric {key!r} (their metrics: {', '.join(metrics) or 'none'})")
        for run in runs:
            if key not in run.metric_keys:
                print(f"note: run {run.run_id[:8]} has no metric {key!r}", file=sys.stderr)
        histories[key] = [(r, store.metric_history(r, key)) for r in having]

    try:  # after the arguments are checked: matplotlib takes a second to import
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        raise CommandError("steplog plot needs matplotlib: pip install 'steplog[plot]'") from None
    short = _short_ids([r.run_id for r in runs])
    fig = Figure(figsize=(9.0, 0.6 + 2.8 * len(keys)), dpi=110, layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    color_of = {r.run_id: c for r, c in zip(runs, colors, strict=True)}
    time_unit, time_scale = _time_unit(runs, histories) if args.x == "time" else ("", 1.0)
    for ax, key in zip(axes, keys, strict=True):
        for run, history in histories[key]:
            steps, values, stamps = history.to_numpy()
            if args.x == "step":
                x = steps
            else:
                t0 = run.start_time if run.start_time is not None else (int(stamps.min()) if len(stamps) else 0)
                x = (stamps - t0) / time_scale
            order = np.argsort(x, kind="stable")
            x, y = x[order], values[order]
            y = np.where(np.isinf(y), np.nan, y)
            label = f"{run.run_name or '-'} ({short[run.run_id]})"
            color = color_of[run.run_id]
            # A window of at most a tenth of the curve, so a sparse curve (a validation loss
            # logged every 100 steps) next to a dense one is smoothed, not flattened.
            window = min(args.smooth, len(y) // 10)
            if window > 1:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, _moving_average(np, y, window), color=color, linewidth=1.5, label=label)
            else:
                ax.plot(x, y, color=color, linewidth=1.2, label=label, marker="o" if len(y) == 1 else None)
        ax.set_title(key, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step" if args.x == "step" else f"time since run start ({time_unit})")
    if len(runs) == 1:
        fig.suptitle(f"{runs[0].run_name or runs[0].run_id}", fontsize=11)
    output = Path(args.output)
    try:
        fig.savefig(output)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot write {output}: {exc}") from None
    width, height = fig.canvas.get_width_height()
    runs_text = f"{len(runs)} run{'s' * (len(runs) != 1)}"
    print(f"wrote {output} ({runs_text}, {len(keys)} panel{'s' * (len(keys) != 1)}, {width}x{height} px)")
    return 0


def _split_targets(
    store: Store, targets: Sequence[str], explicit_keys: Sequence[str] | None
) -> tuple[list[RunData], list[str]]:
    """Runs up to the first argument that is a metric key of those runs; keys from there on."""
    runs: list[RunData] = []
    keys: list[str] = list(explicit_keys or [])
    for i, item in enumerate(targets):
        if not explicit_keys and runs and any(item in r.metric_keys for r in runs):
            keys = list(targets[i:])
            break
        try:
            run = store.get_run(item)
        except StoreError as exc:
            if runs and not explicit_keys:
                metrics = sorted({k for r in runs for k in r.metric_keys})
                raise CommandError(
                    f"{item!r} is neither a metric of the runs before it ({', '.join(metrics) or 'none'}) "
                    f"nor a run id in {store.root}"
                ) from None
            raise CommandError(str(exc)) from None
        if run.run_id not in {r.run_id for r in runs}:
            runs.append(run)
    if not keys:
        metrics = sorted({k for r in runs for k in r.metric_keys})
        raise CommandError(
            f"no metric key given: name keys after the runs (their metrics: {', '.join(metrics) or 'none'})"
        )
    return runs, list(dict.fromkeys(keys))


def _time_unit(runs: Sequence[RunData], histories: dict[str, list[tuple[RunData, History]]]) -> tuple[str, float]:
    span = 0
    for pairs in histories.values():
        for run, history in pairs:
            if history.timestamps:
                t0 = run.start_time if run.start_time is not None else min(history.timestamps)
                span = max(span, max(history.timestamps) - t0)
    if span > 3 * 3600_000:
        return "h", 3600_000.0
    if span > 600_000:
        return "min", 60_000.0
    return "s", 1000.0


def _moving_average(np: Any, y: Any, window: int) -> Any:
    """Mean over a window of ``window`` points centred on each point (so the curve does not lag).

    NaN points are left out of the means; windows are cut short at both ends.
    """
    finite = np.isfinite(y)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, y, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    index = np.arange(len(y))
    lo = np.maximum(index - window // 2, 0)
    hi = np.minimum(index + (window - window // 2), len(y))
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


# --------------------------------------------------------------------------- tail


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
    store = _open_store(args.uri)
    watcher = store.watch(args.run)
    try:
        if use_rich:
            _tail_rich(watcher, args)
        else:
            _tail_plain(watcher, args)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a user stops following: not an error
    return 0


def _snapshot_rows(watcher: RunWatcher) -> list[list[str]]:
    return [
        [key, _fmt_value(p.value), str(p.step), str(watcher.counts.get(key, 0)), _fmt_time(p.timestamp)[11:]]
        for key, p in sorted(watcher.latest.items())
    ]


_TAIL_HEADERS = ("KEY", "LATEST", "STEP", "POINTS", "AT")


def _refresh(watcher: RunWatcher, previous: RunData) -> RunData:
    """The run's metadata now, or as last seen while its meta.yaml is mid-rewrite (MLflow rewrites in place)."""
    try:
        return watcher.run()
    except StoreError:
        return previous


def _header(run: RunData) -> str:
    return f"run {run.run_id} ({run.run_name or '-'}): {run.status.name}, {_duration(run)}"


def _tail_plain(watcher: RunWatcher, args: argparse.Namespace) -> None:
    out = sys.stdout
    watcher.poll()
    run = watcher.run()
    _print_lines([_header(run), *_table(_TAIL_HEADERS, _snapshot_rows(watcher), [False, True, True, True])])
    out.flush()
    if not args.follow:
        return
    while run.status == RunStatus.RUNNING:
        time.sleep(args.interval)
        changed = watcher.poll()
        run = _refresh(watcher, run)
        if run.status != RunStatus.RUNNING:
            changed.update(watcher.poll())  # what was written between the look and the close
        _print_changes(changed, watcher, out)
    out.write(f"run {run.run_id[:8]} ended: {run.status.name}, {_duration(run)}\n")
    out.flush()


def _print_changes(changed: dict[str, MetricPoint], watcher: RunWatcher, out: TextIO) -> None:
    if not changed:
        return
    now = dt.datetime.now().strftime("%H:%M:%S")
    out.write(
        "".join(
            f"{now}  {key}  step {p.step}  {_fmt_value(p.value)}  ({watcher.counts.get(key, 0)} points)\n"
            for key, p in sorted(changed.items())
        )
    )
    out.flush()


def _tail_rich(watcher: RunWatcher, args: argparse.Namespace) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    console = Console(force_terminal=True if args.rich else None)

    def render(run: RunData) -> Group:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for i, header in enumerate(_TAIL_HEADERS):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in _snapshot_rows(watcher):
            table.add_row(*row)
        status_style = {RunStatus.RUNNING: "yellow", RunStatus.FINISHED: "green"}.get(run.status, "red")
        title = Text.assemble(
            ("run ", "dim"), (run.run_id[:8], "bold"), f" ({run.run_name or '-'})  ", (run.status.name, status_style),
            f"  {_duration(run)}",
        )  # fmt: skip
        return Group(title, table)

    watcher.poll()
    run = watcher.run()
    if not args.follow:
        console.print(render(run))
        return
    with Live(render(run), console=console, refresh_per_second=4, auto_refresh=False) as live:
        while run.status == RunStatus.RUNNING:
            time.sleep(args.interval)
            watcher.poll()
            run = _refresh(watcher, run)
            if run.status != RunStatus.RUNNING:
                watcher.poll()
            live.update(render(run), refresh=True)


def _headline(key: str) -> bool:
    """True for a metric people usually compare runs by (a loss, an accuracy, a score)."""
    name = key.rsplit("/", 1)[-1].lower()
    return any(word in name for word in ("loss", "acc", "score", "reward", "f1", "auc", "perplexity"))
