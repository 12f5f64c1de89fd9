"""``mlflow migrate-filestore`` imports a steplog store into SQLite, and the SQLite store returns the same runs.

The store is built once per module (several runs and experiments, NaN/inf, nested keys, params, tags,
and logging that would write duplicate points if steplog did not drop them), migrated once, then
compared run by run. MLFLOW_FORMAT.md §4 lists what the SQL side changes: ±inf is clamped to
±1.7976931348623157e308, -0.0 becomes 0.0, and history is ordered by timestamp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mlflow.tracking import MlflowClient

import steplog

pytestmark = pytest.mark.slow  # one migration is a ~10 s subprocess on the shared machine

MAX = 1.7976931348623157e308
T0 = 1_700_000_000_000


@dataclasses.dataclass(frozen=True)
class Migrated:
    """A steplog store, the SQLite database it was migrated into, and the migration's output."""

    store: Path
    database: Path
    run_ids: list[str]
    returncode: int
    output: str

    @property
    def file_client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.store.as_uri())

    @property
    def sql_client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=f"sqlite:///{self.database}")


def log_training(run: steplog.Run, seed: int) -> None:
    """What one run logs: special values, nested keys, params, tags, and duplicate-prone logging."""
    run.log_params({"lr": 10.0**-seed, "seed": seed, "optimizer": "adamw"})
    run.set_tags({"team": "vision", "note": "multi\nline"})
    for step in range(30):
        run.log_metrics({"train/loss": 1.0 / (step + 1 + seed), "eval/acc/top1": step / 30}, step=step)
        run.log_metric("dup", 0.5, timestamp=T0 + step)  # the same point twice: written once
        run.log_metric("dup", 0.5, timestamp=T0 + step)
        run.log_metric("dup-default-time", 0.5)  # twice with the step's shared stamp: written once
        run.log_metric("dup-default-time", 0.5)
    for step, value in enumerate([math.nan, math.inf, -math.inf, -0.0, 5e-324, MAX]):
        run.log_metric("weird", value, step=step)
    run.log_metric("same-step", 1.0, step=40, timestamp=T0)
    run.log_metric("same-step", 2.0, step=40, timestamp=T0)  # another value at the same step and time: kept


def log_after_barrier(run: steplog.Run) -> None:
    """What a run logs after a flush: points identical to written ones, and points SQL cannot tell apart."""
    run.log_metric("same-step", 2.0, step=40, timestamp=T0)  # identical to one already written: dropped
    run.log_metric("zero", -0.0, step=1, timestamp=T0)
    run.log_metric("zero", 0.0, step=1, timestamp=T0)  # the same point to SQL (-0.0 is stored as 0.0): dropped
    run.log_metric("inf", math.inf, step=1, timestamp=T0)
    run.log_metric("inf", MAX, step=1, timestamp=T0)  # the same point to SQL (inf is clamped): dropped


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Migrated:
    """Build a store with sync and async runs in two experiments, then migrate it into SQLite once."""
    root = tmp_path_factory.mktemp("migrate")
    store = root / "mlruns"
    run_ids = []
    with steplog.start_run("train", run_name="first", tracking_uri=store) as run:
        log_training(run, 1)
        run.flush()
        log_after_barrier(run)
    run_ids.append(run.run_id)
    with contextlib.suppress(ValueError), steplog.start_run("train", tracking_uri=store) as run:
        log_training(run, 2)
        run.flush()
        log_after_barrier(run)
        raise ValueError("diverged")
    run_ids.append(run.run_id)

    async def async_run() -> str:
        async with steplog.start_run("eval", run_name="async", tracking_uri=store) as arun:
            log_training(arun, 3)
            await arun.aflush()
            log_after_barrier(arun)
        return arun.run_id

    run_ids.append(anyio.run(async_run, backend="trio"))
    database = root / "x.db"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    result = subprocess.run(
        [str(mlflow_cli), "migrate-filestore", "--source", str(store), "--target", f"sqlite:///{database}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"},
        cwd=root,
        check=False,
    )
    return Migrated(store, database, run_ids, result.returncode, result.stdout + result.stderr)


def sql_value(value: float) -> bytes:
    """What the SQL store gives back for a value, as bits: ±inf clamped, -0.0 as 0.0, every NaN as one NaN."""
    if value != value:
        value = math.nan
    elif math.isinf(value):
        value = math.copysign(MAX, value)
    elif value == 0.0:
        value = 0.0
    return struct.pack("<d", value)


def test_migration_succeeds(migrated: Migrated) -> None:
    """migrate-filestore accepts the steplog store (no duplicate points, no torn lines)."""
    assert 0 == migrated.returncode, migrated.output
    assert "Migration completed successfully" in migrated.output


def test_experiments_and_runs_are_the_same(migrated: Migrated) -> None:
    """The SQLite store has the same experiments and runs: ids, names, status, times, user, params and tags."""
    assert 0 == migrated.returncode, migrated.output
    file_client, sql_client = migrated.file_client, migrated.sql_client
    file_names = sorted(e.name for e in file_client.search_experiments())
    assert file_names == sorted(e.name for e in sql_client.search_experiments())
    assert ["Default", "eval", "train"] == file_names
    for run_id in migrated.run_ids:
        before, after = file_client.get_run(run_id), sql_client.get_run(run_id)
        fields = ("run_id", "run_name", "status", "start_time", "end_time", "user_id", "lifecycle_stage")
        assert [getattr(before.info, f) for f in fields] == [getattr(after.info, f) for f in fields]
        assert before.data.params == after.data.params
        assert before.data.tags == after.data.tags
    statuses = [sql_client.get_run(run_id).info.status for run_id in migrated.run_ids]
    assert ["FINISHED", "FAILED", "FINISHED"] == statuses


def test_every_point_is_the_same(migrated: Migrated) -> None:
    """Each metric history holds the same points in SQLite (with §4's clamping), ordered by timestamp there."""
    assert 0 == migrated.returncode, migrated.output
    file_client, sql_client = migrated.file_client, migrated.sql_client
    for run_id in migrated.run_ids:
        keys = set(file_client.get_run(run_id).data.metrics)
        assert keys == set(sql_client.get_run(run_id).data.metrics)
        assert {"train/loss", "eval/acc/top1", "dup", "weird", "same-step", "zero", "inf"} <= keys
        for key in keys:
            before = file_client.get_metric_history(run_id, key)
            after = sql_client.get_metric_history(run_id, key)
            expected = sorted((m.timestamp, m.step, sql_value(m.value)) for m in before)
            assert expected == sorted((m.timestamp, m.step, sql_value(m.value)) for m in after), key
            assert sorted(m.timestamp for m in after) == [m.timestamp for m in after], key


def test_duplicate_prone_logging_left_one_point_each(migrated: Migrated) -> None:
    """Identical points (and points SQL cannot tell apart) were written once; distinct values at a step were kept."""
    client = migrated.sql_client
    run_id = migrated.run_ids[0]
    assert list(range(30)) == [m.step for m in client.get_metric_history(run_id, "dup")]
    assert [1.0, 2.0] == sorted(m.value for m in client.get_metric_history(run_id, "same-step"))
    assert [0.0] == [m.value for m in client.get_metric_history(run_id, "zero")]
    assert [MAX] == [m.value for m in client.get_metric_history(run_id, "inf")]
    weird = [m.value for m in sorted(client.get_metric_history(run_id, "weird"), key=lambda m: m.step)]
    assert [sql_value(v) for v in [math.nan, MAX, -MAX, 0.0, 5e-324, MAX]] == [sql_value(v) for v in weird]
