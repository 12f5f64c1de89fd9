"""A child for the MLflow drop-in's exit tests: unchanged MLflow code, ended in different ways.

Usage: ``mlflow_endings.py <tracking_uri> <ending>``

Logs params, a tag and ``STEPS`` steps of two metrics with the fluent API, then ends by
``ending``: ``end_run`` (``mlflow.end_run("KILLED")``), ``exit`` (falls off the end: MLflow's
and steplog's exit hooks end the run), ``crash`` (an uncaught RuntimeError), ``sigterm``
(sends itself SIGTERM, what a scheduler does). Prints the run id first. With a
``steplog+`` URI the runs use ``flush_interval=60``, so whatever is in the store afterwards
was written by the ending, not by the writer's timer.
"""

from __future__ import annotations

import os
import signal
import sys

import mlflow

STEPS = 200


def register_plugin() -> None:
    """Make steplog's schemes known where steplog was installed before its entry points existed."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from steplog._mlflow_plugin import tracking_store

    for scheme in ("steplog", "steplog+file", "steplog+http", "steplog+https"):
        _tracking_store_registry._registry.setdefault(scheme, tracking_store)


def main() -> None:
    uri, ending = sys.argv[1], sys.argv[2]
    register_plugin()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("steplog"):
        from mlflow.tracking._tracking_service.utils import _get_store

        _get_store(uri).run_options["flush_interval"] = 60.0
    mlflow.set_experiment("dropin")
    run = mlflow.start_run(run_name="child")
    print(run.info.run_id, flush=True)
    mlflow.log_params({"lr": 0.001, "layers": 3})
    mlflow.set_tag("ending", ending)
    for step in range(STEPS):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"acc": step / STEPS, "lr": 0.001}, step=step)
    if ending == "end_run":
        mlflow.end_run("KILLED")
    elif ending == "crash":
        raise RuntimeError("training diverged")
    elif ending == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the default action ends the process before this returns


if __name__ == "__main__":
    main()
