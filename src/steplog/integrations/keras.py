"""steplog as a Keras 3 callback (any backend): ``model.fit(..., callbacks=[SteplogCallback()])``.

Needs ``pip install 'steplog[keras]'`` (Keras 3 and torch; set ``KERAS_BACKEND`` before importing
Keras to pick a backend). Example::

    from steplog.integrations.keras import SteplogCallback

    model.fit(x, y, epochs=3, callbacks=[SteplogCallback("keras", log_every_n_steps=10)])

Epoch metrics (``loss``, ``val_loss``, ...) are logged under their own names at ``step=epoch``
(0-based, as MLflow's Keras callback does); batch metrics under ``batch/<name>`` at the global
batch index (0-based, counted across epochs: ``epoch * steps + batch`` when Keras knows the steps
per epoch, so ``fit(..., initial_epoch=N)`` with ``run_id=`` continues the run's history), every
``log_every_n_steps`` batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import keras

from ._common import Guard, RunHandle

if TYPE_CHECKING:
    from .._jobs import RanksMode
    from .._run import Run

__all__ = ["SteplogCallback"]


class SteplogCallback(keras.callbacks.Callback):  # type: ignore[misc]  # keras ships no type hints
    """A Keras callback logging one steplog run (by default from rank zero).

    Args:
        experiment: experiment name (default: ``MLFLOW_EXPERIMENT_NAME``, else "Default").
        run_name, tracking_uri, tags: as :func:`steplog.start_run`.
        run_id: resume this run (default: ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``); pass
            ``initial_epoch`` to ``fit`` so the epochs go on where they stopped.
        ranks: which processes write, as :func:`steplog.start_run`: ``"zero"`` (default), ``"each"``
            or ``"off"``.
        log_every_n_steps: log batch metrics every this many batches (0: epoch metrics only).
        **options: :func:`steplog.start_run` options.

    Params: the optimizer's config (``optimizer_<name>``, as MLflow's Keras callback names them) and
    ``fit``'s arguments that Keras exposes (``epochs``, ``steps``). The run ends FINISHED at the end
    of ``fit``; when ``fit`` raises, call :meth:`close` with ``"FAILED"`` (steplog's exit hook does it
    for a script that dies of the exception).
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
        log_every_n_steps: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 0:
            from .._errors import InvalidValueError

            raise InvalidValueError(f"log_every_n_steps={log_every_n_steps!r} is not allowed: an int >= 0")
        if experiment is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        self._handle = RunHandle(
            Guard("Keras"),
            experiment,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            run_id=run_id,
            ranks=ranks,
            options=options,
        )
        self._every = log_every_n_steps
        self._batch = 0  # global batch index across epochs
        self._batch_keys: dict[str, str] = {}

    @property
    def run(self) -> Run | None:
        """The steplog run once ``fit`` began on this process (kept after it ended), else None."""
        return self._handle.run

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        handle = self._handle
        if not handle.writes:
            return
        self._batch = 0
        params: dict[str, Any] = {}
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            try:
                config = optimizer.get_config()
            except Exception as exc:  # a custom optimizer's get_config must not stop training
                handle.guard.warn_once("optimizer", "optimizer", f"the optimizer's config is not logged: {exc!r}")
            else:
                params.update({f"optimizer_{k}": v for k, v in config.items()})
        params.update({k: v for k, v in (self.params or {}).items() if k in ("epochs", "steps", "batch_size")})
        handle.log_params(params)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        # The global batch index is epoch * steps + batch when Keras knows the steps per epoch, so a
        # fit resumed with initial_epoch (and run_id) goes on where the first one stopped.
        steps = (self.params or {}).get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            self._batch = epoch * steps

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        step = self._batch
        self._batch = step + 1
        if self._every and logs and step % self._every == 0 and self._handle.writes:
            keys = self._batch_keys
            named = {}
            for key, value in logs.items():
                name = keys.get(key)
                if name is None:
                    name = keys[key] = f"batch/{key}"
                named[name] = value
            self._handle.log_metrics(named, step)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if logs and self._handle.writes:
            self._handle.log_metrics(logs, epoch)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        self._handle.end(status)
