"""``steplog show RUN``: one run's status, times, params, tags, metrics (naturally sorted) and artifacts."""

from __future__ import annotations

import argparse
from typing import Any

from .._heartbeat import status_word
from ..store import StoreError
from .common import (
    URI_HELP,
    artifact_sizes,
    duration,
    fmt_size,
    fmt_time,
    fmt_value,
    get_run,
    history,
    natural_key,
    open_store,
    print_lines,
    table,
)

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``steplog show``."""
    p = subparsers.add_parser(
        "show",
        help="one run: status, times, params, tags, latest value and step count per metric",
        description="Show one run: status, times, params, tags, and per metric the latest value "
        "(MLflow's rule: the highest step), its step and the number of points.",
    )
    p.add_argument("run", metavar="RUN", help="run id, a unique prefix of one, or latest (the newest run)")
    p.add_argument("--uri", default=None, help=URI_HELP)
    p.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    store = open_store(args.uri)
    run = get_run(store, args.run)
    try:
        experiment = store.experiment(run.experiment_id).name
    except StoreError:
        experiment = "?"
    lines = [
        f"run         {run.run_id}",
        f"name        {run.run_name or '-'}",
        f"experiment  {experiment} (id {run.experiment_id})",
        f"status      {status_word(run)}" + (" (deleted)" if run.lifecycle_stage == "deleted" else ""),
        f"start       {fmt_time(run.start_time)}",
        f"end         {fmt_time(run.end_time)}",
        f"duration    {duration(run)}",
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
        ordered = sorted(values.items(), key=lambda kv: natural_key(kv[0]))
        lines.extend(f"  {k.ljust(width)}  {_one_line(v)}" for k, v in ordered)
    lines.append("")
    if not run.metric_keys:
        lines.append("metrics: none")
    else:
        rows = []
        for key in sorted(run.metric_keys, key=natural_key):
            points = history(store, run, key)
            point = points.latest()
            if point is None:
                rows.append([key, "-", "-", "0"])
            else:
                rows.append([key, fmt_value(point.value), str(point.step), str(len(points))])
        lines.append(f"metrics ({len(rows)}):")
        lines.extend(
            "  " + line for line in table(["KEY", "LATEST", "STEP", "POINTS"], rows, [False, True, True, True])
        )
    lines.append("")
    lines.extend(_artifact_lines(store, run))
    print_lines(lines)
    return 0


def _one_line(text: str, width: int = 100) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _artifact_lines(store: Any, run: Any) -> list[str]:
    files = artifact_sizes(store, run)
    if files is None:
        return [f"artifacts: stored at {run.artifact_uri} (not listed here)"]
    if not files:
        return ["artifacts: none"]
    total = sum(size or 0 for _path, size in files)
    rows = [[path, fmt_size(size)] for path, size in files]
    head = f"artifacts ({len(files)} file{'s' * (len(files) != 1)}, {fmt_size(total)}):"
    return [head, *("  " + line for line in table(["PATH", "SIZE"], rows, [False, True]))]
