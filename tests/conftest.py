"""Shared fixtures: async backends, a fresh store per test, and MLflow's real reader."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Tests leave no files behind: no example database, and hypothesis's own caches go to a
# temporary directory removed at exit (not .hypothesis/ in the checkout).
settings.register_profile("steplog", database=None)
settings.load_profile("steplog")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="steplog-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

# MLflow 3.17 refuses to open a file store without this (MLFLOW_FORMAT.md §1.1).
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
os.environ.pop("STEPLOG_TRACKING_URI", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A path for a fresh mlruns store (not created yet, as on a new machine)."""
    return tmp_path / "mlruns"


@pytest.fixture
def mlflow_client(store: Path) -> Any:
    """MLflow 3.17's own client reading ``store`` (created lazily by the test's run first)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run runs inside pytest's process: leave its SIGINT/SIGTERM handling alone by default."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in before.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real ``mlflow server`` (sqlite, artifacts served) on 127.0.0.1, shared by the REST tests; stopped at exit."""
    from _mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
