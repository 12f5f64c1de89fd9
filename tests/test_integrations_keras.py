"""SteplogCallback with real Keras 3 on the torch backend (CPU), read back by MLflow's own client."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported: no TensorFlow here

import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from steplog.integrations import IntegrationWarning
from steplog.integrations.keras import SteplogCallback

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BATCHES = 12  # per epoch
EPOCHS = 2


class Recorder(keras.callbacks.Callback):  # type: ignore[misc]
    """Records the logs Keras hands its callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches.append(dict(logs))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(dict(logs))


def fit(callbacks: list[Any], **kw: Any) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BATCHES * 4, 4)), rng.normal(size=(BATCHES * 4, 1))
    model.fit(x, y, batch_size=4, epochs=kw.pop("epochs", EPOCHS), verbose=0, callbacks=callbacks, **kw)


def only_run(client: Any) -> Any:
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert 1 == len(runs)
    return runs[0]


def test_batch_and_epoch_metrics_and_params_read_back(store: Path, mlflow_client: Any) -> None:
    """Batch metrics every n batches at the global batch index, epoch metrics at the epoch, params, FINISHED."""
    recorder = Recorder()
    fit([recorder, SteplogCallback("keras", tracking_uri=store, log_every_n_steps=5)])
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert pytest.approx(0.05) == float(run.data.params["optimizer_learning_rate"])  # float32 in Keras
    assert str(EPOCHS) == run.data.params["epochs"]
    run_id = run.info.run_id
    expected_batches = [(logs["loss"], i) for i, logs in enumerate(recorder.batches) if i % 5 == 0]
    assert [0, 5, 10, 15, 20] == [s for _v, s in expected_batches]
    assert expected_batches == [(m.value, m.step) for m in mlflow_client.get_metric_history(run_id, "batch/loss")]
    for key in ("loss", "mae"):
        expected = [(logs[key], epoch) for epoch, logs in enumerate(recorder.epochs)]
        assert expected == [(m.value, m.step) for m in mlflow_client.get_metric_history(run_id, key)], key


def test_only_rank_zero_writes(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a simulated rank 1 of 2 (RANK/WORLD_SIZE set) fit runs and nothing is written."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    callback = SteplogCallback("keras", tracking_uri=store)
    fit([callback])
    assert callback.run is None
    assert not store.exists()


def test_close_failed_after_fit_raises(store: Path, mlflow_client: Any) -> None:
    """When fit raises, close("FAILED") ends the run FAILED with the batches logged before the error."""

    class Boom(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 3:
                raise RuntimeError("boom")

    callback = SteplogCallback("keras", tracking_uri=store)
    with pytest.raises(RuntimeError, match="boom"):
        fit([callback, Boom()])
    callback.close("FAILED")
    run = only_run(mlflow_client)
    assert "FAILED" == run.info.status
    assert [0, 1, 2, 3] == [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "batch/loss")]


def test_resume_by_run_id_with_initial_epoch_continues_the_history(store: Path, mlflow_client: Any) -> None:
    """A second fit with run_id and initial_epoch adds epochs 2-3 and batches 24-47 to the first run, FINISHED."""
    first, second = Recorder(), Recorder()
    callback = SteplogCallback("keras", tracking_uri=store)
    fit([first, callback])
    assert callback.run is not None
    run_id = callback.run.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        resumed = SteplogCallback("keras", tracking_uri=store, run_id=run_id)
        fit([second, resumed], epochs=2 * EPOCHS, initial_epoch=EPOCHS)
    messages = [str(w.message) for w in caught]
    assert any("param 'epochs' keeps its first value" in m for m in messages), messages  # 2 then 4
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    batches = [logs["loss"] for logs in first.batches + second.batches]
    assert list(enumerate(batches)) == [
        (m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "batch/loss")
    ]
    epochs = [logs["loss"] for logs in first.epochs + second.epochs]
    assert list(enumerate(epochs)) == [(m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "loss")]
