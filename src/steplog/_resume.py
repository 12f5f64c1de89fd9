"""Resuming a run (``start_run(run_id=...)``) and rewinding its history (``rewind_to_step=N``).

A resume reads what the run already holds (params, tags, metric keys, its largest step) from the
run's first destination before the writer opens it, so that a param logged again with the same
value is accepted, a different value raises ParamChangedError, and ``step=None`` continues from the
largest step. The destination then reopens the run (RUNNING, end time cleared) through its usual
join path (``RunRequest.run_id``).

A rewind rewrites each metric file of a local store that holds points past step N into a
temporary file in the run folder, fsyncs it and renames it over the old one, so a kill during the
rewind leaves every file whole, either as it was or rewound; running the same rewind again
finishes the job. Nothing is ever written or removed outside the run's own folder, and a run id
is checked against MLflow's rule before any path is built from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._errors import InvalidValueError, StepLogError
from ._layout import META, RESERVED_ROOT_FOLDERS, TMP_PREFIX, iter_files, parse_meta, parse_metric_lines
from ._validation import INT64_MAX, INT64_MIN

if TYPE_CHECKING:
    from .typing import Sink

__all__ = [
    "REWIND_TAG",
    "ResumeSpec",
    "ResumeState",
    "check_run_id",
    "find_local_run",
    "read_local_run",
    "resume_in",
    "rewind_local_run",
    "run_id_from_env",
]

REWIND_TAG = "steplog.rewind"
"""Tag a rewind sets on the run: ``"<N> at <UTC time>"`` (the last rewind)."""

# MLflow's file reader accepts run ids matching ^[a-zA-Z0-9][\w\-]{0,255}$ (MLFLOW_FORMAT.md §1.6);
# ASCII only here, so no path separator, dot segment or odd character can reach a path.
_RUN_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_\-]{0,255}", re.ASCII)
_ENV_RUN_IDS = ("STEPLOG_RUN_ID", "MLFLOW_RUN_ID")


def check_run_id(run_id: object, what: str = "run_id") -> str:
    """``run_id`` if MLflow would accept it as a run id (what ``uuid4().hex`` makes), else InvalidValueError."""
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        shown = run_id[:80] if isinstance(run_id, str) else run_id
        raise InvalidValueError(
            f"{what} {shown!r} is not allowed: a run id is 1 to 256 ASCII letters, digits, '_' or '-', "
            "starting with a letter or digit (MLflow makes 32 lowercase hex digits)"
        )
    return run_id


def run_id_from_env() -> tuple[str, str] | None:
    """``(run_id, variable)`` from ``STEPLOG_RUN_ID``, else ``MLFLOW_RUN_ID``; None when neither is set."""
    for name in _ENV_RUN_IDS:
        value = os.environ.get(name)
        if value:
            return check_run_id(value.strip(), f"environment variable {name}"), name
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeSpec:
    """What ``start_run`` was asked to resume."""

    run_id: str
    rewind_to_step: int | None = None
    run_name: str | None = None
    """A new name for the run (None: keep its name)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeState:
    """What a resumed run already holds, read before logging resumes."""

    run_id: str
    experiment_id: str
    run_name: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: tuple[str, ...]
    last_step: int
    """The largest step of the run's metric points, system metrics left out (0 for a run without points)."""
    experiment_name: str | None = None
    last_system_step: int = -1
    """The largest step of the ``system/`` metrics (their own counter), -1 without any."""


# ---------------------------------------------------------------------------- local store


def find_local_run(root: Path, run_id: str) -> Path | None:
    """The folder of run ``run_id`` in the store at ``root`` (any experiment), or None."""
    check_run_id(run_id)
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name in RESERVED_ROOT_FOLDERS or not entry.is_dir():
            continue
        candidate = entry / run_id
        if (candidate / META).is_file():
            return candidate
    return None


def _read_values(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    out: dict[str, str] = {}
    for key, path in iter_files(folder):
        if path.name.startswith(TMP_PREFIX):
            continue
        out[key] = path.read_text(encoding="utf-8")
    return out


def _metric_files(run_dir: Path) -> list[tuple[str, Path]]:
    folder = run_dir / "metrics"
    if not folder.is_dir():
        return []
    return sorted((k, p) for k, p in iter_files(folder) if not p.name.startswith(TMP_PREFIX))


def read_local_run(run_dir: Path) -> ResumeState:
    """Read a run's meta, params, tags, metric keys and largest step (StepLogError if unusable)."""
    try:
        meta = parse_meta((run_dir / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StepLogError(f"run {run_dir.name} cannot be resumed: its meta.yaml is unreadable ({exc})") from exc
    if str(meta.get("run_id")) != run_dir.name:
        raise StepLogError(f"run {run_dir.name} cannot be resumed: its meta.yaml names run {meta.get('run_id')!r}")
    if meta.get("lifecycle_stage") == "deleted":
        raise StepLogError(
            f"run {run_dir.name} is deleted: restore it (mlflow runs restore --run-id {run_dir.name}) to resume it"
        )
    tags = _read_values(run_dir / "tags")
    last, last_system = 0, -1
    keys: list[str] = []
    for key, path in _metric_files(run_dir):
        keys.append(key)
        steps = parse_metric_lines(path.read_bytes())[0]
        if steps and key.startswith("system/"):
            last_system = max(last_system, max(steps))
        elif steps:
            last = max(last, max(steps))
    start = meta.get("start_time")
    exp_meta_path = run_dir.parent / META
    experiment_name = None
    try:
        experiment_name = str(parse_meta(exp_meta_path.read_text(encoding="utf-8")).get("name"))
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return ResumeState(
        run_id=run_dir.name,
        experiment_id=run_dir.parent.name,
        run_name=str(meta.get("run_name") or tags.get("mlflow.runName") or run_dir.name),
        start_time=int(start) if isinstance(start, int) else int(time.time() * 1000),
        params=_read_values(run_dir / "params"),
        tags=tags,
        metric_keys=tuple(keys),
        last_step=max(INT64_MIN, min(INT64_MAX, last)),
        experiment_name=experiment_name,
        last_system_step=last_system,
    )


def _step_of(line: bytes) -> int | None:
    """The step of one metric line (MLflow's 3/5-field form, or the legacy 2-field one: step 0)."""
    fields = line.split()
    try:
        if len(fields) in (3, 5):
            return int(fields[2])
        if len(fields) == 2:
            return 0
    except ValueError:
        return None
    return None


def rewind_local_run(run_dir: Path, step: int) -> int:
    """Remove every point with a step above ``step`` from the run's metric files; the points removed.

    Each file that changes is written whole to a temp file in the run folder, fsynced, and renamed
    over the old file (then the folder is fsynced), so a crash leaves each file old or new, never
    torn. A file left with no point is removed (MLflow cannot read an empty metric file). Lines
    steplog cannot read are kept as they are.
    """
    from .sinks.mlruns import _align_lines as align_lines

    removed = 0
    for _key, path in _metric_files(run_dir):
        data = path.read_bytes()
        end = data.rfind(b"\n")
        lines = data[: end + 1].split(b"\n")[:-1] if end >= 0 else []
        kept: list[bytes] = []
        for line in lines:
            line_step = _step_of(line)
            if line_step is not None and line_step > step:
                continue
            if line.strip():
                kept.append(line.rstrip(b" ") + b"\n")  # padding is re-made for the new offsets
        dropped = sum(1 for line in lines if (s := _step_of(line)) is not None and s > step)
        if not dropped and end == len(data) - 1:
            continue
        removed += dropped
        if not kept:
            os.unlink(path)
        else:
            _replace_durably(path, align_lines(b"".join(kept), 0), run_dir)
        _fsync_dir(path.parent)
    return removed


def _replace_durably(path: Path, data: bytes, temp_dir: Path) -> None:
    tmp = temp_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-rewind"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewind_tag(step: int) -> str:
    """The value of the :data:`REWIND_TAG` tag for a rewind to ``step`` now."""
    return f"{step} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


def _resume_local(root: Path, spec: ResumeSpec, where: str) -> ResumeState:
    run_dir = find_local_run(root, spec.run_id)
    if run_dir is None:
        raise StepLogError(
            f"run {spec.run_id} does not exist in {where}: check the run id and the tracking_uri "
            "(a run is resumed in the store it was logged to)"
        )
    if spec.rewind_to_step is not None:
        rewind_local_run(run_dir, spec.rewind_to_step)
    return read_local_run(run_dir)


# ---------------------------------------------------------------------------- across destinations


async def resume_in(sinks: Sequence[Sink], spec: ResumeSpec) -> ResumeState:
    """Read (and rewind) the run in every destination; the first destination's state is the run's.

    Raises:
        StepLogError: the first destination has no such run (the message names it), or cannot
            resume runs at all.
    """
    from .sinks.mlruns import MlrunsSink

    state: ResumeState | None = None
    for index, sink in enumerate(sinks):
        if isinstance(sink, MlrunsSink):
            root = sink.root
            if index > 0 and find_local_run(root, spec.run_id) is None:
                continue  # joins the run under the first destination's id, as for a new run
            found = await anyio.to_thread.run_sync(_resume_local, root, spec, str(root))
        elif hasattr(sink, "resume"):
            resume: Any = sink.resume
            found = await resume(spec.run_id)
        elif index == 0:
            raise StepLogError(
                f"{type(sink).__name__} cannot resume a run yet: runs can be resumed in a local mlruns store "
                "and on an MLflow tracking server (sqlite:/// destinations and custom sinks start new runs only)"
            )
        else:
            continue
        if state is None:
            state = found
    assert state is not None
    return state
