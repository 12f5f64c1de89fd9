"""``steplog plot RUN... KEY... -o FILE``: metric histories as an image (needs matplotlib, the ``plot`` extra).

Keys may be shell-style patterns (``'grad_norm/*'``), expanded over the runs' metric keys
in natural order; runs may be ids, unique prefixes, or ``latest``.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..store import History
from . import CommandError
from .common import URI_HELP, AnyRun, AnyStore, get_run, history, natural_key, open_store, short_ids

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``steplog plot``."""
    p = subparsers.add_parser(
        "plot",
        help="plot metrics of one or more runs to an image (needs steplog[plot])",
        description="Plot metric histories to an image file: one panel per key, the runs overlaid "
        "with a legend. Arguments name runs (ids, unique prefixes, or latest) up to the first one that is a "
        "metric key of those runs or a shell-style pattern matching some (quote it: 'grad_norm/*'); that one "
        "and the rest are keys or patterns. With --key, every argument is a run.",
        epilog="example: steplog plot 3f2a 9c1e train/loss 'val/*' -o loss.png --smooth 20",
    )
    p.add_argument("targets", nargs="+", metavar="RUN|KEY", help="runs first, then metric keys")
    p.add_argument("-o", "--output", required=True, help="the image to write (.png; .svg and .pdf work too)")
    p.add_argument(
        "--key", "-k", action="append", default=None, help="a metric key or shell-style pattern (repeatable)"
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="centred moving average over N points, at most a tenth of a curve (raw curve kept faint)",
    )
    p.add_argument("--x", choices=("step", "time"), default="step", help="x axis: step, or time since run start")
    p.add_argument("--uri", default=None, help=URI_HELP)
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    if args.smooth < 1:
        raise CommandError(f"--smooth must be at least 1 (points per moving-average window), not {args.smooth}")
    store = open_store(args.uri)
    runs, keys = _split_targets(store, args.targets, args.key)
    histories: dict[str, list[tuple[AnyRun, History]]] = {}
    for key in keys:
        having = [r for r in runs if key in r.metric_keys]
        if not having:
            metrics = sorted({k for r in runs for k in r.metric_keys})
            raise CommandError(f"no run given has a metric {key!r} (their metrics: {', '.join(metrics) or 'none'})")
        for run in runs:
            if key not in run.metric_keys:
                print(f"note: run {run.run_id[:8]} has no metric {key!r}", file=sys.stderr)
        histories[key] = [(r, history(store, r, key)) for r in having]

    try:  # after the arguments are checked: matplotlib takes a second to import
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        raise CommandError("steplog plot needs matplotlib: pip install 'steplog[plot]'") from None
    short = short_ids([r.run_id for r in runs])
    fig = Figure(figsize=(9.0, 0.6 + 2.8 * len(keys)), dpi=110, layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    color_of = {r.run_id: c for r, c in zip(runs, colors, strict=True)}
    time_unit, time_scale = _time_unit(runs, histories) if args.x == "time" else ("", 1.0)
    for ax, key in zip(axes, keys, strict=True):
        for run, points in histories[key]:
            steps, values, stamps = points.to_numpy()
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
    store: AnyStore, targets: Sequence[str], explicit_keys: Sequence[str] | None
) -> tuple[list[AnyRun], list[str]]:
    """Runs up to the first argument that is a metric key (or a pattern matching one) of those runs; keys after."""
    runs: list[AnyRun] = []
    patterns: list[str] = list(explicit_keys or [])
    for i, item in enumerate(targets):
        if not explicit_keys and runs and _names_a_key(item, runs):
            patterns = list(targets[i:])
            break
        if runs and not explicit_keys and _is_pattern(item):
            metrics = sorted({k for r in runs for k in r.metric_keys}, key=natural_key)
            raise CommandError(
                f"pattern {item!r} matches no metric of the runs before it ({', '.join(metrics) or 'none'})"
            )
        try:
            run = get_run(store, item)
        except CommandError as exc:
            if runs and not explicit_keys:
                metrics = sorted({k for r in runs for k in r.metric_keys}, key=natural_key)
                raise CommandError(
                    f"{item!r} is neither a metric of the runs before it ({', '.join(metrics) or 'none'}) "
                    f"nor a run id in {store.root}"
                ) from None
            raise exc from None
        if run.run_id not in {r.run_id for r in runs}:
            runs.append(run)
    if not patterns:
        metrics = sorted({k for r in runs for k in r.metric_keys}, key=natural_key)
        raise CommandError(
            f"no metric key given: name keys after the runs (their metrics: {', '.join(metrics) or 'none'})"
        )
    return runs, _expand(patterns, runs)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def _names_a_key(item: str, runs: Sequence[AnyRun]) -> bool:
    keys = {k for r in runs for k in r.metric_keys}
    return item in keys or (_is_pattern(item) and any(fnmatch.fnmatchcase(k, item) for k in keys))


def _expand(patterns: Sequence[str], runs: Sequence[AnyRun]) -> list[str]:
    """Each key as given, each pattern as the runs' keys it matches (natural order); no key twice."""
    keys = sorted({k for r in runs for k in r.metric_keys}, key=natural_key)
    out: list[str] = []
    for pattern in patterns:
        if pattern in keys or not _is_pattern(pattern):
            out.append(pattern)
            continue
        matched = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
        if not matched:
            raise CommandError(f"pattern {pattern!r} matches no metric of the runs ({', '.join(keys) or 'none'})")
        out.extend(matched)
    return list(dict.fromkeys(out))


def _time_unit(runs: Sequence[AnyRun], histories: dict[str, list[tuple[AnyRun, History]]]) -> tuple[str, float]:
    span = 0
    for pairs in histories.values():
        for run, points in pairs:
            if points.timestamps:
                t0 = run.start_time if run.start_time is not None else min(points.timestamps)
                span = max(span, max(points.timestamps) - t0)
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
