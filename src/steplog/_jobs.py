"""Distributed jobs: which ranks write (``ranks=``), and the one parent run all ranks agree on.

``ranks="zero"`` (the default when a launcher started more than one process): rank 0 writes the
run; every other rank gets a run with the same API whose sink writes nothing (``run.writes`` is
False). ``ranks="each"``: every rank writes a child run (tag ``steplog.rank``) of one parent run
for the job. The parent's id is derived from the job's identity (:func:`job_key`), so every rank
computes the same id without talking to the others:

* on a local store the parent's folder is created with one ``mkdir`` (atomic: exactly one rank
  wins and writes the parent; the others join it);
* on a tracking server, which assigns run ids itself, every rank first looks for a parent already
  settled for the job (a run tagged with the job's key and ``steplog.job_parent``); failing that,
  each rank creates a candidate tagged with the job's key, waits until the job's ``world_size``
  candidates are visible, and all take the candidate with the smallest run id (the others are
  deleted by the ranks that made them). Every rank sees the same set, so all pick the same parent.

A parent ends when a rank's child run ends: its end time and status are those of the last rank to
close, except that a FAILED or KILLED child leaves the parent FAILED or KILLED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio

from ._errors import InvalidValueError, StepLogError
from ._ranks import Ranks, detect_ranks
from ._records import RunInfo, RunStatus
from ._resume import check_run_id
from .typing import Batch, RunRequest, Sink

__all__ = [
    "JOB_KEY_TAG",
    "JOB_PARENT_TAG",
    "PARENT_TAG",
    "RANK_TAG",
    "NullSink",
    "RanksMode",
    "end_local_parent",
    "job_key",
    "open_local_parent",
    "parent_run_id",
    "resolve_ranks",
]

RanksMode = Literal["zero", "each", "off"]
PARENT_TAG = "mlflow.parentRunId"
RANK_TAG = "steplog.rank"
JOB_KEY_TAG = "steplog.job_key"
JOB_PARENT_TAG = "steplog.job_parent"

_NAMESPACE = uuid.UUID("5f0c2b1e-9a51-4c39-8f62-7d3b5b0c1a77")  # steplog's own uuid5 namespace


def resolve_ranks(mode: RanksMode | None, environ: Mapping[str, str] | None = None) -> tuple[RanksMode, Ranks]:
    """The mode a run uses and where this process stands (``mode`` None: ``"zero"``)."""
    ranks = detect_ranks(environ)
    chosen: RanksMode = "zero" if mode is None else mode
    if not ranks.distributed:
        chosen = "off"  # one process: it writes its own run, whatever the mode
    return chosen, ranks


def job_key(experiment: str, ranks: Ranks, environ: Mapping[str, str] | None = None) -> str:
    """The identity of the job this process belongs to, the same on every rank.

    Taken from ``TORCHELASTIC_RUN_ID`` (torchrun; its default ``none`` is ignored), ``SLURM_JOB_ID``
    (with ``SLURM_STEP_ID``), or ``MASTER_ADDR:MASTER_PORT``, with the launcher and experiment.

    Raises:
        InvalidValueError: none of these is set, so the ranks cannot agree on a parent.
    """
    env = os.environ if environ is None else environ
    ident = None
    elastic = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if elastic and elastic.lower() != "none":
        ident = f"torchelastic:{elastic}"
    elif env.get("SLURM_JOB_ID", "").strip():
        ident = f"slurm:{env['SLURM_JOB_ID'].strip()}.{env.get('SLURM_STEP_ID', '').strip()}"
    elif env.get("MASTER_ADDR", "").strip() and env.get("MASTER_PORT", "").strip():
        ident = f"master:{env['MASTER_ADDR'].strip()}:{env['MASTER_PORT'].strip()}"
    if ident is None:
        raise InvalidValueError(
            f"ranks='each' needs the job's identity so that every rank finds the same parent run, and "
            f"{ranks.launcher} set none of TORCHELASTIC_RUN_ID, SLURM_JOB_ID, MASTER_ADDR+MASTER_PORT: set one "
            "(the same on every rank), or use ranks='zero'"
        )
    return f"{ident}|world={ranks.world_size}|experiment={experiment}"


def parent_run_id(key: str) -> str:
    """The parent run's id for a job key on a local store (32 lowercase hex, as MLflow makes them)."""
    return uuid.uuid5(_NAMESPACE, key).hex


def key_digest(key: str) -> str:
    """A short, tag-safe digest of a job key (the value of :data:`JOB_KEY_TAG`)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class NullSink:
    """The sink of a rank that does not write (``ranks="zero"``, rank > 0): accepts everything, keeps nothing."""

    async def open(self, request: RunRequest) -> RunInfo:
        return RunInfo(
            run_id="",
            experiment_id="",
            experiment_name=request.experiment_name,
            run_name=request.run_name,
            artifact_uri="",
            tracking_uri="",
            start_time=request.start_time,
            user_id=request.user_id,
        )

    async def write(self, batch: Batch) -> None:
        batch.done.update(_all_entries(batch))

    async def close(self, status: RunStatus, end_time: int) -> None:
        return None

    def write_sync(self, batch: Batch) -> None:
        batch.done.update(_all_entries(batch))

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        return None


def _all_entries(batch: Batch) -> list[tuple[str, str]]:
    return (
        [("metric", k) for k, _v in batch.metrics]
        + [("param", k) for k, _v in batch.params]
        + [("tag", k) for k, _v in batch.tags]
        + [("artifact", a.artifact_path) for a in batch.artifacts]
    )


# ---------------------------------------------------------------------------- the parent on a local store


def open_local_parent(root: Path, experiment: str, key: str, request: RunRequest) -> tuple[str, str]:
    """Find or create the job's parent run in the local store; ``(experiment_id, parent_run_id)``.

    Every rank calls this at the same time: the parent's folder is made with one ``mkdir`` (atomic),
    and only the rank that made it writes the parent's meta and tags.
    """
    from ._layout import META, RUN_DIRS, dump_meta, file_uri, parse_meta, run_meta, write_atomic
    from ._runmeta import source_name
    from .sinks.mlruns import MlrunsSink

    experiment_id = MlrunsSink(root).experiment_for(experiment)
    run_id = parent_run_id(key)
    run_dir = root / experiment_id / run_id
    try:
        run_dir.mkdir()
    except FileExistsError:
        return experiment_id, run_id  # another rank made it (or an earlier attempt of this job): join it
    exp_meta = parse_meta((root / experiment_id / META).read_text(encoding="utf-8"))
    location = str(exp_meta.get("artifact_location") or file_uri(root / experiment_id))
    for name in RUN_DIRS:
        (run_dir / name).mkdir(exist_ok=True)
    tags = {
        "mlflow.user": request.user_id,
        "mlflow.source.name": source_name(),
        "mlflow.source.type": "LOCAL",
        **{k: v for k, v in request.tags.items() if k not in (PARENT_TAG, RANK_TAG)},
        "mlflow.runName": request.run_name,
        JOB_KEY_TAG: key_digest(key),
        JOB_PARENT_TAG: "true",
    }
    for tag, value in tags.items():
        write_atomic(run_dir / "tags" / tag, value.encode(), temp_dir=run_dir)
    meta = run_meta(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=request.run_name,
        artifact_uri=f"{location.rstrip('/')}/{run_id}/artifacts",
        user_id=request.user_id,
        start_time=request.start_time,
        end_time=None,
        status=int(RunStatus.RUNNING),
    )
    write_atomic(run_dir / META, dump_meta(meta).encode())
    return experiment_id, run_id


_WORSE = {RunStatus.FINISHED: 0, RunStatus.RUNNING: 0, RunStatus.SCHEDULED: 0, RunStatus.FAILED: 1, RunStatus.KILLED: 2}


def end_local_parent(run_dir: Path, status: RunStatus, end_time: int) -> None:
    """Record a child's end on the parent: the latest end time, and the worst status seen so far."""
    from ._layout import META, dump_meta, parse_meta, write_atomic

    path = run_dir / META
    for _ in range(50):  # the meta may not be written yet by the rank that made the folder
        try:
            meta = parse_meta(path.read_text(encoding="utf-8"))
            break
        except (OSError, ValueError):
            time.sleep(0.02)
    else:
        return
    try:
        old = RunStatus(int(meta.get("status") or 1))
    except (TypeError, ValueError):
        old = RunStatus.RUNNING
    ended = meta.get("end_time") is not None
    if ended and _WORSE.get(old, 0) > _WORSE.get(status, 0):
        status = old
    meta["status"] = int(status)
    meta["end_time"] = max(end_time, int(meta["end_time"])) if ended else end_time
    write_atomic(path, dump_meta(meta).encode())


# ---------------------------------------------------------------------------- the parent on a tracking server


async def open_server_parent(
    client: Any, experiment_id: str, key: str, request: RunRequest, world_size: int, *, timeout: float = 60.0
) -> str:
    """Find or create the job's parent run on a tracking server (see the module docstring); its run id."""
    digest = key_digest(key)
    settled = await _search(
        client, experiment_id, f"tags.`{JOB_KEY_TAG}` = '{digest}' and tags.`{JOB_PARENT_TAG}` = 'true'"
    )
    if settled:
        return min(str(r["info"]["run_id"]) for r in settled)
    tags = {
        "mlflow.user": request.user_id,
        "mlflow.source.type": "LOCAL",
        **{k: v for k, v in request.tags.items() if k not in (PARENT_TAG, RANK_TAG)},
        "mlflow.runName": request.run_name,
        JOB_KEY_TAG: digest,
    }
    mine = await client.create_run(
        experiment_id,
        run_name=request.run_name,
        user_id=request.user_id,
        start_time=request.start_time,
        tags=tags,
        run_key=uuid.uuid4().hex,
        deadline=anyio.current_time() + timeout,
    )
    my_id = str(mine["run_id"])
    deadline = anyio.current_time() + timeout
    candidates: list[str] = []
    while True:
        found = await _search(client, experiment_id, f"tags.`{JOB_KEY_TAG}` = '{digest}'")
        candidates = sorted(str(r["info"]["run_id"]) for r in found)
        if len(candidates) >= world_size or anyio.current_time() > deadline:
            break
        await anyio.sleep(0.1)
    if not candidates:
        raise StepLogError(f"the job's parent run could not be found on {client.display_uri}")
    chosen = check_run_id(candidates[0], f"the run id {client.display_uri} answered")
    if chosen == my_id:
        await client.request(
            "POST", "/api/2.0/mlflow/runs/set-tag", json={"run_id": my_id, "key": JOB_PARENT_TAG, "value": "true"}
        )
    else:
        await client.request("POST", "/api/2.0/mlflow/runs/delete", json={"run_id": my_id})
    return chosen


async def _search(client: Any, experiment_id: str, filter_: str) -> list[dict[str, Any]]:
    response = await client.request(
        "POST",
        "/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": filter_, "run_view_type": "ALL", "max_results": 1000},
    )
    runs: list[dict[str, Any]] = response.json().get("runs") or []
    return runs


@dataclasses.dataclass(frozen=True, slots=True)
class JobPlan:
    """What ``start_run`` decided for this rank."""

    mode: RanksMode
    ranks: Ranks
    writes: bool
    key: str | None = None
    parent_name: str | None = None


EndParent = Callable[[RunStatus, int], None]


async def open_parent(
    sinks: Sequence[Sink], request: RunRequest, job: JobPlan, options: Any
) -> tuple[str, str, EndParent]:
    """Find or create the job's parent in the run's first destination: ``(parent id, experiment id, end)``.

    ``end(status, end_time)`` records this rank's end on the parent when its child run ends.
    """
    from .sinks.mlruns import MlrunsSink

    assert job.key is not None
    first = sinks[0]
    parent_request = RunRequest(
        experiment_name=request.experiment_name,
        run_name=job.parent_name or request.run_name,
        tags=dict(request.tags),
        start_time=request.start_time,
        user_id=request.user_id,
    )
    if isinstance(first, MlrunsSink):
        root = first.root
        experiment_id, parent_id = await anyio.to_thread.run_sync(
            open_local_parent, root, request.experiment_name, job.key, parent_request
        )
        run_dir = root / experiment_id / parent_id
        return parent_id, experiment_id, lambda status, end: end_local_parent(run_dir, status, end)
    uri = getattr(first, "uri", None)
    if isinstance(uri, str) and uri.lower().startswith(("http://", "https://")):
        from .sinks.mlflow_rest import RestClient

        client = RestClient(uri)
        try:
            deadline = anyio.current_time() + options.start_timeout
            experiment_id = await client.experiment_id(request.experiment_name, deadline=deadline)
            parent_id = await open_server_parent(
                client,
                experiment_id,
                job.key,
                parent_request,
                job.ranks.world_size,
                timeout=max(60.0, options.start_timeout),
            )
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
        return parent_id, experiment_id, lambda status, end: end_server_parent(uri, parent_id, status, end)
    raise StepLogError(
        f"ranks='each' needs a tracking_uri (a local store or an MLflow tracking server) as the first "
        f"destination, not {type(first).__name__}"
    )


def end_server_parent(uri: str, parent_id: str, status: RunStatus, end_time: int) -> None:
    """Record a child's end on a server's parent run (latest end, worst status), bounded."""
    from urllib.parse import urlsplit

    import httpx

    from .sinks.mlflow_rest import client_options, redact

    options = client_options()
    parts = urlsplit(uri)
    if parts.username is not None and "auth" not in options and "Authorization" not in options["headers"]:
        options["auth"] = httpx.BasicAuth(parts.username, parts.password or "")
    with httpx.Client(base_url=redact(uri.rstrip("/")), timeout=10.0, **options) as http:
        got = http.get("/api/2.0/mlflow/runs/get", params={"run_id": parent_id})
        got.raise_for_status()
        info = got.json()["run"]["info"]
        old_end = info.get("end_time")
        try:
            old = RunStatus[str(info.get("status"))]
        except KeyError:
            old = RunStatus.RUNNING
        if old_end is not None and old is not RunStatus.RUNNING:
            if _WORSE.get(old, 0) > _WORSE.get(status, 0):
                status = old
            end_time = max(end_time, int(old_end))
        http.post(
            "/api/2.0/mlflow/runs/update",
            json={"run_id": parent_id, "status": status.name, "end_time": end_time},
        ).raise_for_status()
