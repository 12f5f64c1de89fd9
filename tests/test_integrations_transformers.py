"""SteplogCallback with a real Hugging Face Trainer (a tiny BERT built in code, CPU), read back by MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import steplog
from steplog.integrations import IntegrationWarning
from steplog.integrations.transformers import SteplogCallback

pytestmark = [
    # transformers' and torch's advice about their own deprecations: not what these tests check
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

STEPS = 20


def tiny_bert() -> BertForSequenceClassification:
    """A 2-layer BERT of width 32, built in code (no download)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    return BertForSequenceClassification(config)


def tiny_data(n: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 8), generator=gen)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0]) % 2} for i in range(n)]


def tiny_args(output_dir: Path | str, **kw: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "learning_rate": 1e-3,
    }
    options.update(kw)
    return TrainingArguments(**options)


class Recorder(TrainerCallback):
    """Records what the Trainer hands its callbacks in on_log, with the global step at that moment."""

    def __init__(self) -> None:
        self.logs: list[tuple[dict[str, Any], int]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append((dict(logs or {}), state.global_step))


def only_run(client: Any) -> Any:
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert 1 == len(runs)
    return runs[0]


def test_trainer_numbers_read_back_at_global_step_with_params(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """Every number on_log received is in MLflow at state.global_step; args and model config are params; FINISHED."""
    recorder = Recorder()
    callback = SteplogCallback("bert", run_name="tiny", tracking_uri=store)
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=tiny_args(tmp_path / "out"),
        train_dataset=tiny_data(STEPS * 4),
        callbacks=[recorder, callback],
    )
    trainer.train()
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert "tiny" == run.info.run_name
    assert callback.run is not None
    assert run.info.run_id == callback.run.run_id
    params = run.data.params
    assert "0.001" == params["learning_rate"]
    assert "20" == params["max_steps"]
    assert "32" == params["hidden_size"]
    assert "LABEL_0" == params["id2label/0"]  # the model config's nested dict, flattened with '/'
    expected: dict[str, list[tuple[float, int]]] = {}
    for logs, step in recorder.logs:
        for key, value in logs.items():
            # steplog writes a point equal to the key's previous one (same value, step and the step's one
            # timestamp) once: the Trainer's closing log repeats "epoch" at the last step
            if isinstance(value, (int, float)) and expected.get(key, [None])[-1] != (float(value), step):
                expected.setdefault(key, []).append((float(value), step))
    assert STEPS == len(expected["loss"])
    for key, points in expected.items():
        history = mlflow_client.get_metric_history(run.info.run_id, key)
        assert points == [(m.value, m.step) for m in history], key


def test_non_numbers_skipped_and_long_params_cut_with_one_warning(
    store: Path, mlflow_client: Any, tmp_path: Path
) -> None:
    """A str among on_log's values is skipped and a 7000-char param cut, each with one warning; training goes on."""
    callback = SteplogCallback("bert", tracking_uri=store)
    args = tiny_args(tmp_path / "out", max_steps=3, run_name="r" * 7000)

    class Noisy(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            callback.on_log(args, state, control, logs={"note": "hello", "extra": 1.5})

    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=tiny_data(12),
        callbacks=[Noisy(), callback],
    )
    with pytest.warns(IntegrationWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, IntegrationWarning)]
    assert 3 == len(messages), messages
    assert any("'note'" in m for m in messages)
    assert any("param 'run_name'" in m and "7000" in m for m in messages)
    assert any("run name 'run_name'" in m and "7000" in m for m in messages)
    run = only_run(mlflow_client)
    assert "r" * 6000 == run.data.params["run_name"]
    assert "r" * 250 == run.info.run_name
    assert [1, 2, 3] == [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "extra")]
    assert "note" not in run.data.metrics


def test_only_process_zero_writes(store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under a simulated rank 1 of 2 (SLURM_PROCID/SLURM_NTASKS set) training runs and nothing is written.

    SLURM's variables, not torchrun's: with RANK/WORLD_SIZE set the Trainer itself starts torch.distributed.
    """
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    callback = SteplogCallback("bert", tracking_uri=store)
    Trainer(
        model=tiny_bert(),
        args=tiny_args(tmp_path / "out", max_steps=3),
        train_dataset=tiny_data(12),
        callbacks=[callback],
    ).train()
    assert callback.run is None
    assert not store.exists()


def test_mlflow_env_vars(store: Path, mlflow_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MLFLOW_EXPERIMENT_NAME names the experiment, MLFLOW_TAGS sets tags, HF_MLFLOW_LOG_ARTIFACTS logs checkpoints."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("MLFLOW_TAGS", '{"release": "rc1", "team": "nlp"}')
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "1")
    callback = SteplogCallback(tracking_uri=store)
    Trainer(
        model=tiny_bert(),
        args=tiny_args(tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=tiny_data(16),
        callbacks=[callback],
    ).train()
    run = only_run(mlflow_client)
    assert "from-env" == mlflow_client.get_experiment(run.info.experiment_id).name
    assert {"release": "rc1", "team": "nlp"}.items() <= run.data.tags.items()
    folders = sorted(Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints"))
    assert ["checkpoint-2", "checkpoint-4"] == folders
    files = {Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints/checkpoint-4")}
    assert "config.json" in files


def test_bad_env_refused_before_training(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MLFLOW_RUN_ID that is no run id and a non-JSON MLFLOW_TAGS fail at construction, naming the variable."""
    monkeypatch.setenv("MLFLOW_RUN_ID", "../../etc")
    with pytest.raises(steplog.InvalidValueError, match="MLFLOW_RUN_ID"):
        SteplogCallback(tracking_uri=store)
    monkeypatch.delenv("MLFLOW_RUN_ID")
    monkeypatch.setenv("MLFLOW_TAGS", "{not json")
    with pytest.raises(steplog.InvalidValueError, match="MLFLOW_TAGS"):
        SteplogCallback(tracking_uri=store)
    assert not store.exists()


@pytest.mark.parametrize("variable", ["MLFLOW_RUN_ID", "STEPLOG_RUN_ID"])
def test_run_id_env_resumes_the_run_in_a_second_training(
    variable: str, store: Path, mlflow_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second train() from the first's checkpoint with the run id in the env adds its points to the same run."""
    first, second = Recorder(), Recorder()
    callback = SteplogCallback("bert", tracking_uri=store)
    out = tmp_path / "out"
    args = tiny_args(out, max_steps=6, save_strategy="steps", save_steps=6)
    Trainer(model=tiny_bert(), args=args, train_dataset=tiny_data(48), callbacks=[first, callback]).train()
    assert callback.run is not None
    run_id = callback.run.run_id
    monkeypatch.setenv(variable, run_id)
    resumed = SteplogCallback("bert", tracking_uri=store)
    args = tiny_args(out, max_steps=12, save_strategy="no")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=tiny_data(48), callbacks=[second, resumed])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    changed = [str(w.message) for w in caught if issubclass(w.category, IntegrationWarning)]
    assert any("'max_steps' keeps its first value" in m for m in changed), changed
    assert resumed.run is not None
    assert run_id == resumed.run.run_id
    run = only_run(mlflow_client)
    assert "FINISHED" == run.info.status
    assert "6" == run.data.params["max_steps"]  # a param keeps its first value
    expected = [(float(logs["loss"]), step) for logs, step in first.logs + second.logs if "loss" in logs]
    assert list(range(1, 13)) == [step for _v, step in expected]
    assert expected == [(m.value, m.step) for m in mlflow_client.get_metric_history(run_id, "loss")]


def test_trainer_process_index_counts_only_where_steplog_sees_no_launcher(
    store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a launcher environment is_world_process_zero silences a process; ranks= or a launcher overrules it."""
    args = tiny_args(tmp_path / "out")
    not_zero = SimpleNamespace(is_world_process_zero=False, global_step=1)
    silent = SteplogCallback("bert", tracking_uri=store)
    silent.on_log(args, not_zero, None, logs={"loss": 1.0}, model=tiny_bert())
    silent.on_train_end(args, not_zero, None)
    assert silent.run is None
    assert not store.exists()
    own = SteplogCallback("bert", tracking_uri=store, ranks="off")  # every process writes a run of its own
    own.on_log(args, not_zero, None, logs={"loss": 1.0}, model=tiny_bert())
    own.on_train_end(args, not_zero, None)
    assert own.run is not None
    assert own.run.writes
    monkeypatch.setenv("SLURM_PROCID", "0")  # the launcher says rank 0: steplog's core decides
    monkeypatch.setenv("SLURM_NTASKS", "2")
    core = SteplogCallback("bert", tracking_uri=store)
    core.on_log(args, not_zero, None, logs={"loss": 1.0}, model=tiny_bert())
    core.on_train_end(args, not_zero, None)
    assert core.run is not None
    assert (True, 0, 2) == (core.run.writes, core.run.rank, core.run.world_size)


@pytest.mark.slow
def test_training_error_ends_the_run_failed(store: Path, mlflow_client: Any, tmp_path: Path) -> None:
    """A script whose trainer.train() raises ends with the run FAILED, holding the points logged before the error."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_integrations_transformers import tiny_args, tiny_bert, tiny_data
        from transformers import Trainer, TrainerCallback
        from steplog.integrations.transformers import SteplogCallback

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    raise RuntimeError("boom at step 3")

        Trainer(
            model=tiny_bert(), args=tiny_args({str(tmp_path / "out")!r}), train_dataset=tiny_data(80),
            callbacks=[SteplogCallback("bert", tracking_uri={str(store)!r}), Boom()],
        ).train()
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert 1 == result.returncode, result.stderr[-2000:]
    assert "boom at step 3" in result.stderr
    run = only_run(mlflow_client)
    assert "FAILED" == run.info.status
    assert [1, 2] == [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "loss")]
