"""What every destination records about a run besides its data: the user, the source, the system tags.

Shared by the file sink, the REST sink and the outage journal, so none of them imports another.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Mapping

from ._errors import StepLogError

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


_RUN_ID = re.compile(r"[0-9a-f]{32}")
_EXPERIMENT_ID = re.compile(r"[0-9]{1,64}")


def check_run_id(value: object, source: str) -> str:
    """``value`` if it is an MLflow run id (32 lowercase hex characters), else a StepLogError naming ``source``.

    A run id becomes a folder name (the file store's run, the outage journal): anything
    else from outside (``"../../x"``, an absolute path) must never get that far.
    """
    if isinstance(value, str) and _RUN_ID.fullmatch(value):
        return value
    raise StepLogError(f"{source} gave the run id {_show(value)}: an MLflow run id is 32 lowercase hex characters")


def check_experiment_id(value: object, source: str) -> str:
    """``value`` as text if it is an MLflow experiment id (1 to 64 ASCII digits, as servers answer), else an error."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if isinstance(value, str) and _EXPERIMENT_ID.fullmatch(value):
        return value
    raise StepLogError(f"{source} gave the experiment id {_show(value)}: an MLflow experiment id is ASCII digits")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
