"""``steplog demo``: a few seconds of simulated training, logged with steplog, then a short report."""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from typing import Any

from ._layout import file_uri
from ._run import resolve_tracking_uri, start_run

__all__ = ["register", "run_demo"]

N_LAYERS = 16


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a short simulated training loop logged with steplog",
        description="Simulate a few seconds of training, logging ~20 metrics per step, then report "
        "what was logged, the per-call cost, where the run is and how to open it in MLflow's UI.",
    )
    parser.add_argument("--uri", default=None, help="where to write (default: STEPLOG_TRACKING_URI, ./mlruns)")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to train (default 3)")
    parser.add_argument("--experiment", default="steplog-demo", help="experiment name")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run_demo(uri=args.uri, seconds=args.seconds, experiment=args.experiment)
    return 0


class _Noop:
    """The yardstick: a method with ``log_metric``'s signature that does nothing."""

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        pass


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += 1.0


def run_demo(*, uri: str | None = None, seconds: float = 3.0, experiment: str = "steplog-demo") -> dict[str, Any]:
    """Run the demo; print the report and return its figures."""
    uri = resolve_tracking_uri(uri)
    rng = random.Random(0)
    lr0 = 3e-3
    calls = 0
    in_calls = 0.0
    in_noop = 0.0
    noop = _Noop()
    step = 0
    norm_keys = [f"grad_norm/layer{i:02d}" for i in range(N_LAYERS)]
    with start_run(experiment, run_name=f"demo-{time.strftime('%H%M%S')}", tracking_uri=uri) as run:
        run.log_params({"lr": lr0, "batch_size": 128, "optimizer": "adamw", "layers": N_LAYERS, "seed": 0})
        run.set_tags({"model": "mlp", "purpose": "steplog demo"})
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            _busy(0.0005)  # the "training step": half a millisecond of Python work
            progress = step / 5000
            loss = 2.3 * math.exp(-3 * progress) + 0.05 + rng.gauss(0, 0.02)
            acc = 1 - 0.9 * math.exp(-4 * progress) + rng.gauss(0, 0.005)
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            norms = [abs(rng.gauss(1.0 / (i + 1), 0.05)) for i in range(N_LAYERS)]
            # the same calls on a no-op method, timed beside them (order alternating): the ratio
            # is what logging costs on this machine, however fast or busy it is
            for target in (run, noop) if step % 2 else (noop, run):
                t0 = time.perf_counter()
                target.log_metric("train/loss", loss, step=step)
                target.log_metric("train/acc", acc, step=step)
                target.log_metric("lr", lr, step=step)
                for key, norm in zip(norm_keys, norms, strict=True):
                    target.log_metric(key, norm, step=step)
                if target is run:
                    in_calls += time.perf_counter() - t0
                else:
                    in_noop += time.perf_counter() - t0
            calls += 3 + N_LAYERS
            if step % 500 == 0:
                run.log_metric("val/loss", loss * 1.1, step=step)
                calls += 1
            step += 1
        run.log_dict({"steps": step, "layers": N_LAYERS}, "summary.json")
    stats = run.stats()
    store = file_uri(uri) if "://" not in uri else uri
    per_call_us = in_calls / max(calls, 1) * 1e6
    noop_us = in_noop / max(step * (3 + N_LAYERS), 1) * 1e6
    ratio = per_call_us / noop_us if noop_us > 0 else math.nan
    try:
        load = f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        load = f"{os.cpu_count()} CPUs"
    print()
    print(f"steplog demo: {step} steps, {stats.written} points written ({calls} log calls), {stats.dropped} dropped")
    print(
        f"  per log_metric call: {per_call_us:.3f} µs on average, {ratio:.1f}x a no-op call of the same shape "
        f"timed beside it ({noop_us:.3f} µs; {load})"
    )
    print(f"  run:        {run.info.run_name} ({run.run_id}), status {run.info.status.name}")
    print(f"  experiment: {experiment} (id {run.experiment_id})")
    print(f"  store:      {store}")
    if store.startswith("file:"):
        run_dir = os.path.join(os.fspath(uri), run.experiment_id, run.run_id)
        print(f"  files:      {os.path.abspath(run_dir)}")
        print()
        print("Open it in MLflow's UI (MLflow 3.17 needs MLFLOW_ALLOW_FILE_STORE for a file store):")
        print(f"  MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store}")
        print("  (mlflow is installed by `make test`: use .venv/bin/mlflow, or `pip install mlflow`)")
        print(f"Or in the terminal: steplog show {run.run_id[:8]} --uri {uri}")
    return {
        "steps": step,
        "points": stats.written,
        "per_call_us": per_call_us,
        "noop_us": noop_us,
        "x_noop": ratio,
        "run_id": run.run_id,
    }
