"""The database steplog creates is the one MLflow 3.17 creates; unknown schemas are refused with what to do."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import steplog
from steplog import StepLogError
from steplog._sqlite_schema import REVISION
from steplog.store import StoreError

pytestmark = pytest.mark.mlflow  # MLflow creates the reference database (scripts/gen_sqlite_schema.py)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_sqlite_schema.py"


def gen_script() -> ModuleType:
    """``scripts/gen_sqlite_schema.py`` as a module (its ``normalized`` and ``mlflow_database``)."""
    spec = importlib.util.spec_from_file_location("gen_sqlite_schema", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steplog_database(folder: Path) -> Path:
    """A database created by steplog (one run logged)."""
    db = folder / "steplog.db"
    with steplog.start_run("Default", tracking_uri=f"sqlite:///{db}") as run:
        run.log_metric("x", 1.0)
    return db


def test_created_database_equals_mlflows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables, columns, indexes, triggers, revision, seeded rows and the Default experiment equal MLflow 3.17's."""
    gen = gen_script()
    monkeypatch.chdir(tmp_path)
    ours = steplog_database(tmp_path)
    (tmp_path / "m").mkdir()
    theirs = gen.mlflow_database(str(tmp_path / "m"))
    assert REVISION == gen.normalized(theirs)["revision"]
    assert gen.normalized(theirs) == gen.normalized(ours)

    def seeded(db: Path) -> tuple[object, ...]:
        con = sqlite3.connect(db)
        try:
            default = con.execute(
                "SELECT experiment_id, name, lifecycle_stage, workspace, creation_time = last_update_time, "
                "artifact_location FROM experiments WHERE experiment_id = 0"
            ).fetchone()
            return default[:-1], default[-1].rsplit("/", 2)[1:], con.execute("SELECT * FROM workspaces").fetchall()
        finally:
            con.close()

    assert seeded(theirs) == seeded(ours)


def test_mlflow_opens_and_upgrades_the_database(tmp_path: Path) -> None:
    """``mlflow db upgrade`` accepts a database steplog created (it is at MLflow's head: nothing to do)."""
    db = steplog_database(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert 0 == done.returncode, done.stderr
    con = sqlite3.connect(db)
    assert [(REVISION,)] == con.execute("SELECT version_num FROM alembic_version").fetchall()
    assert [("ok",)] == con.execute("PRAGMA integrity_check").fetchall()
    con.close()


def test_unknown_revision_is_refused_naming_it(tmp_path: Path) -> None:
    """A database at a revision steplog does not know is refused, naming the revision and `mlflow db upgrade`."""
    db = steplog_database(tmp_path)
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'f00dfeed1234'")
    con.commit()
    con.close()
    with pytest.raises(StepLogError, match=r"'f00dfeed1234'.*mlflow db upgrade"):
        steplog.start_run("x", tracking_uri=f"sqlite:///{db}")


def test_a_database_that_is_not_mlflows_is_refused(tmp_path: Path) -> None:
    """Another program's SQLite file is neither written to nor read as MLflow's."""
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StepLogError, match="not MLflow's"):
        steplog.start_run("x", tracking_uri=f"sqlite:///{db}")
    with pytest.raises(StoreError, match="not MLflow's"):
        steplog.Store(f"sqlite:///{db}")
    con = sqlite3.connect(db)
    assert [("notes",)] == con.execute("SELECT name FROM sqlite_master").fetchall()
    con.close()


def test_store_refuses_a_missing_database_without_creating_it(tmp_path: Path) -> None:
    """Reading a database that does not exist is a StoreError and leaves no file behind."""
    with pytest.raises(StoreError, match="does not exist"):
        steplog.Store(f"sqlite:///{tmp_path / 'none.db'}")
    assert [] == list(tmp_path.iterdir())
