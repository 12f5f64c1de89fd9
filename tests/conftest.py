"""Shared fixtures: async backends, a fresh store per test, and MLflow's real reader."""

from __future__ import annotations

import ast
import atexit
import functools
import importlib.util
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
def _no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
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


# ---------------------------------------------------------------------------- heavy dependencies
# The core suite runs without MLflow and torch: `pytest -m "not mlflow and not torch"` selects it
# in seconds, and `make test-min` runs it on the lowest versions pyproject.toml declares. Tests are
# marked here, from what their code uses, so no test file has to remember to mark itself: a test is
# marked `mlflow`/`torch` when it (or a module-level helper or fixture it uses, transitively) names
# the package, when it uses the `mlflow_client`/`mlflow_server` fixtures, or when its module imports
# the package at the top. A module that imports a missing package at the top is not collected.

# package -> marker: the framework integrations run on torch, so they are deselected with it
_HEAVY = {
    "mlflow": "mlflow",
    "torch": "torch",
    "lightning": "torch",
    "transformers": "torch",
    "accelerate": "torch",
    "keras": "torch",
    "MlflowServer": "mlflow",  # tests/_mlflow_server.py runs `mlflow server`
}
_FIXTURES = {"mlflow_client": "mlflow", "mlflow_server": "mlflow"}


def _names_used(node: ast.AST) -> set[str]:
    used: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            used.add(sub.id)
        elif isinstance(sub, ast.Import):
            used.update(alias.name.split(".")[0] for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
            used.add(sub.module.split(".")[0])
    return used


@functools.cache
def _module_needs(path: Path) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """What a test module needs at import, and per top-level function, transitively through helpers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    at_import: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            at_import |= _names_used(stmt) & _HEAVY.keys()
    functions: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            functions[stmt.name] = stmt
            if isinstance(stmt, ast.ClassDef):
                functions.update(
                    (f"{stmt.name}.{m.name}", m)
                    for m in stmt.body
                    if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                )
    used = {name: _names_used(fn) for name, fn in functions.items()}
    needs = {name: names & _HEAVY.keys() for name, names in used.items()}
    changed = True
    while changed:  # a helper that needs mlflow makes every function calling it need mlflow
        changed = False
        for name, names in used.items():
            for callee in names & functions.keys():
                if not needs[callee] <= needs[name]:
                    needs[name] |= needs[callee]
                    changed = True
    return frozenset(at_import), {name: frozenset(n) for name, n in needs.items()}


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        at_import, _ = _module_needs(collection_path)
        if any(_missing(package) for package in at_import if package.islower()):
            return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        at_import, per_function = _module_needs(path)
        function = getattr(item, "function", None)
        qualname = getattr(function, "__qualname__", item.name)
        needs = set(at_import) | per_function.get(qualname, frozenset())
        for fixture in getattr(item, "fixturenames", ()):
            needs |= per_function.get(fixture, frozenset())
            if fixture in _FIXTURES:
                needs.add(_FIXTURES[fixture])
        for marker in sorted({_HEAVY.get(package, package) for package in needs}):
            item.add_marker(getattr(pytest.mark, marker))
