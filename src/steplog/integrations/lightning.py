"""steplog as a Lightning logger: ``Trainer(logger=SteplogLogger(...))`` or ``Fabric(loggers=[...])``.

Needs ``pip install 'steplog[lightning]'``. Example::

    from lightning.pytorch import Trainer
    from steplog.integrations.lightning import SteplogLogger

    trainer = Trainer(logger=SteplogLogger("mnist", run_name="baseline"), max_epochs=3)
    trainer.fit(model, data)   # the run ends FINISHED (FAILED if fit raises)

Unlike Lightning's ``MLFlowLogger`` (one ``log_batch`` request per ``log_metrics`` call),
``log_metrics`` only queues the points; steplog's writer writes them in the background.

Which process writes is steplog's decision, not Lightning's ``rank_zero_only``: ``ranks="zero"``
(the default) writes from rank 0, ``ranks="each"`` a child run per rank of one parent run for the
job, as :func:`steplog.start_run` does.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers.logger import Logger

from ._common import Guard, RunHandle, local_store_dir

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .._jobs import RanksMode
    from .._run import Run

__all__ = ["SteplogLogger"]

_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "aborted": "KILLED"}


class SteplogLogger(Logger):  # type: ignore[misc,unused-ignore]  # Any where lightning is absent
    """A Lightning logger writing one steplog run (by default from rank zero; other ranks write nothing).

    Args:
        experiment: experiment name (created if missing); also the logger's ``name``.
        run_name: run name (default: generated).
        tracking_uri: as :func:`steplog.start_run` (default ``STEPLOG_TRACKING_URI``,
            ``MLFLOW_TRACKING_URI``, ``./mlruns``).
        tags: run tags.
        run_id: resume this run (default: ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``); train from the
            checkpoint (``fit(ckpt_path=...)``) so the steps go on where they stopped.
        ranks: which processes write, as :func:`steplog.start_run`: ``"zero"`` (default), ``"each"``
            (a child run per rank of one parent run for the job) or ``"off"``.
        log_checkpoints: log every checkpoint Lightning saves as an artifact under ``checkpoints/``.
        prefix: put before every metric key (joined with ``-``, as Lightning's loggers do).
        **options: :func:`steplog.start_run` options (``flush_interval``, ``max_buffer``, ...).

    The run starts on first use (``experiment``, a log call), so the logger can be built in a
    process that never trains. ``version`` is the run id. Logging after :meth:`finalize` (e.g.
    ``trainer.test()`` after ``trainer.fit()``) resumes the same run, which the next ``finalize`` ends.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment: str = "lightning_logs",
        *,
        run_name: str | None = None,
        tracking_uri: str | os.PathLike[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        ranks: RanksMode | None = None,
        log_checkpoints: bool = False,
        prefix: str = "",
        **options: Any,
    ) -> None:
        super().__init__()
        self._handle = RunHandle(
            Guard("Lightning"),
            experiment,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            run_id=run_id,
            ranks=ranks,
            options=options,
        )
        self._store_dir = local_store_dir(tracking_uri)
        self._log_checkpoints = log_checkpoints
        self._prefix = prefix
        self._logged_checkpoints: dict[str, float] = {}  # path -> mtime when logged

    @property
    def experiment(self) -> Run:
        """The steplog :class:`~steplog.Run` (started here on first use); a no-op object on other ranks.

        After :meth:`finalize` this is the ended run: reading it does not reopen it (a log call
        through the logger does).
        """
        handle = self._handle
        run = handle.run if handle.ended else handle.start()
        if run is None:
            from lightning.fabric.loggers.logger import _DummyExperiment

            return _DummyExperiment()  # type: ignore[return-value,no-any-return,unused-ignore]
        return run

    @property
    def name(self) -> str:
        """The experiment name."""
        return self._handle.experiment

    @property
    def version(self) -> str | None:
        """The run id (starts the run); None on ranks that do not write."""
        handle = self._handle
        if handle.run is None:
            handle.start()
        return handle.run_id

    @property
    def save_dir(self) -> str | None:
        """None, so Lightning keeps its own files (checkpoints, profiles) out of the store.

        Lightning puts default checkpoints under ``save_dir/name/version/checkpoints``; with the store
        as ``save_dir`` that is a folder MLflow reads as a malformed experiment. With None they go
        under the Trainer's ``default_root_dir`` instead (``<root>/<experiment>/<run id>/checkpoints``),
        and ``log_checkpoints=True`` copies them into the run. :attr:`store_dir` names the store.
        """
        return None

    @property
    def store_dir(self) -> str | None:
        """The local store's directory (absolute), or None when writing only to a server."""
        return self._store_dir

    @property
    def log_dir(self) -> str | None:
        """The run's folder in the local store once the run started (None on a server or other ranks)."""
        handle = self._handle
        if self._store_dir is None or handle.run is None:
            return None
        return os.path.join(self._store_dir, handle.run.experiment_id, handle.run.run_id)

    @property
    def group_separator(self) -> str:
        """Nested hyperparameters are flattened with this ('/')."""
        return "/"

    @property
    def run(self) -> Run | None:
        """The steplog run once started on this rank (kept after it ended), else None."""
        return self._handle.run

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue numeric metrics at ``step`` (non-numbers skipped, bad keys mapped, one warning each)."""
        handle = self._handle
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        handle.log_metrics(metrics, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace | None, *args: Any, **kwargs: Any) -> None:
        """Log hyperparameters flattened with '/' (dict, Namespace or AttributeDict).

        Values over MLflow's 6000 characters are cut with a warning; logging an unchanged param
        again is fine, a changed one keeps its first value with a warning.
        """
        self._handle.log_params(params)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """With ``log_checkpoints=True``, log each new or rewritten checkpoint file under ``checkpoints/``.

        Only rank 0 logs them (Lightning saves checkpoints there), also with ``ranks="each"``: one copy
        in rank 0's run rather than one per rank.
        """
        handle = self._handle
        if not self._log_checkpoints or not handle.writes or handle.ranks.rank != 0:
            return
        paths = {checkpoint_callback.best_model_path, checkpoint_callback.last_model_path}
        paths.update(getattr(checkpoint_callback, "best_k_models", {}) or {})
        for path in sorted(p for p in paths if p):
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue  # removed again (save_top_k) before we saw it
            if self._logged_checkpoints.get(path) == mtime:
                continue
            self._logged_checkpoints[path] = mtime
            self._handle.log_artifact(path, "checkpoints")

    def finalize(self, status: str) -> None:
        """End the run: "success" -> FINISHED, "failed" -> FAILED (others: FINISHED / KILLED as named)."""
        if self._handle.run is None and status != "success":
            self._handle.start()  # a run that failed before logging anything is still recorded as failed
        self._handle.end(_STATUS.get(str(status).lower(), "FINISHED"))

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()  # RunHandle leaves its live run behind when pickled
