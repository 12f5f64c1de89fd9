"""``ranks=``: processes of one job, started at the same instant, write one run or one parent with a child per rank.

Every rank is a real subprocess with a launcher's environment (torchrun's ``RANK``/``WORLD_SIZE``
or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``); a gate folder releases them together. The store
is read back with MLflow's own client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog import InvalidValueError
from steplog._jobs import job_key, parent_run_id, resolve_ranks
from steplog._ranks import Ranks

CHILD = Path(__file__).parent / "_children" / "long_job.py"
LAST_STEP = 49


def launcher_env(kind: str, rank: int, world: int, job: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "TORCHELASTIC"))}
    env.pop("LOCAL_RANK", None)
    for name in ("STEPLOG_RUN_ID", "MLFLOW_RUN_ID", "STEPLOG_SYSTEM_METRICS"):
        env.pop(name, None)
    if kind == "torchrun":
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), TORCHELASTIC_RUN_ID=job)
    else:
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank), SLURM_JOB_ID=job)
    return env


def run_job(tmp_path: Path, uri: str, experiment: str, mode: str, kind: str, world: int) -> list[str]:
    """Start ``world`` ranks released at one instant; their output lines."""
    gate = tmp_path / f"gate-{experiment}"
    gate.mkdir()
    job = f"job-{experiment}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), uri, experiment, mode, "0", str(LAST_STEP), str(gate)],
            env=launcher_env(kind, rank, world, job),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(gate.glob("ready-*"))) < world:
            assert time.monotonic() < deadline, "the ranks did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (gate / "go").touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    return [out.strip() for out, _err in outputs]


def runs_of(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], run_view_type=1))  # active runs only


CASES = [("torchrun", 2), ("torchrun", 4), ("slurm", 2), ("slurm", 4)]


@pytest.mark.parametrize(("kind", "world"), CASES)
def test_zero_mode_writes_one_run_from_rank_zero(tmp_path: Path, kind: str, world: int) -> None:
    """ranks='zero' (the default): exactly one run, rank 0's points, the other ranks write nothing."""
    import mlflow

    store = tmp_path / "mlruns"
    lines = run_job(tmp_path, str(store), f"zero-{kind}-{world}", "zero", kind, world)
    writes = sorted(word for line in lines for word in line.split() if word.startswith("writes="))
    assert writes == ["writes=False"] * (world - 1) + ["writes=True"]
    client = mlflow.MlflowClient(str(store))
    runs = runs_of(client, f"zero-{kind}-{world}")
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "x")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(LAST_STEP + 1)]


@pytest.mark.parametrize(("kind", "world"), CASES)
def test_each_mode_makes_one_parent_and_a_child_per_rank(tmp_path: Path, kind: str, world: int) -> None:
    """ranks='each': one parent for the job, one child per rank (tag steplog.rank) holding that rank's points."""
    import mlflow

    store = tmp_path / "mlruns"
    experiment = f"each-{kind}-{world}"
    run_job(tmp_path, str(store), experiment, "each", kind, world)
    client = mlflow.MlflowClient(str(store))
    runs = runs_of(client, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time is not None
    assert sorted(int(c.data.tags["steplog.rank"]) for c in children) == list(range(world))
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        rank = int(child.data.tags["steplog.rank"])
        history = client.get_metric_history(child.info.run_id, "x")
        assert [(m.step, m.value) for m in history] == [(s, s + rank / 100) for s in range(LAST_STEP + 1)]


@pytest.mark.parametrize("mode", ["zero", "each"])
def test_modes_against_a_tracking_server(tmp_path: Path, mlflow_server: Any, mode: str) -> None:
    """Two ranks on a real MLflow server: one run ('zero'), or one parent with two children ('each')."""
    import mlflow

    experiment = f"server-{mode}-{tmp_path.name}"
    run_job(tmp_path, mlflow_server.url, experiment, mode, "torchrun", 2)
    client = mlflow.MlflowClient(mlflow_server.url)
    runs = runs_of(client, experiment)
    if mode == "zero":
        assert len(runs) == 1
        assert len(client.get_metric_history(runs[0].info.run_id, "x")) == LAST_STEP + 1
        return
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [(r.info.run_id, r.data.tags) for r in runs]
    assert parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["steplog.rank"] for c in children) == ["0", "1"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "x")) == LAST_STEP + 1


def test_every_rank_derives_the_same_parent_id() -> None:
    """The job key (and so the local parent id) depends on the job, not on the rank."""
    keys = {
        job_key("e", Ranks(rank=r, world_size=4, local_rank=r, launcher="torchrun"), {"TORCHELASTIC_RUN_ID": "j1"})
        for r in range(4)
    }
    assert len(keys) == 1
    other = job_key("e", Ranks(rank=0, world_size=4, launcher="torchrun"), {"TORCHELASTIC_RUN_ID": "j2"})
    assert parent_run_id(keys.pop()) != parent_run_id(other)
    master = job_key("e", Ranks(rank=1, world_size=2, launcher="torchrun"), {"MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert "master:h:1" in master


def test_each_mode_without_a_job_identity_is_refused() -> None:
    """Without TORCHELASTIC_RUN_ID, SLURM_JOB_ID or MASTER_ADDR:MASTER_PORT the ranks cannot agree: a clear error."""
    with pytest.raises(InvalidValueError, match="TORCHELASTIC_RUN_ID, SLURM_JOB_ID"):
        job_key("e", Ranks(rank=0, world_size=2, launcher="torchrun"), {"TORCHELASTIC_RUN_ID": "none"})


def test_one_process_writes_whatever_the_mode() -> None:
    """Without a launcher (or with world size 1) the mode does not matter: the process writes its run."""
    assert resolve_ranks("zero", {})[0] == "off"
    assert resolve_ranks("each", {"RANK": "0", "WORLD_SIZE": "1"})[0] == "off"
    assert resolve_ranks(None, {"RANK": "1", "WORLD_SIZE": "2"})[0] == "zero"


def test_a_rank_that_does_not_write_still_checks_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 under ranks='zero': run.writes is False, nothing is written, bad input still raises."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with steplog.start_run("e", tracking_uri=tmp_path / "mlruns") as run:
        assert (run.writes, run.rank, run.world_size) == (False, 1, 2)
        run.log_metric("loss", 1.0, step=0)
        run.log_params({"lr": 1})
        with pytest.raises(steplog.ParamChangedError):
            run.log_params({"lr": 2})
        with pytest.raises(steplog.InvalidKeyError):
            run.log_metric("../x", 1.0)
    assert not (tmp_path / "mlruns").exists()
