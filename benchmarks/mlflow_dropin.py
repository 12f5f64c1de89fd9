"""The MLflow drop-in: what one unchanged ``mlflow.log_metric`` call costs, with and without ``steplog+``.

Contenders, side by side in one process, each a fresh run per round through MLflow's fluent API:

* ``file:`` — MLflow's own file store (``MLFLOW_TRACKING_URI=file:///...``);
* ``steplog+file:`` — the same folder through steplog's plugin;
* ``http:`` — a local ``mlflow server`` (sqlite, one worker) on 127.0.0.1;
* ``steplog+http:`` — the same server through the plugin.

The plain contenders start each round with no model-registry URI set, as in a process without the
plugin (the plugin names the registry MLflow would find anyway, see the README).

Per call: ``mlflow.log_metric(key, value, step=i)``, and ``mlflow.log_metrics(20 keys, step=i)``.
The clock runs over the calls only; the "with end_run" column adds the ``end_run()`` that
writes everything (steplog's barrier), spread over the calls. Rounds rotate the order;
figures are medians over rounds. ``--profile`` prints where a ``steplog+file:`` call's time
goes (cProfile, MLflow's client layer vs steplog).

    python benchmarks/mlflow_dropin.py [--quick | --smoke] [--profile] [--out DIR]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "mlflow_dropin"
TITLE = "MLflow's fluent API, unchanged: µs per call, plain MLflow vs steplog+"
KEYS20 = {f"m{i:02d}": 0.5 for i in range(20)}


def _register_plugin() -> None:
    """Make the steplog+ schemes known to MLflow even in a checkout installed before the entry points existed."""
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from steplog._mlflow_plugin import registry_store, tracking_store

    for scheme in ("steplog", "steplog+file", "steplog+http", "steplog+https"):
        _tracking_store_registry._registry.setdefault(scheme, tracking_store)
        _get_store_registry()._registry.setdefault(scheme, registry_store)


def measure(uri: str, n_metric: int, n_metrics: int) -> dict[str, float]:
    """µs per log_metric and per 20-key log_metrics call in a fresh run at ``uri``, and the same with end_run."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    mlflow.set_tracking_uri(uri)
    if not uri.startswith("steplog"):
        registry_utils._registry_uri = None  # as in a process that never used the plugin
    mlflow.set_experiment("bench-dropin")
    out: dict[str, float] = {}
    for what, n, call in (
        ("log_metric", n_metric, lambda i: mlflow.log_metric("loss", 1.0 / (i + 1), step=i)),
        ("log_metrics", n_metrics, lambda i: mlflow.log_metrics(KEYS20, step=i)),
    ):
        mlflow.start_run()
        call(0)  # the first call of a run imports and caches: not the steady state
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            call(i)
        t1 = time.perf_counter()
        mlflow.end_run()
        t2 = time.perf_counter()
        out[what] = (t1 - t0) / n * 1e6
        out[f"{what}+end"] = (t2 - t0) / n * 1e6
    return out


def profile(uri: str, n: int) -> None:
    """Print where ``n`` fluent log_metric calls at ``uri`` spend their time (top functions, cumulative)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-dropin")
    with mlflow.start_run():
        mlflow.log_metric("loss", 0.0, step=0)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(1, n + 1):
            mlflow.log_metric("loss", 1.0 / i, step=i)
        prof.disable()
    print(f"\ncProfile of {n} mlflow.log_metric calls at {uri} (cumulative, per call in µs):")
    stats = pstats.Stats(prof)
    rows = []
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((ct / n * 1e6, f"{Path(file).parent.name}/{Path(file).name}:{func}"))
    for cost, where in sorted(rows, reverse=True)[:25]:
        print(f"  {cost:9.1f}  {where}")


def run(mode: str, out: Path | None, *, chart: bool = True, with_profile: bool = False) -> dict[str, Any]:
    import mlflow

    _register_plugin()
    from rest import Server

    rounds = c.pick(mode, 1, 3, 7)
    n_fast = c.pick(mode, 20, 500, 2000)
    n_file = c.pick(mode, 10, 100, 300)
    n_server = c.pick(mode, 5, 20, 50)
    with tempfile.TemporaryDirectory(prefix="steplog-bench-dropin-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # for the plain file store contender
        server = Server(root / "server")
        try:
            file_uri = (root / "mlruns").as_uri()
            contenders: list[tuple[str, Callable[[], dict[str, float]]]] = [
                ("file:", lambda: measure(file_uri, n_file, n_file)),
                ("steplog+file:", lambda: measure(f"steplog+{file_uri}", n_fast, n_fast)),
                ("http: (local server)", lambda: measure(server.url, n_server, n_server)),
                ("steplog+http:", lambda: measure(f"steplog+{server.url}", n_fast, n_fast)),
            ]
            samples: dict[str, dict[str, list[float]]] = {name: {} for name, _ in contenders}
            for r in range(rounds):
                for name, fn in c.rotate(contenders, r):
                    for key, value in fn().items():
                        samples[name].setdefault(key, []).append(value)
            if with_profile:
                profile(f"steplog+{file_uri}", n_fast)
        finally:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
            server.stop()
    rows = [
        {"name": name, **{key: c.summary(values) for key, values in figures.items()}}
        for name, figures in samples.items()
    ]
    med = {
        name: {key: c.summary(values)["median"] for key, values in figures.items()} for name, figures in samples.items()
    }
    targets = []
    for what in ("log_metric", "log_metrics"):
        f_ratio = med["file:"][what] / med["steplog+file:"][what]
        s_ratio = med["http: (local server)"][what] / med["steplog+http:"][what]
        targets.append(
            c.target(f"{what}: steplog+file vs file", f_ratio, ">= 10x", f_ratio >= 10, f"{f_ratio:.1f}x faster")
        )
        targets.append(
            c.target(f"{what}: steplog+http vs server", s_ratio, ">= 100x", s_ratio >= 100, f"{s_ratio:.0f}x faster")
        )
    notes = [
        f"{rounds} rounds; calls per run: steplog {n_fast}, file {n_file}, server {n_server}",
        "the 'with end_run' figures include the end_run() that writes everything, spread over the calls",
    ]
    result = c.result_of(TITLE, mode, {"rows": rows}, targets=targets, notes=notes, packages=("steplog", "mlflow"))
    return c.report(NAME, result, out, _print, None)


def _print(result: dict[str, Any]) -> None:
    print(TITLE)
    headers = ["contender", "log_metric µs", "with end_run", "log_metrics(20) µs", "with end_run"]
    rows = []
    for r in result["rows"]:
        rows.append(
            [
                r["name"],
                *(
                    f"{c.fmt(r[k]['median'])} ({c.fmt(r[k]['min'])}-{c.fmt(r[k]['max'])})"
                    for k in ("log_metric", "log_metric+end", "log_metrics", "log_metrics+end")
                ),
            ]
        )
    print(c.table(headers, rows))
    c.print_footer(result)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with_profile = "--profile" in argv
    if with_profile:
        argv.remove("--profile")
    args = c.parse_args(TITLE, argv)
    run(args.mode, args.out, chart=not args.no_chart, with_profile=with_profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
