"""Shared machinery of the benchmark scripts: modes, rounds, statistics, tables, JSON and charts.

Every script measures its contenders side by side in one process, alternating them
round by round (the order rotates each round, so a noisy neighbour hurts everyone
alike), and reports medians with min-max. Ratios are computed from figures taken in
the same run, never against numbers from another day.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODES = ("smoke", "quick", "full")
KEYS = [f"m{i:02d}" for i in range(20)]
"""The metric keys of the workloads: 20 per step."""
PEERS = ("steplog", "mlflow", "tensorboardX", "wandb", "trackio")
"""The distributions whose versions a result records by default."""


def script_main(doc: str, run: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """A script's ``main``: parse the options (``doc``'s first line as the description), run, stop the peers."""
    args = parse_args(doc.splitlines()[0], argv)
    try:
        run(args.mode, args.out, chart=not args.no_chart)
    finally:
        import contenders

        contenders.shutdown()
    return 0


class Noop:
    """The floor: a logger whose calls take the same arguments and do nothing."""

    def log_metric(self, key: str, value: float, step: int) -> None:
        pass

    def log_metrics(self, metrics: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every script takes: ``--quick``, ``--smoke``, ``--out DIR``, ``--no-chart``."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write JSON and PNG (default: results/)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.out is None:
        args.out = default_out(args.mode)
    return args


def default_out(mode: str) -> Path:
    """Full runs write to ``benchmarks/results``; quick and smoke runs to ``results/<mode>`` (not committed)."""
    return RESULTS if mode == "full" else RESULTS / mode


def pick(mode: str, smoke: Any, quick: Any, full: Any) -> Any:
    """The value for this mode."""
    return {"smoke": smoke, "quick": quick, "full": full}[mode]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of a list of samples."""
    if not samples:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def rotate(items: Sequence[Any], round_index: int) -> list[Any]:
    """``items`` rotated by the round number: each contender goes first in turn."""
    k = round_index % max(1, len(items))
    return list(items[k:]) + list(items[:k])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_1min_at_start": load,
    }


def versions(*modules: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in modules:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def fmt(value: float, unit: str = "") -> str:
    """A number with 3 significant digits (and thousands grouping for big ones)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text}{unit}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (prints well in a terminal too)."""
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(lines)


def result_of(
    title: str,
    mode: str,
    fields: dict[str, Any],
    *,
    targets: list[dict[str, Any]],
    notes: list[str],
    packages: Sequence[str] = PEERS,
) -> dict[str, Any]:
    """A script's result: title, mode, its own ``fields``, targets, notes and the versions of ``packages``."""
    return {"title": title, "mode": mode, **fields, "targets": targets, "notes": notes, "versions": versions(*packages)}


def report(
    name: str,
    result: dict[str, Any],
    out: Path | None,
    printer: Callable[[dict[str, Any]], None],
    chart: Callable[[Any], None] | None,
) -> dict[str, Any]:
    """Print ``result`` with ``printer``, write it under ``out`` (unless None) with its chart; return it."""
    printer(result)
    if out is not None:
        write_results(name, result, out, chart=chart)
    return result


def print_footer(result: dict[str, Any]) -> None:
    """Print a result's notes, then its targets."""
    for note in result["notes"]:
        print(f"note: {note}")
    print_targets(result["targets"])


def print_grouped(
    result: dict[str, Any],
    groups: Sequence[str],
    heads: Callable[[str], list[str]],
    cells: Callable[[dict[str, Any], str], list[str]],
    extra: tuple[str, Callable[[dict[str, Any]], str]] | None = None,
) -> None:
    """Print a table with a "contender" column, then ``heads(g)`` columns per group ``g`` (and ``extra``), then the footer."""
    headers = ["contender"]
    for g in groups:
        headers += heads(g)
    if extra is not None:
        headers.append(extra[0])
    rows = []
    for r in result["rows"]:
        line = [r["name"]]
        for g in groups:
            line += cells(r, g)
        if extra is not None:
            line.append(extra[1](r))
        rows.append(line)
    print(table(headers, rows))
    print_footer(result)


def write_results(
    name: str,
    result: dict[str, Any],
    out: Path,
    *,
    chart: Callable[[Any], None] | None = None,
) -> Path:
    """Write ``<out>/<name>.json`` (and ``<name>.png`` when ``chart`` draws on the axes given)."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    result.setdefault("machine", machine())
    path = out / f"{name}.json"
    path.write_text(json.dumps(_clean(result), indent=2, default=_jsonable) + "\n", encoding="utf-8")
    if chart is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("  (no chart: matplotlib is not installed; pip install 'steplog[bench]')", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
            chart(ax)
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
    return path


def bar_chart(
    ax: Any, labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, log: bool = True
) -> None:
    """Horizontal bars, steplog highlighted, log scale by default (the contenders span decades)."""
    shown = [(lab, v) for lab, v in zip(labels, values, strict=True) if v is not None and not math.isnan(v) and v > 0]
    if not shown:
        return
    names = [lab for lab, _v in shown]
    vals = [v for _lab, v in shown]
    colors = ["#d62728" if n.startswith("steplog") else "#7f7f7f" for n in names]
    ax.barh(names, vals, color=colors)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    for i, v in enumerate(vals):
        ax.text(v, i, " " + fmt(v), va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)


def bar_chart_drawer(
    names: Sequence[str], values: Sequence[float], title: str, xlabel: str, *, log: bool = True
) -> Callable[[Any], None]:
    """A chart function for :func:`write_results` that draws :func:`bar_chart` of ``values``."""

    def draw(ax: Any) -> None:
        bar_chart(ax, names, values, title=title, xlabel=xlabel, log=log)

    return draw


def grouped_bar_chart_drawer(
    names: Sequence[str],
    groups: Sequence[str],
    values: Callable[[str], Sequence[float]],
    label: Callable[[str], str],
    *,
    width: float,
    target: tuple[float, str],
    title: str,
    xlabel: str,
    log: bool = False,
) -> Callable[[Any], None]:
    """A chart function for :func:`write_results`: a bar per group for each name, and a dashed target line."""

    def draw(ax: Any) -> None:
        for k, g in enumerate(groups):
            ys = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(names))]
            ax.barh(ys, values(g), height=width, label=label(g))
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.axvline(target[0], color="#d62728", linestyle="--", label=target[1])
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend(fontsize=8)

    return draw


def _clean(value: Any) -> Any:
    """NaN and infinities as null: strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def busy(n: int) -> float:
    """Pure-Python work that holds the interpreter lock: ``n`` float additions."""
    x = 0.0
    for _ in range(n):
        x += 1.0
    return x


def calibrate_busy(seconds: float) -> int:
    """The ``n`` for which :func:`busy` takes about ``seconds`` here, undisturbed (fastest of a few tries)."""
    n = 10_000
    tries = []
    for _ in range(15):
        t0 = time.perf_counter()
        busy(n)
        tries.append(time.perf_counter() - t0)
    per = min(tries) / n
    return max(1, round(seconds / per))


def target(figure: str, measured: float, goal: str, ok: bool, text: str) -> dict[str, Any]:
    """One row of a script's "targets" list: what was measured, the goal, and whether it is met."""
    return {"figure": figure, "measured": measured, "text": text, "target": goal, "ok": bool(ok)}


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    """Print the targets as a table with a ✓/✗ column."""
    if not targets:
        return
    rows = [(t["figure"], t["text"], t["target"], "PASS" if t["ok"] else "MISS") for t in targets]
    print()
    print(table(["target", "measured", "goal", ""], rows))


def scaled(cost_us: float, budget_s: float, *, lo: int, hi: int) -> int:
    """How many operations of ``cost_us`` fit in ``budget_s``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, int(budget_s * 1e6 / max(cost_us, 1e-3))))


def cpu_share(seconds: float = 0.2) -> float:
    """This thread's CPU time over wall time while it spins for ``seconds``: 1.0 on an idle core.

    Below 1 the thread waited for a CPU (other processes, or this process's other threads):
    figures measured meanwhile are inflated by about that factor.
    """
    c0 = time.thread_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        busy(2_000)
    return (time.thread_time() - c0) / (time.perf_counter() - t0)


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def too_busy(load: float, share: float, cpus: int | None = None) -> str | None:
    """Why the machine was too busy for figures to be judged, or None.

    Busy when the load average leaves less than half a core free (``load > cpus - 0.5``) or
    when a spinning thread got less than 90 % of a core.
    """
    cpus = cpus or os.cpu_count() or 1
    reasons = []
    if load > cpus - 0.5:
        reasons.append(f"load average {load:.2f} on {cpus} CPUs (> {cpus - 0.5:.1f})")
    if share < 0.9:
        reasons.append(f"a spinning thread got {share:.0%} of a core (< 90 %)")
    return "; ".join(reasons) or None
