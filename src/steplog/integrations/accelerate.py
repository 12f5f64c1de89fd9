"""steplog as an Accelerate tracker: ``Accelerator(log_with=[SteplogTracker("my-project")])``.

Needs ``pip install 'steplog[accelerate]'``. Example::

    from accelerate import Accelerator
    from steplog.integrations.accelerate import SteplogTracker

    accelerator = Accelerator(log_with=[SteplogTracker("my-project")])
    accelerator.init_trackers("my-project", config={"lr": 1e-3})
    for step in range(100):
        accelerator.log({"loss": loss}, step=step)
    accelerator.end_training()   # the run ends FINISHED

Which process writes is steplog's decision (``ranks=``, as :func:`steplog.start_run`), so the
tracker sets ``main_process_only = False``; Accelerate itself calls ``init_trackers`` and ``log``
on its main process only, which is rank 0 under every launcher both read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from accelerate.tracking import GeneralTracker

from ._common import Guard, RunHandle

if TYPE_CHECKING:
    from .._jobs import RanksMode
    from .._run import Run

__all__ = ["SteplogTracker"]


class SteplogTracker(GeneralTracker):  # type: ignore[misc]  # accelerate ships no type hints
    """An ``accelerate.tracking.GeneralTracker`` writing one steplog run (by default from rank zero).

    Args:
        experiment: experiment name (created if missing).
        run_name, tracking_uri, tags: as :func:`steplog.start_run`.
        run_id: resume this run (default: ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``).
        ranks: which processes write, as :func:`steplog.start_run` (default ``"zero"``). Accelerate
            calls the tracker from its main process only; a tracker called on every process
            (``tracker.start()``, ``tracker.log(...)``) writes a child run per rank with ``"each"``.
        **options: :func:`steplog.start_run` options.

    ``store_init_configuration`` logs the config as params (flattened with '/', long values cut
    with a warning); ``log`` queues the numbers at ``step`` and skips anything else with one
    warning, as Accelerate's MLflow tracker does. ``finish`` (``accelerator.end_training()``)
    ends the run FINISHED; call ``finish("FAILED")`` yourself, or let steplog's exit hook end it
    FAILED when the script dies of an exception.
    """

    name = "steplog"
    requires_logging_directory = False
    main_process_only = False  # steplog's core decides which process writes (see the module docstring)

    def __init__(
        self,
        experiment: str,
        *,
        run_name: str | None = None,
        tracking_uri: str | os.PathLike[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        ranks: RanksMode | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._handle = RunHandle(
            Guard("Accelerate"),
            experiment,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            run_id=run_id,
            ranks=ranks,
            options=options,
        )

    @property
    def tracker(self) -> Run | None:
        """The steplog :class:`~steplog.Run` (None on processes that do not write, or before ``start``)."""
        return self._handle.run

    def start(self) -> None:
        """Start the run (``accelerator.init_trackers`` calls this)."""
        self._handle.start()

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        """Log the run's configuration as params."""
        self._handle.log_params(values)

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Queue the numeric items of ``values`` at ``step`` (never blocks)."""
        self._handle.log_metrics(values, step)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (``accelerator.end_training()`` calls this)."""
        self._handle.end(status)
