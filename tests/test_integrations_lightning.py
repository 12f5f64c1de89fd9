"""SteplogLogger with a real Lightning Trainer and Fabric on CPU, read back by MLflow's own client."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import AttributeDict
from torch.utils.data import DataLoader, TensorDataset

import steplog
from steplog.integrations import IntegrationWarning
from steplog.integrations.lightning import SteplogLogger

pytestmark = [
    # Lightning's own advice for real training (more dataloader workers, a bigger logging interval) is noise here
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    # Lightning 2.6 on torch 2.13 uses a pytree class torch deprecated: theirs to fix
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

STEPS = 24


class TinyModule(LightningModule):
    """A 2-layer regression model; optionally raises at ``fail_at`` to end training with an error."""

    def __init__(self, lr: float = 0.05, fail_at: int | None = None, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams["fail_at"] is not None and self.global_step == self.hparams["fail_at"]:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        self.log("lr", self.hparams["lr"])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


def loader() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(STEPS * 4, 4, generator=gen), torch.randn(STEPS * 4, 1, generator=gen))
    return DataLoader(data, batch_size=4)


class Recorder(Logger):
    """Records what Lightning hands its loggers, to compare with what steplog wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[str, float, int | None]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.points += [(k, float(v), step) for k, v in metrics.items()]

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def trainer(logger: Any, tmp_path: Path, **kw: Any) -> Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "logger": logger,
    }
    options.update(kw)
    return Trainer(**options)


def only_run(client: Any) -> Any:
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert 1 == len(runs)
    return runs[0]


def test_trainer_points_read_back_at_the_steps_lightning_reported(
    store: Path, mlflow_client: Any, tmp_path: Path
) -> None:
    """Every point Lightning hands its loggers is in MLflow at the same step, with the hparams and FINISHED."""
    recorder = Recorder()
    logger = SteplogLogger("tiny", run_name="fit", tracking_uri=store)
    trainer(logger=[logger, recorder], tmp_path=tmp_path).fit(TinyModule(lr=0.05), loader())
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert "tiny" == mlflow_client.get_experiment(run.info.experiment_id).name
    assert run.info.run_id == logger.version
    assert {"lr": "0.05", "fail_at": "None"} == run.data.params
    assert len(recorder.points) >= 2 * STEPS
    for key in {k for k, _v, _s in recorder.points}:
        expected = [(v, s) for k, v, s in recorder.points if k == key]
        history = mlflow_client.get_metric_history(run.info.run_id, key)
        assert expected == [(m.value, m.step) for m in history], key


def test_training_error_ends_the_run_failed(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """An exception in training_step ends the run FAILED, with the points logged before it."""
    logger = SteplogLogger("tiny", tracking_uri=store)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(logger=logger, tmp_path=tmp_path).fit(TinyModule(fail_at=5), loader())
    run = only_run(mlflow_client)
    assert "FAILED" == run.info.status
    assert [0, 1, 2, 3, 4] == [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train/loss")]


def test_hyperparams_dict_namespace_attributedict_flattened_and_relogged(store: Path, mlflow_client: Any) -> None:
    """log_hyperparams takes dict, Namespace and AttributeDict, flattens with '/', and an unchanged param may repeat."""
    logger = SteplogLogger("hp", tracking_uri=store)
    logger.log_hyperparams({"model": {"width": 32, "act": {"name": "relu"}}, "lr": 0.1})
    logger.log_hyperparams(argparse.Namespace(batch_size=8, lr=0.1))
    logger.log_hyperparams(AttributeDict(seed=3, model={"width": 32}))
    logger.finalize("success")
    run = only_run(mlflow_client)
    expected = {"model/width": "32", "model/act/name": "relu", "lr": "0.1", "batch_size": "8", "seed": "3"}
    assert expected == run.data.params
    assert "FINISHED" == run.info.status


def test_values_mlflow_refuses_are_cut_mapped_or_skipped_with_one_warning_each(store: Path, mlflow_client: Any) -> None:
    """A 7000-char param is cut to 6000, a key with '@' is mapped, a str metric skipped: one warning each, no error."""
    logger = SteplogLogger("bad", tracking_uri=store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        logger.log_hyperparams({"prompt": "x" * 7000, "lr": 0.1})
        for step in range(3):
            logger.log_metrics({"loss@train": 1.0 + step, "phase": "warmup", "ok": 2.0}, step=step)  # type: ignore[dict-item]
        logger.log_hyperparams({"lr": 0.2})  # a changed param keeps its first value
    logger.finalize("success")
    messages = [str(w.message) for w in caught]
    assert 4 == len(messages), messages
    assert any("'prompt'" in m and "7000" in m for m in messages)
    assert any("'loss@train'" in m and "'loss_train'" in m for m in messages)
    assert any("'phase'" in m and "str" in m for m in messages)
    assert any("'lr'" in m for m in messages)
    run = only_run(mlflow_client)
    assert "x" * 6000 == run.data.params["prompt"]
    assert "0.1" == run.data.params["lr"]
    assert [(1.0, 0), (2.0, 1), (3.0, 2)] == [
        (m.value, m.step) for m in mlflow_client.get_metric_history(run.info.run_id, "loss_train")
    ]
    assert {"loss_train", "ok"} == set(run.data.metrics)


def test_only_rank_zero_writes(store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under a simulated rank 1 of 2 (RANK/WORLD_SIZE set) training runs and nothing is written."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = SteplogLogger("ranked", tracking_uri=store)
    trainer(logger=logger, tmp_path=tmp_path).fit(TinyModule(), loader())
    assert logger.run is None
    assert logger.version is None
    assert not store.exists()


def test_checkpoints_logged_under_checkpoints(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """log_checkpoints=True puts each checkpoint Lightning saves into the run's artifacts under checkpoints/."""
    logger = SteplogLogger("ckpt", tracking_uri=store, log_checkpoints=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=10, save_top_k=-1)
    trainer(logger=logger, tmp_path=tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(TinyModule(), loader())
    run = only_run(mlflow_client)
    names = sorted(Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints"))
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == names
    assert 2 == len(names)


def test_fabric_loggers(store: Path, mlflow_client: Any) -> None:
    """Fabric(loggers=[SteplogLogger]) logs with log_dict at the steps given and finalize ends the run."""
    logger = SteplogLogger("fabric", tracking_uri=store)
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[logger])
    fabric.logger.log_hyperparams({"lr": 0.1})
    for step in range(10):
        fabric.log_dict({"loss": 1.0 / (step + 1)}, step=step)
    fabric.log("acc", 0.5, step=9)
    logger.finalize("success")
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert list(range(10)) == [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "loss")]
    assert {"lr": "0.1"} == run.data.params
    assert [(0.5, 9)] == [(m.value, m.step) for m in mlflow_client.get_metric_history(run.info.run_id, "acc")]


def test_store_dir_names_the_store_and_default_checkpoints_stay_out_of_it(
    store: Path, mlflow_client: Any, tmp_path: Path
) -> None:
    """store_dir is the local store (None for a server); Lightning's default checkpoints land outside the store."""
    assert str(store) == SteplogLogger(tracking_uri=store.as_uri()).store_dir
    assert SteplogLogger(tracking_uri="http://127.0.0.1:1").store_dir is None
    logger = SteplogLogger("tiny", tracking_uri=store)
    trainer(logger=logger, tmp_path=tmp_path / "root", enable_checkpointing=True).fit(TinyModule(), loader())
    run = only_run(mlflow_client)
    assert 1 == len(list((tmp_path / "root" / "tiny" / run.info.run_id / "checkpoints").glob("*.ckpt")))
    assert {"0", run.info.experiment_id, ".trash"} >= {p.name for p in store.iterdir()}
    assert str(store / run.info.experiment_id / run.info.run_id) == logger.log_dir


def test_bad_options_fail_before_training(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo, a bad ranks, a garbled run id (argument or env) and an unidentifiable "each" job fail at construction."""
    with pytest.raises(TypeError, match="flush_intervall"):
        SteplogLogger(tracking_uri=store, flush_intervall=1.0)
    with pytest.raises(steplog.InvalidValueError, match="ranks"):
        SteplogLogger(tracking_uri=store, ranks="all")  # type: ignore[arg-type]
    with pytest.raises(steplog.InvalidValueError, match=r"run_id '\.\./x'"):
        SteplogLogger(tracking_uri=store, run_id="../x")
    monkeypatch.setenv("MLFLOW_RUN_ID", "../x")
    with pytest.raises(steplog.InvalidValueError, match="MLFLOW_RUN_ID"):
        SteplogLogger(tracking_uri=store)
    monkeypatch.delenv("MLFLOW_RUN_ID")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(steplog.InvalidValueError, match="TORCHELASTIC_RUN_ID"):
        SteplogLogger(tracking_uri=store, ranks="each")
    assert not store.exists()


def test_resume_by_run_id_continues_the_same_run(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """A second fit from the first's checkpoint with SteplogLogger(run_id=...) adds its points to the same run."""
    first, second = Recorder(), Recorder()
    logger = SteplogLogger("resume", tracking_uri=store)
    fit1 = trainer(logger=[logger, first], tmp_path=tmp_path)
    fit1.fit(TinyModule(), loader())
    fit1.save_checkpoint(tmp_path / "epoch1.ckpt")
    run_id = logger.version
    assert run_id is not None
    resumed = SteplogLogger("resume", tracking_uri=store, run_id=run_id)
    fit2 = trainer(logger=[resumed, second], tmp_path=tmp_path, max_epochs=2)
    fit2.fit(TinyModule(), loader(), ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert run_id == resumed.version
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert {"lr": "0.05", "fail_at": "None"} == run.data.params
    expected = [(v, s) for k, v, s in first.points + second.points if k == "train/loss"]
    assert list(range(2 * STEPS)) == [s for _v, s in expected]
    history = mlflow_client.get_metric_history(run_id, "train/loss")
    assert expected == [(m.value, m.step) for m in history]


def test_each_rank_writes_a_child_run_of_one_parent(
    store: Path, mlflow_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ranks="each" under a simulated 2-rank torchrun job, each rank's fit writes a child of one parent.

    Checkpoints (log_checkpoints=True) go into rank 0's child only: Lightning saves them on rank 0.
    """
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    recorders = {}
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        recorders[rank] = Recorder()
        logger = SteplogLogger("ddp", run_name="fit", tracking_uri=store, ranks="each", log_checkpoints=True)
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpts-{rank}", every_n_train_steps=10, save_top_k=-1)
        trainer(logger=[logger, recorders[rank]], tmp_path=tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(
            TinyModule(), loader()
        )
        assert logger.run is not None
        assert (True, rank) == (logger.run.writes, logger.run.rank)
    runs = [r for e in mlflow_client.search_experiments() for r in mlflow_client.search_runs([e.experiment_id])]
    assert 3 == len(runs)
    children = {r.data.tags.get("steplog.rank"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {"0", "1"} == set(children)
    assert "FINISHED" == parent.info.status
    for rank, recorder in recorders.items():
        child = children[str(rank)]
        assert parent.info.run_id == child.data.tags["mlflow.parentRunId"]
        assert (f"fit-{rank}", "FINISHED") == (child.info.run_name, child.info.status)
        expected = [(v, s) for k, v, s in recorder.points if k == "train/loss"]
        assert STEPS == len(expected)
        history = mlflow_client.get_metric_history(child.info.run_id, "train/loss")
        assert expected == [(m.value, m.step) for m in history]
        checkpoints = mlflow_client.list_artifacts(child.info.run_id, "checkpoints")
        assert (2 if rank == 0 else 0) == len(checkpoints)  # one copy, in rank 0's run


def test_no_warning_for_clean_input(store: Path) -> None:
    """Clean params and metrics give no IntegrationWarning."""
    logger = SteplogLogger("clean", tracking_uri=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrationWarning)
        logger.log_hyperparams({"a": 1})
        logger.log_metrics({"m": 1.0, "n": 2}, step=0)
    logger.finalize("success")


class Evaluated(TinyModule):
    """TinyModule with a test step, for trainer.test() after trainer.fit()."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_trainer_test_after_fit_resumes_the_finalized_run(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """trainer.test() after fit() (which finalized the run) logs into the same run, ended FINISHED again, no warning."""
    logger = SteplogLogger("after", tracking_uri=store)
    fitted = trainer(logger=logger, tmp_path=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrationWarning)
        model = Evaluated()
        fitted.fit(model, loader())
        run_id = logger.version
        assert logger.run is not None
        assert logger.run.closed
        fitted.test(model, dataloaders=loader(), verbose=False)
    assert run_id == logger.version
    assert logger.experiment.closed  # reading the finalized run does not reopen it
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert {"train/loss", "lr", "test/loss"} <= set(run.data.metrics)
    assert STEPS == len(mlflow_client.get_metric_history(run_id, "train/loss"))
    assert 1 == len(mlflow_client.get_metric_history(run_id, "test/loss"))


def test_logging_after_finalize_reopens_the_run_without_rewinding_again(store: Path, mlflow_client: Any) -> None:
    """A log call after finalize resumes the run by id; a rewind_to_step given for the first open is not repeated."""
    first = SteplogLogger("after", tracking_uri=store)
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("success")
    run_id = first.version
    assert run_id is not None
    logger = SteplogLogger("after", tracking_uri=store, run_id=run_id, rewind_to_step=1)
    logger.log_metrics({"loss": 20.0}, step=2)  # steps 2 and 3 of the first logger are gone
    logger.finalize("success")
    logger.log_metrics({"loss": 30.0}, step=3)  # reopened: step 2 stays
    logger.finalize("success")
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert [(0.0, 0), (1.0, 1), (20.0, 2), (30.0, 3)] == [
        (m.value, m.step) for m in mlflow_client.get_metric_history(run_id, "loss")
    ]


def test_a_failed_reopen_after_finalize_warns_once_and_skips(store: Path, mlflow_client: Any) -> None:
    """When the finalized run cannot be resumed (here: removed), later log calls warn once and are skipped."""
    import shutil

    logger = SteplogLogger("after", tracking_uri=store)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    run = only_run(mlflow_client)
    shutil.rmtree(store / run.info.experiment_id / run.info.run_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        logger.log_metrics({"loss": 2.0}, step=1)
        logger.log_metrics({"loss": 3.0}, step=2)
    assert 1 == len(caught), [str(w.message) for w in caught]
    assert "could not be reopened" in str(caught[0].message)
