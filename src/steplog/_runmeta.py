"""What every destination records about a run besides its data: the user, the source, the system tags.

Shared by the file sink, the REST sink and the outage journal, so none of them imports another.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Mapping

from ._validation import check_experiment_id as _check_experiment_id
from ._validation import check_run_id as check_run_id

__all__ = [
    "check_experiment_id",
    "check_run_id",
    "cut_torn_tail",
    "default_user",
    "source_name",
    "system_tags",
]


def default_user() -> str:
    """The user MLflow records: ``MLFLOW_TRACKING_USERNAME`` or the OS user."""
    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except Exception:  # getpass fails without a passwd entry (some containers)
        return "unknown"


def source_name() -> str:
    """What MLflow records as ``mlflow.source.name``: the script path, or ``<console>``."""
    main = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if not main or main == "-c":
        return "<console>"
    return os.path.abspath(main) if os.path.exists(main) else main


def system_tags(user_id: str, run_name: str, tags: Mapping[str, str]) -> dict[str, str]:
    """The tags MLflow's client sets on a new run, then the user's, then the run name (which wins)."""
    return {
        "mlflow.user": user_id,
        "mlflow.source.name": source_name(),
        "mlflow.source.type": "LOCAL",
        **tags,
        "mlflow.runName": run_name,
    }


def cut_torn_tail(fd: int) -> int:
    """Truncate an open file back to just after its last newline (or to empty); return the new size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            new_size = start + nl + 1
            os.ftruncate(fd, new_size)
            return new_size
        pos = start
    os.ftruncate(fd, 0)
    return 0


def check_experiment_id(value: object, source: str) -> str:
    """``value`` as text if it is an MLflow experiment id (servers may answer an int), else a StepLogError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    return _check_experiment_id(value, source)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
