"""``steplog sync`` against a real ``mlflow server``: a first sync, a second of the unchanged store, a grown one.

The store: ``--runs`` runs of ``--keys`` metric keys with ``--points`` points each, and one
artifact of ``--artifact-kb`` kB per run. The server is a fresh ``mlflow server`` (sqlite
backend, one worker, artifacts served) started as the test suite starts it. Timed:

* first: everything is sent;
* second: nothing changed, so only the checks are sent (target: at most 5 % of the first);
* grown: each run gained 10 % more points on one key and a new artifact, and only those are sent
  (target: at most 5 % of the first plus the new points' share of it).

    python benchmarks/sync.py [--quick | --smoke] [--runs 4 --keys 2 --points 10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's server fixture: the same startup as the tests


def build_store(store: Path, runs: int, keys: int, points: int, artifact_kb: int) -> list[str]:
    import steplog

    ids = []
    for r in range(runs):
        with steplog.start_run("sync-bench", run_name=f"run-{r}", tracking_uri=store, handle_signals=False) as run:
            run.log_params({"lr": 0.001 * (r + 1), "seed": r})
            for step in range(points):
                run.log_metrics({f"key/{k}": (step + k) / points for k in range(keys)}, step=step)
            run.log_text("w" * (artifact_kb * 1000), "ckpt/weights.txt")
        ids.append(run.run_id)
    return ids


def grow(store: Path, run_ids: list[str], points: int) -> int:
    """Append 10 % more points to key/0 of each run (MLflow's line format) and a new artifact; the points added."""
    added = max(1, points // 10)
    for run_id in run_ids:
        (run_dir,) = store.glob(f"*/{run_id}")
        with open(run_dir / "metrics" / "key" / "0", "a", encoding="ascii") as f:
            f.writelines(f"{1_800_000_000_000 + s} 0.5 {s}\n" for s in range(points, points + added))
        (run_dir / "artifacts" / "eval.txt").write_text("evaluated\n")
    return added * len(run_ids)


def timed_sync(store: Path, url: str) -> tuple[float, list[Any]]:
    import anyio

    from steplog._cli.sync_command import sync

    t0 = time.perf_counter()
    results = anyio.run(lambda: sync(store, url))
    return time.perf_counter() - t0, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 runs of 2 keys x 5,000 points")
    size.add_argument("--smoke", action="store_true", help="1 run of 1 key x 200 points")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--artifact-kb", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write sync.json there")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.keys, args.points, args.artifact_kb = 2, 2, 5_000, 200
    if args.smoke:
        args.runs, args.keys, args.points, args.artifact_kb = 1, 1, 200, 10

    from _mlflow_server import MlflowServer

    with tempfile.TemporaryDirectory(prefix="steplog-sync-bench-") as tmp:
        store = Path(tmp) / "mlruns"
        ids = build_store(store, args.runs, args.keys, args.points, args.artifact_kb)
        server = MlflowServer(Path(tmp) / "server")
        server.start()
        try:
            first, results = timed_sync(store, server.url)
            second, again = timed_sync(store, server.url)
            added = grow(store, ids, args.points)
            grown, after = timed_sync(store, server.url)
        finally:
            server.stop()
    total = args.runs * args.keys * args.points
    sent_again = sum(r.points + r.artifacts for r in again)
    sent_grown = sum(r.points for r in after)
    share = added / total
    rows = [
        ("first sync", total, first, 1.0),
        ("second sync (unchanged)", sum(r.points for r in again), second, second / first),
        ("grown sync (+10 % on one key, +1 artifact per run)", sent_grown, grown, grown / first),
    ]
    print(
        f"steplog sync: {args.runs} runs x {args.keys} keys x {args.points} points, {args.artifact_kb} kB artifact/run"
    )
    print(f"| {'sync':<52} | {'points sent':>11} | {'seconds':>8} | {'of first':>8} |")
    print(f"|{'-' * 54}|{'-' * 13}|{'-' * 10}|{'-' * 10}|")
    for name, points, seconds, ratio in rows:
        print(f"| {name:<52} | {points:>11,} | {seconds:>8.2f} | {ratio:>7.1%} |")
    ok_second = second <= 0.05 * first and sent_again == 0
    ok_grown = grown <= (0.05 + share) * first and sent_grown == added
    print(f"target: second sync <= 5 % of the first, nothing sent: {'met' if ok_second else 'MISSED'}")
    print(f"target: grown sync sends only the {added} new points, <= {0.05 + share:.0%} of the first: "
          f"{'met' if ok_grown else 'MISSED'}")  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "sync",
            "config": vars(args) | {"out": str(args.out)},
            "seconds": {"first": first, "second": second, "grown": grown},
            "points": {"first": sum(r.points for r in results), "second": sent_again, "grown": sent_grown},
            "targets_met": {"second": ok_second, "grown": ok_grown},
        }
        (args.out / "sync.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if ok_second and ok_grown else 1


if __name__ == "__main__":
    sys.exit(main())
