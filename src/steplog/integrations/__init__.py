"""steplog inside the training frameworks people already use, one module per framework.

Each module imports its framework when it is imported (and only then), so it needs that
framework's extra::

    pip install 'steplog[lightning]'      # steplog.integrations.lightning.SteplogLogger
    pip install 'steplog[transformers]'   # steplog.integrations.transformers.SteplogCallback
    pip install 'steplog[accelerate]'     # steplog.integrations.accelerate.SteplogTracker
    pip install 'steplog[keras]'          # steplog.integrations.keras.SteplogCallback

Every integration decides which process writes as :func:`steplog.start_run` does (``ranks=``:
rank zero by default, or a child run per rank; see ``steplog._jobs``), resumes a run by
``run_id=`` (or ``STEPLOG_RUN_ID`` / ``MLFLOW_RUN_ID``), and never stops training for a logging
reason: a value MLflow would refuse is cut or mapped, and a non-number among the metrics is
skipped, each with one :class:`IntegrationWarning` naming the key.
"""

from ._common import IntegrationWarning as IntegrationWarning

__all__ = ["IntegrationWarning"]
