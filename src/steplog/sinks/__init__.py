"""Destinations for a run's data, each behind the :class:`steplog.typing.Sink` protocol.

* :class:`MlrunsSink`: the local MLflow file store (``./mlruns``).
* ``MlflowRestSink`` (``steplog.sinks.mlflow_rest``, extra ``rest``): an MLflow tracking server.
"""

from __future__ import annotations

from .mlruns import MlrunsSink as MlrunsSink

__all__ = ["MlrunsSink"]
