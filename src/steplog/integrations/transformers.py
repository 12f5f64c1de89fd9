"""steplog as a Hugging Face ``Trainer`` callback: ``Trainer(callbacks=[SteplogCallback()], report_to="none")``.

Needs ``pip install 'steplog[transformers]'``. Example::

    from transformers import Trainer, TrainingArguments
    from steplog.integrations.transformers import SteplogCallback

    args = TrainingArguments("out", report_to="none", logging_steps=1)
    Trainer(model, args, train_dataset=data, callbacks=[SteplogCallback("bert")]).train()

Reads the environment variables of MLflow's own callback: ``MLFLOW_EXPERIMENT_NAME`` (when no
experiment is given), ``MLFLOW_TAGS`` (a JSON object of run tags), ``HF_MLFLOW_LOG_ARTIFACTS``
(as ``log_checkpoints``) and ``MLFLOW_RUN_ID`` (resume that run, as ``start_run`` does; steplog's
own ``STEPLOG_RUN_ID`` comes first), plus ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .._errors import InvalidValueError
from ._common import Guard, RunHandle

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from .._jobs import RanksMode
    from .._run import Run

__all__ = ["SteplogCallback"]

_TRUE = {"1", "true", "yes", "on"}


def _env_tags() -> dict[str, Any]:
    raw = os.environ.get("MLFLOW_TAGS")
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError as exc:
        raise InvalidValueError(
            f"environment variable MLFLOW_TAGS is not allowed: it is not valid JSON ({exc})"
        ) from None
    if not isinstance(tags, dict):
        raise InvalidValueError(
            f"environment variable MLFLOW_TAGS is not allowed: it must be a JSON object, not {type(tags).__name__}"
        )
    return tags


class SteplogCallback(TrainerCallback):  # type: ignore[misc,unused-ignore]  # untyped where transformers is absent
    """A ``TrainerCallback`` logging one steplog run (by default from the world's process zero).

    Args:
        experiment: experiment name (default: ``MLFLOW_EXPERIMENT_NAME``, else "Default").
        run_name: run name (default: ``TrainingArguments.run_name`` when set, else generated).
        tracking_uri: as :func:`steplog.start_run`.
        tags: run tags (merged over ``MLFLOW_TAGS``).
        run_id: resume this run (default: ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``); train with
            ``resume_from_checkpoint`` so ``global_step`` goes on where it stopped.
        ranks: which processes write, as :func:`steplog.start_run`: ``"zero"`` (default), ``"each"``
            or ``"off"``. steplog reads the launcher's environment (``RANK``/``WORLD_SIZE``, SLURM, MPI);
            only where it finds no launcher and ``ranks`` is not given does the Trainer's
            ``state.is_world_process_zero`` keep the other processes silent.
        log_checkpoints: log each checkpoint folder the Trainer saves under ``checkpoints/``
            (default: ``HF_MLFLOW_LOG_ARTIFACTS``).
        **options: :func:`steplog.start_run` options.

    Params are ``TrainingArguments.to_dict()`` over the model's config, flattened with '/'; numbers
    from ``on_log`` are logged at ``state.global_step`` (anything else is skipped with one warning,
    as MLflow's callback skips it). The run ends FINISHED at ``on_train_end``; when training raises,
    steplog's exit hook ends it FAILED (or call :meth:`close` with ``"FAILED"`` yourself).
    """

    def __init__(
        self,
        experiment: str | None = None,
        *,
        run_name: str | None = None,
        tracking_uri: str | os.PathLike[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        ranks: RanksMode | None = None,
        log_checkpoints: bool | None = None,
        **options: Any,
    ) -> None:
        if experiment is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        self._handle = RunHandle(
            Guard("Transformers"),
            experiment,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags={**_env_tags(), **(tags or {})},
            run_id=run_id,
            ranks=ranks,
            options=options,
        )
        # The Trainer's own notion of process zero counts only where steplog's core has none: no
        # launcher environment it reads (e.g. processes spawned by a script or by XLA) and no ranks=.
        self._framework_decides = ranks is None and self._handle.plan.ranks.launcher is None
        if log_checkpoints is None:
            log_checkpoints = os.environ.get("HF_MLFLOW_LOG_ARTIFACTS", "").strip().lower() in _TRUE
        self._log_checkpoints = log_checkpoints
        self._set_up = False

    @property
    def run(self) -> Run | None:
        """The steplog run once training began on this process (kept after it ended), else None."""
        return self._handle.run

    def _writes(self, state: TrainerState) -> bool:
        if not self._handle.writes:
            return False
        return not self._framework_decides or bool(state.is_world_process_zero)

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        """Start the run and log the training arguments and the model config as params."""
        self._set_up = True
        if not self._writes(state):
            return
        handle = self._handle
        if handle.run_name is None and getattr(args, "run_name", None):
            handle.run_name = str(args.run_name)
        params: dict[str, Any] = {}
        config = getattr(model, "config", None)
        to_dict: Any = getattr(config, "to_dict", None)
        if to_dict is not None:
            params.update(to_dict())
        params.update(args.to_dict())  # type: ignore[no-untyped-call,unused-ignore]  # untyped in transformers
        handle.log_params(params)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if not self._set_up:
            self.setup(args, state, model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self._set_up:
            self.setup(args, state, model)
        if logs and self._writes(state):
            self._handle.log_metrics(logs, state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # the Trainer saves from process zero: one copy in rank 0's run, also with ranks="each"
        if self._log_checkpoints and self._set_up and self._writes(state) and self._handle.ranks.rank == 0:
            folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self._handle.log_artifact(folder, "checkpoints")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._set_up and self._writes(state):
            self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        self._handle.end(status)
