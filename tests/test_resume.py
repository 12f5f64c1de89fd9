"""Resuming a run by id (``run_id=``, ``STEPLOG_RUN_ID``, ``MLFLOW_RUN_ID``) and rewinding it (``rewind_to_step``).

The kill tests use real subprocesses (``tests/_children/long_job.py``) killed with SIGKILL; the
store is read back with MLflow's own client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog import InvalidValueError, ParamChangedError, StepLogError
from steplog._resume import find_local_run, rewind_local_run

CHILD = Path(__file__).parent / "_children" / "long_job.py"


def child_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "STEPLOG_RUN_ID", "MLFLOW_RUN_ID", "TORCHELASTIC")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def start_and_kill(store: Path, first: int, last: int, run_id: str = "-", rewind: str = "-") -> str:
    """A child logs steps first..last, flushes, says ready; it is then SIGKILLed. The run id."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(store), "jobs", "hang", str(first), str(last), "-", run_id, rewind],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.communicate()[1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    return line.split()[1]


def finish(store: Path, first: int, last: int, run_id: str, rewind: str = "-") -> None:
    done = subprocess.run(
        [sys.executable, str(CHILD), str(store), "jobs", "off", str(first), str(last), "-", run_id, rewind],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def steps_of(store: Path, run_id: str) -> list[int]:
    import mlflow

    return [m.step for m in mlflow.MlflowClient(str(store)).get_metric_history(run_id, "x")]


def test_a_killed_run_resumed_by_id_holds_each_point_once(tmp_path: Path) -> None:
    """SIGKILL mid-run, resume by id from the next step: the history is 0..59 exactly once, and the run FINISHED."""
    import mlflow

    store = tmp_path / "mlruns"
    run_id = start_and_kill(store, 0, 29)
    finish(store, 30, 59, run_id)
    assert steps_of(store, run_id) == list(range(60))
    run = mlflow.MlflowClient(str(store)).get_run(run_id)
    assert (run.info.status, run.data.params) == ("FINISHED", {"lr": "0.1"})
    assert len(mlflow.MlflowClient(str(store)).search_runs([run.info.experiment_id])) == 1


def test_a_restart_from_a_checkpoint_with_rewind_has_no_step_twice(tmp_path: Path) -> None:
    """Killed at step 39, restarted from the checkpoint of step 19 with rewind_to_step=19: each step once."""
    import mlflow

    store = tmp_path / "mlruns"
    run_id = start_and_kill(store, 0, 39)
    finish(store, 20, 49, run_id, rewind="19")
    assert steps_of(store, run_id) == list(range(50))
    tags = mlflow.MlflowClient(str(store)).get_run(run_id).data.tags
    assert tags["steplog.rewind"].startswith("19 at ")


def test_resume_reopens_the_run_and_continues_its_step(tmp_path: Path) -> None:
    """A resumed run is RUNNING with no end time; step=None continues from the largest step; params are kept."""
    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store) as first:
        first.log_params({"lr": 0.1})
        first.log_metric("loss", 1.0, step=7)
    reader = steplog.Store(store)
    assert reader.get_run(first.run_id).end_time is not None
    with steplog.start_run("e", tracking_uri=store, run_id=first.run_id) as again:
        data = reader.get_run(first.run_id)
        assert (data.status, data.end_time) == (steplog.RunStatus.RUNNING, None)
        again.log_params({"lr": 0.1})  # the same value: accepted
        with pytest.raises(ParamChangedError, match="'lr'"):
            again.log_param("lr", 0.2)
        again.log_metric("loss", 2.0)  # step=None: the run's largest step
    assert [(p.step, p.value) for p in reader.metric_history(first.run_id, "loss")] == [(7, 1.0), (7, 2.0)]
    assert reader.get_run(first.run_id).status is steplog.RunStatus.FINISHED


@pytest.mark.parametrize("variable", ["STEPLOG_RUN_ID", "MLFLOW_RUN_ID"])
def test_the_run_id_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Without run_id=, STEPLOG_RUN_ID (then MLFLOW_RUN_ID) names the run to resume."""
    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store) as first:
        first.log_metric("loss", 1.0, step=0)
    monkeypatch.setenv(variable, first.run_id)
    with steplog.start_run("e", tracking_uri=store) as again:
        again.log_metric("loss", 2.0, step=1)
    assert again.run_id == first.run_id
    assert len(steplog.Store(store).metric_history(first.run_id, "loss")) == 2
    with steplog.start_run("e", tracking_uri=store, run_id="") as fresh:  # "": a new run, whatever the environment
        fresh.log_metric("loss", 3.0, step=0)
    assert fresh.run_id != first.run_id
    assert [3.0] == list(steplog.Store(store).metric_history(fresh.run_id, "loss").values)


def test_unknown_and_malformed_run_ids_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown id names the destination; an id that could escape the store is refused before any path is built."""
    store = tmp_path / "mlruns"
    with pytest.raises(StepLogError, match=f"does not exist in {store}"):
        steplog.start_run("e", tracking_uri=store, run_id="ab" * 16)
    for bad in ("../x", "a/b", "x" * 300, ".hidden"):
        with pytest.raises(InvalidValueError, match="run id"):
            steplog.start_run("e", tracking_uri=store, run_id=bad)
    monkeypatch.setenv("MLFLOW_RUN_ID", "../../etc")
    with pytest.raises(InvalidValueError, match="MLFLOW_RUN_ID"):
        steplog.start_run("e", tracking_uri=store)
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with pytest.raises(InvalidValueError, match="rewind_to_step needs"):
        steplog.start_run("e", tracking_uri=store, rewind_to_step=3)
    assert list(tmp_path.iterdir()) == []  # a refused resume creates nothing


def test_a_rewind_interrupted_between_files_leaves_each_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the first file's rename: that file is rewound, the other is untouched; a rerun finishes."""
    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store) as run:
        for step in range(10):
            run.log_metrics({"a": float(step), "b": float(step)}, step=step)
    run_dir = find_local_run(store, run.run_id)
    assert run_dir is not None
    before = {k: (run_dir / "metrics" / k).read_bytes() for k in ("a", "b")}
    real_replace = os.replace
    calls: list[Any] = []

    def crash_on_second(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        rewind_local_run(run_dir, 4)
    monkeypatch.setattr(os, "replace", real_replace)
    reader = steplog.Store(store)
    histories = {k: list(reader.metric_history(run.run_id, k).steps) for k in ("a", "b")}
    assert sorted(histories.values()) == [list(range(5)), list(range(10))]
    untouched = next(k for k in ("a", "b") if histories[k] == list(range(10)))
    assert (run_dir / "metrics" / untouched).read_bytes() == before[untouched]
    assert not list(run_dir.glob(".steplog-tmp-*"))
    rewind_local_run(run_dir, 4)
    assert [list(reader.metric_history(run.run_id, k).steps) for k in ("a", "b")] == [list(range(5))] * 2


def test_rewind_is_refused_on_a_tracking_server(mlflow_server: Any) -> None:
    """A server cannot delete points: rewind_to_step is refused at start, saying what to do instead."""
    with pytest.raises(InvalidValueError, match="parent_run_id"):
        steplog.start_run("e", tracking_uri=mlflow_server.url, run_id="ab" * 16, rewind_to_step=3)


def test_resume_on_a_tracking_server(mlflow_server: Any) -> None:
    """Against a real server: the run is RUNNING again, params kept, step=None continues, FINISHED at the end."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.url)
    with steplog.start_run("resume-rest", tracking_uri=mlflow_server.url) as first:
        first.log_params({"lr": 0.1})
        first.log_metric("loss", 1.0, step=5)
    with steplog.start_run("resume-rest", tracking_uri=mlflow_server.url, run_id=first.run_id) as again:
        assert client.get_run(first.run_id).info.status == "RUNNING"
        again.log_params({"lr": 0.1})
        with pytest.raises(ParamChangedError):
            again.log_param("lr", 0.3)
        again.log_metric("loss", 2.0)
    history = client.get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 1.0), (5, 2.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    with pytest.raises(StepLogError, match="does not exist on"):
        steplog.start_run("resume-rest", tracking_uri=mlflow_server.url, run_id="cd" * 16)


def test_parent_run_id_makes_a_child_run(tmp_path: Path) -> None:
    """parent_run_id= sets mlflow.parentRunId, which MLflow's UI nests by; a malformed id is refused."""
    import mlflow

    store = tmp_path / "mlruns"
    with (
        steplog.start_run("e", tracking_uri=store) as parent,
        steplog.start_run("e", tracking_uri=store, parent_run_id=parent.run_id) as child,
    ):
        pass
    assert mlflow.MlflowClient(str(store)).get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    with pytest.raises(InvalidValueError, match="parent_run_id"):
        steplog.start_run("e", tracking_uri=store, parent_run_id="../up")


@pytest.mark.anyio
async def test_resume_in_async_code(tmp_path: Path) -> None:
    """``async with start_run(run_id=...)`` resumes too (asyncio and trio): same id, step continues, FINISHED."""
    store = tmp_path / "mlruns"
    async with steplog.start_run("e", tracking_uri=store) as first:
        first.log_metric("loss", 1.0, step=4)
    async with steplog.start_run("e", tracking_uri=store, run_id=first.run_id) as again:
        again.log_metric("loss", 2.0)
    assert again.run_id == first.run_id
    reader = steplog.Store(store)
    assert [(p.step, p.value) for p in reader.metric_history(first.run_id, "loss")] == [(4, 1.0), (4, 2.0)]
    assert reader.get_run(first.run_id).status is steplog.RunStatus.FINISHED


def test_resume_on_a_server_with_a_local_mirror(tmp_path: Path, mlflow_server: Any) -> None:
    """Server first, local store second: the mirror finds its experiment by name (a server's ids mean nothing there)."""
    store = tmp_path / "mirror"
    uris = [mlflow_server.url, str(store)]
    with steplog.start_run("mirrored", tracking_uri=uris) as first:
        first.log_metric("loss", 1.0, step=0)
    with steplog.start_run("mirrored", tracking_uri=uris, run_id=first.run_id) as again:
        again.log_metric("loss", 2.0, step=1)
    reader = steplog.Store(store)
    assert list(reader.metric_history(first.run_id, "loss").steps) == [0, 1]
    assert reader.get_run(first.run_id).status is steplog.RunStatus.FINISHED
