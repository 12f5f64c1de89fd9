"""The entry points MLflow loads for ``steplog+<uri>`` tracking URIs (the ``steplog[mlflow]`` extra).

MLflow imports this module while its own tracking package is still being imported
(``TrackingStoreRegistry.register_entrypoints``), for every installed entry point, in
every process that uses MLflow. So it imports nothing here; the store classes live in
:mod:`steplog._mlflow_store`, imported when MLflow first builds a store for one of
steplog's schemes.

Schemes (see the README, "Already using MLflow?"):

* ``steplog+file:///abs/mlruns``, ``steplog+file:relative/mlruns``: the local file store;
* ``steplog+http://host:5000``, ``steplog+https://...``: an MLflow tracking server;
* ``steplog:`` alone: ``./mlruns`` (``steplog:<path>`` names another folder).
"""

from __future__ import annotations

from typing import Any

__all__ = ["registry_store", "tracking_store"]


def tracking_store(store_uri: str, artifact_uri: str | None = None) -> Any:
    """Build MLflow's tracking store for a ``steplog+<uri>`` URI (called by MLflow's registry, once per URI)."""
    from ._mlflow_store import make_tracking_store

    return make_tracking_store(store_uri, artifact_uri)


def registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """Build MLflow's model-registry store for a ``steplog+<uri>`` URI: MLflow's own store for ``<uri>``."""
    from ._mlflow_store import make_registry_store

    return make_registry_store(store_uri, tracking_uri)
