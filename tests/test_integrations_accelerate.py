"""SteplogTracker with a real Accelerator on CPU, read back by MLflow's own client."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from steplog.integrations import IntegrationWarning
from steplog.integrations.accelerate import SteplogTracker

STEPS = 30


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    """Accelerate keeps its process state in class-level singletons: each test starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def only_run(client: Any) -> Any:
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert 1 == len(runs)
    return runs[0]


def train(tracker: SteplogTracker, config: dict[str, Any], first_step: int = 0) -> list[tuple[float, int]]:
    """A 2-layer model trained for STEPS steps with accelerator.log; returns the (loss, step) pairs logged."""
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("tiny", config=config)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    logged: list[tuple[float, int]] = []
    for step in range(STEPS):
        x, y = torch.randn(4, 4), torch.randn(4, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        logged.append((loss.item(), step))
        accelerator.log({"loss": loss.item(), "lr": 0.05}, step=first_step + step)
    accelerator.end_training()
    return logged


def test_accelerator_points_and_config_read_back(store: Path, mlflow_client: Any) -> None:
    """Every accelerator.log number is in MLflow at its step, the config is params, and end_training finishes it."""
    tracker = SteplogTracker("accel", run_name="tiny", tracking_uri=store)
    logged = train(tracker, {"lr": 0.05, "model": {"width": 8}, "note": None})
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert tracker.tracker is not None
    assert run.info.run_id == tracker.tracker.run_id
    assert {"lr": "0.05", "model/width": "8", "note": "None"} == run.data.params
    assert logged == [(m.value, m.step) for m in mlflow_client.get_metric_history(run.info.run_id, "loss")]


def test_strings_skipped_with_one_warning(store: Path, mlflow_client: Any) -> None:
    """A str among the logged values is skipped with one warning naming it; the numbers are kept."""
    tracker = SteplogTracker("accel", tracking_uri=store)
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        for step in range(3):
            accelerator.log({"phase": "warmup", "loss": 1.0}, step=step)
    assert 1 == len(caught)
    assert "'phase'" in str(caught[0].message)
    accelerator.end_training()
    run = only_run(mlflow_client)
    assert {"loss"} == set(run.data.metrics)


def test_only_the_main_process_writes(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a simulated rank 1 of 2 (SLURM_PROCID/SLURM_NTASKS) training runs and nothing is written."""
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    tracker = SteplogTracker("accel", tracking_uri=store)
    train(tracker, {"lr": 0.05})
    assert tracker.tracker is None
    assert not store.exists()


def test_finish_failed(store: Path, mlflow_client: Any) -> None:
    """finish("FAILED") ends the run FAILED."""
    tracker = SteplogTracker("accel", tracking_uri=store)
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("tiny")
    accelerator.log({"loss": 1.0}, step=0)
    tracker.finish("FAILED")
    assert "FAILED" == only_run(mlflow_client).info.status


def test_resume_by_run_id_in_a_second_training(store: Path, mlflow_client: Any) -> None:
    """SteplogTracker(run_id=...) in a second training adds its points to the first run, which ends FINISHED."""
    tracker = SteplogTracker("accel", tracking_uri=store)
    first = train(tracker, {"lr": 0.05})
    assert tracker.tracker is not None
    run_id = tracker.tracker.run_id
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = SteplogTracker("accel", tracking_uri=store, run_id=run_id)
    second = [(v, s + STEPS) for v, s in train(resumed, {"lr": 0.05}, first_step=STEPS)]
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert {"lr": "0.05"} == run.data.params
    assert first + second == [(m.value, m.step) for m in mlflow_client.get_metric_history(run_id, "loss")]


def test_each_rank_writes_a_child_run_when_the_tracker_is_called_on_every_process(
    store: Path, mlflow_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ranks="each" (SLURM job, 2 tasks), a tracker used on each process writes one child run per rank."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for rank in (0, 1):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        tracker = SteplogTracker("accel", run_name="job", tracking_uri=store, ranks="each")
        tracker.start()
        tracker.log({"loss": float(rank)}, step=0)
        tracker.finish()
    runs = [r for e in mlflow_client.search_experiments() for r in mlflow_client.search_runs([e.experiment_id])]
    children = {r.data.tags.get("steplog.rank"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert 3 == len(runs)
    assert {"0", "1"} == set(children)
    assert 1 == len({c.data.tags["mlflow.parentRunId"] for c in children.values()})
    assert [0.0, 1.0] == [children[r].data.metrics["loss"] for r in ("0", "1")]
