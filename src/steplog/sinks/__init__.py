"""Destinations for a run's data, each behind the :class:`steplog.typing.Sink` protocol.

* :class:`MlrunsSink`: the local MLflow file store (``./mlruns``).
* :class:`SqliteSink`: MLflow's SQLite database (``sqlite:///mlflow.db``).
* ``MlflowRestSink`` (``steplog.sinks.mlflow_rest``, extra ``rest``): an MLflow tracking server.
"""

from __future__ import annotations

from .mlruns import MlrunsSink as MlrunsSink
from .sqlite import SqliteSink as SqliteSink

__all__ = ["MlrunsSink", "SqliteSink"]
