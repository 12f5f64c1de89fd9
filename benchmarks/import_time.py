"""Workload 7, import time: ``import steplog`` against the peers, each in a fresh interpreter.

Each figure is the time of the import statement itself, measured inside a new Python
process (interpreter start-up excluded), alternating the modules round by round; median
and min-max over rounds. steplog loads its writer on first use of ``start_run``/``Run``
(PEP 562), so that is measured too.

    python benchmarks/import_time.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "import_time"
TITLE = "Import time (fresh interpreter, start-up excluded)"

CASES = {
    "steplog": "import steplog",
    "steplog + first start_run access": "import steplog; steplog.start_run",
    "mlflow": "import mlflow",
    "tensorboardX": "import tensorboardX",
    "wandb": "import wandb",
    "trackio": "import trackio",
}
_PROBE = "import time; t0 = time.perf_counter(); {stmt}; print(time.perf_counter() - t0)"


def _time(stmt: str) -> float:
    env = {**os.environ, "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(stmt=stmt)], capture_output=True, text=True, check=True, env=env
    ).stdout
    return float(out.strip().splitlines()[-1])


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 1, 9)
    notes = []
    cases = {}
    for name, stmt in CASES.items():
        module = stmt.split()[1].rstrip(";")
        if importlib.util.find_spec(module) is None:
            notes.append(f"{name}: skipped, not installed (pip install 'steplog[bench]')")
        elif mode == "smoke" and not name.startswith("steplog"):
            continue  # the smoke run checks the machinery, not the (slow) peers
        else:
            cases[name] = stmt
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in c.rotate(list(cases), r):
            samples[name].append(_time(cases[name]) * 1000)
    rows = [{"name": name, "ms": c.summary(samples[name])} for name in cases]
    targets = []
    for row in rows:
        if row["name"] == "steplog":
            ms = row["ms"]["median"]
            targets.append(c.target("import steplog", ms, "≤ 50 ms", ms <= 50, f"{ms:.1f} ms"))
    result = c.result_of(TITLE, mode, {"rounds": rounds, "rows": rows}, targets=targets, notes=notes)
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    names = [r["name"] for r in rows]
    return c.bar_chart_drawer(names, [r["ms"]["median"] for r in rows], TITLE + " (log scale)", "ms (median)")


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    rows = [
        [r["name"], c.fmt(r["ms"]["median"]), f"{c.fmt(r['ms']['min'])}-{c.fmt(r['ms']['max'])}"]
        for r in result["rows"]
    ]
    print(c.table(["import", "ms", "min-max"], rows))
    c.print_footer(result)


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
