"""``steplog bench``: run the benchmark suite of the source tree's ``benchmarks/`` folder.

The scripts themselves live in ``benchmarks/`` (runnable on their own; see their
docstrings). This command finds that folder next to the installed source (an editable
install of a clone, as ``make bench`` makes), runs every script side by side with its
contenders, and finishes with one table of the targets, written with the per-script
JSON and PNG files to ``benchmarks/results/`` (``results/quick/`` for ``--quick``).
The extras (``EXTRAS``: ``floor``, the CPython floor of the writer per point) run only when
named, as in ``steplog bench --quick --only floor``.

A full run starts one fresh interpreter per script, so no contender's leftover threads
disturb the next script; ``--quick`` (under a minute) runs them in this process with
fewer rounds and smaller sizes, to see the picture fast.

Either way the summary states the load average and how much of a core a spinning thread
got, before and after the suite, and says when the machine was too busy to judge the
figures (load above the number of CPUs less half a core, or less than 90 % of a core):
the ratios (steplog against a no-op call or a sync writer measured beside it, in the
same rounds) stay meaningful on a busy machine, the absolute figures do not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ._cli import CommandError

__all__ = ["EXTRAS", "SUITE", "find_benchmarks", "register", "run_suite"]

SUITE = (
    "import_time",
    "hot_path",
    "throughput",
    "loop_overhead",
    "flush_latency",
    "event_loop",
    "memory",
)
"""The suite's scripts, in the order they run (the cheapest first)."""

EXTRAS = ("floor",)
"""Scripts run only when named with ``--only`` (as the suite's are): they explain a target, they do not check one."""

# The other benchmarks of benchmarks/, run as they are by a full run when present (not by --quick).
_OTHERS: dict[str, list[str]] = {
    "reader": ["--points", "200000", "--repeat", "3"],
    "gpu_sync": ["--device", "cpu"],
    "rest": [],
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks against sync logging and the peers (source checkout only: make bench)",
        description="Run benchmarks/ side by side: steplog, naive and buffered sync logging, MLflow sync and "
        "async, tensorboardX, W&B offline and trackio (those installed: pip install -e '.[bench]'). "
        "Prints each table and the targets, and writes JSON and PNG files under benchmarks/results/. "
        "The benchmarks ship with the source, not the wheel: run it from a checkout (make bench).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes, in one process (< 1 min)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes: the test suite's check
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(SUITE)}; extras, run only when named: {', '.join(EXTRAS)}",
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write results (default benchmarks/results/)")
    parser.add_argument("--no-chart", action="store_true", help="write no PNG charts")
    parser.set_defaults(func=_main)


def find_benchmarks() -> Path:
    """The ``benchmarks/`` folder of the source checkout steplog is imported from.

    Raises:
        CommandError: steplog is installed from a wheel (the benchmarks are not in it).
    """
    package = Path(__file__).resolve().parent
    checkout = package.parents[1]
    folder = checkout / "benchmarks"
    if not ((folder / "_common.py").is_file() and (checkout / "pyproject.toml").is_file()):
        raise CommandError(
            f"steplog bench needs the source checkout, and this steplog ({package}) is installed without its "
            "benchmarks/: run from a checkout: make bench (git clone the repository, then `make bench` there)",
            status=2,
        )
    return folder


def _main(args: argparse.Namespace) -> int:
    find_benchmarks()  # first: from a wheel, nothing else this command says would help
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SUITE)
    unknown = sorted(set(names) - set(SUITE) - set(EXTRAS))
    if unknown:
        raise CommandError(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(SUITE + EXTRAS)}")
    failed = run_suite(names, mode=mode, out=args.out, chart=not args.no_chart, others=not args.only)
    if failed:
        raise CommandError(f"{len(failed)} benchmark(s) failed: {', '.join(failed)} (see above)")
    return 0


def run_suite(
    names: list[str], *, mode: str, out: Path | None = None, chart: bool = True, others: bool = True
) -> list[str]:
    """Run ``names`` in ``mode`` (and, in a full run with ``others``, the other benchmarks outside the suite).

    Prints and writes the summary; returns the names that failed.
    """
    folder = find_benchmarks()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    common = importlib.import_module("_common")
    out = common.default_out(mode) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    probes = [(common.load_average(), common.cpu_share())]
    failed: list[str] = []
    for name in names:
        print(f"\n=== {name} ({mode}) ===", flush=True)
        t0 = time.perf_counter()
        if mode == "full":
            cmd = [sys.executable, str(folder / f"{name}.py"), "--out", str(out)] + ([] if chart else ["--no-chart"])
            if subprocess.run(cmd, check=False).returncode != 0:
                failed.append(name)
        else:
            try:
                importlib.import_module(name).run(mode, out, chart=chart)
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                print(f"steplog bench: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed.append(name)
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    if "contenders" in sys.modules:
        sys.modules["contenders"].shutdown()
    if mode == "full" and others:
        for name, extra in _OTHERS.items():
            script = folder / f"{name}.py"
            if script.is_file():
                print(f"\n=== {name} (outside the suite, run as is) ===", flush=True)
                if subprocess.run([sys.executable, str(script), *extra], check=False).returncode != 0:
                    failed.append(name)
    probes.append((common.load_average(), common.cpu_share()))
    _summarize(names, out, mode, time.perf_counter() - started, common, probes)
    return failed


def _summarize(
    names: list[str], out: Path, mode: str, seconds: float, common: Any, probes: list[tuple[float, float]]
) -> None:
    """Print the targets of every script with results in ``out``, and write summary.json and summary.md.

    Results from earlier runs of the suite's scripts not run this time (``--only``) are included
    too, each with the time it was measured; an extra only when it ran this time.
    """
    results: dict[str, Any] = {}
    for name in (*SUITE, *(n for n in EXTRAS if n in names)):
        path = out / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
    targets = [dict(t, benchmark=name) for name, r in results.items() for t in r.get("targets", [])]
    machine = common.machine()
    load = max(p[0] for p in probes)
    share = min(p[1] for p in probes)
    busy = common.too_busy(load, share, machine["cpus"])
    summary = {
        "mode": mode,
        "seconds": seconds,
        "machine": machine,
        "load_average": [p[0] for p in probes],
        "cpu_share": [p[1] for p in probes],
        "too_busy": busy,
        "targets": targets,
        "benchmarks": list(results),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    header = (
        f"Machine: {machine['cpu']} ({machine['cpus']} CPUs), {machine['platform']}, "
        f"Python {machine['python']}. Mode: {mode}; {seconds:.0f} s. "
        f"Load average (1 min) before/after: {probes[0][0]:.2f}/{probes[-1][0]:.2f}; "
        f"a spinning thread got {probes[0][1]:.0%}/{probes[-1][1]:.0%} of a core."
    )
    verdict = (
        f"TOO BUSY TO JUDGE: {busy}. Absolute figures (ns, points/s, lag) are inflated; the ratios "
        "(x no-op, x buffered sync, measured in the same rounds) still compare like with like. "
        "Rerun on a quieter machine to judge the targets."
        if busy
        else "Machine quiet enough to judge the targets."
    )
    rows = [(t["figure"], t["text"], t["target"], "PASS" if t["ok"] else "MISS") for t in targets]
    when = ", ".join(f"{name} {r.get('when', '?')}" for name, r in results.items() if name not in names)
    if when:
        header += f" From earlier runs: {when}."
    table = common.table(["target", "measured", "goal", ""], rows)
    sections = [
        f"# steplog benchmarks ({time.strftime('%Y-%m-%d', time.gmtime())})",
        header,
        verdict,
        "## Targets",
        table,
    ]
    for name, result in results.items():
        module = sys.modules.get(name) or importlib.import_module(name)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            module._print(result)
        sections.append(buffer.getvalue().strip())
    (out / "summary.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    print(f"\n=== summary ({mode}, {seconds:.0f} s) ===\n{header}\n{verdict}\n\n{table}\n\nwritten: {out}")
