"""``steplog sync SOURCE --to URL``: upload a local mlruns store, or an outage journal, to a tracking server.

Idempotent, so it is safe to run again after an interruption or by mistake:

* a run is matched to the server's copy by its id (a run written to a server and a
  local store at once, or a journal) or by the ``steplog.run_key`` tag an earlier
  sync set to the local run id, and created only when neither exists;
* metric points are sent with their original timestamps, and the server keeps one
  copy of an identical (key, timestamp, step, value) point; params are immutable and
  tags are overwritten with the same values; artifacts are uploaded again in place;
* a journal remembers how far the server acknowledged it, and resumes from there.

This is also the way from a store written without network (an HPC node) into a server.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import StepLogError
from .._journal import Journal, journal_folders
from .._layout import uri_to_path

if TYPE_CHECKING:
    import httpx

    from ..sinks.mlflow_rest import RestClient

__all__ = ["SyncResult", "register", "sync"]


@dataclasses.dataclass(frozen=True, slots=True)
class SyncResult:
    """What one run's upload did."""

    source: str
    """The local run id (or the journal folder)."""
    run_id: str
    """The run's id on the server."""
    experiment_id: str
    points: int
    params: int
    tags: int
    artifacts: int
    created: bool
    """True when the run was created on the server by this sync."""


async def sync(
    source: str | Path,
    url: str,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    timeout: float = 60.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[SyncResult]:
    """Upload ``source`` (an mlruns store, a run's journal, or a folder of journals) to the server at ``url``.

    Args:
        experiment: only runs of this experiment (name or id; mlruns sources).
        run_ids: only these runs (ids or unique prefixes; mlruns sources).
        timeout: seconds each request may keep failing transiently before giving up.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise StepLogError(f"--to {url!r} is not a tracking server URL: give http(s)://host:port")
    try:
        from ..sinks.mlflow_rest import RestClient
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StepLogError(f"steplog sync needs the REST extra: pip install 'steplog[rest]' ({exc})") from exc
    path = Path(source)
    if not await anyio.Path(path).exists():
        raise StepLogError(f"{path} does not exist: give an mlruns directory or a journal folder")
    client = RestClient(url, transport=transport)
    try:
        journals = await anyio.to_thread.run_sync(journal_folders, path)
        if journals:
            return [await _sync_journal(client, folder, timeout) for folder in journals]
        return await _sync_store(client, path, experiment, run_ids, timeout)
    except OSError as exc:  # an unreadable file of the source: one line, not a traceback
        if isinstance(exc, StepLogError):
            raise
        raise StepLogError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def _deadline(timeout: float) -> float:
    return anyio.current_time() + timeout


async def _sync_journal(client: RestClient, folder: Path, timeout: float) -> SyncResult:
    """Replay a journal from where the server last acknowledged it; the run must exist on the server."""
    journal = Journal.open(folder)
    try:
        header = journal.header
        run_id = str(header["run_id"])
        info = await client.retrying(
            lambda: client.get_run(run_id), deadline=_deadline(timeout), what=f"looking up run {run_id}"
        )
        if info is None:
            raise StepLogError(
                f"run {run_id} of journal {folder} does not exist on {client.display_uri} (the journal was "
                f"written for {header.get('tracking_uri')}): sync it to that server"
            )
        artifact_uri = str(info.get("artifact_uri") or header.get("artifact_uri") or "")
        points = artifacts = 0
        for offset, op in journal.pending():
            kind = op.get("op")
            if kind == "batch":
                body = _orjson_dumps(op["body"])
                await client.retrying(
                    partial(client.log_batch, body),
                    deadline=_deadline(timeout),
                    what=f"uploading {folder}",
                )
                points += int(op.get("points", 0))
            elif kind == "artifact":
                artifacts += await _upload_tree(
                    client, artifact_uri, journal.artifact_file(op["path"]), op["path"], timeout
                )
            elif kind == "end":
                await client.retrying(
                    partial(client.update_run, run_id, str(op["status"]), int(op["end_time"])),
                    deadline=_deadline(timeout),
                    what=f"ending run {run_id}",
                )
            journal.ack(offset)
        return SyncResult(str(folder), run_id, str(info["experiment_id"]), points, 0, 0, artifacts, created=False)
    finally:
        journal.close()


async def _sync_store(
    client: RestClient, root: Path, experiment: str | None, run_ids: Sequence[str] | None, timeout: float
) -> list[SyncResult]:
    from ..store import Store, StoreError

    try:
        store = Store(root)
        experiments = [store.experiment(experiment)] if experiment is not None else store.experiments()
    except StoreError as exc:
        raise StepLogError(f"{root} is neither a journal nor a readable mlruns store: {exc}") from exc
    wanted = None if not run_ids else {store.resolve_run_id(r) for r in run_ids}
    results: list[SyncResult] = []
    for exp in experiments:
        runs = [r for r in store.runs(exp.experiment_id) if wanted is None or r.run_id in wanted]
        if not runs:
            continue
        exp_id = await client.experiment_id(exp.name, deadline=_deadline(timeout))
        results.extend([await _sync_run(client, store, run, exp_id, timeout) for run in runs])
    if wanted is not None and len(results) < len(wanted):
        missing = wanted - {r.source for r in results}
        raise StepLogError(f"runs not found in the selected experiments: {', '.join(sorted(missing))}")
    return results


async def _sync_run(client: RestClient, store: Any, run: Any, experiment_id: str, timeout: float) -> SyncResult:
    from ..sinks.mlflow_rest import RUN_KEY_TAG, encode_log_batches

    what = f"uploading run {run.run_id}"
    info = await client.retrying(lambda: client.get_run(run.run_id), deadline=_deadline(timeout), what=what)
    created = False
    if info is None:
        info = await client.retrying(
            lambda: client.find_run(experiment_id, run.run_id), deadline=_deadline(timeout), what=what
        )
    if info is None:
        tags = {k: v for k, v in run.tags.items() if k != RUN_KEY_TAG}
        name = run.run_name or tags.get("mlflow.runName") or run.run_id
        tags["mlflow.runName"] = name
        info = await client.create_run(
            experiment_id,
            run_name=name,
            user_id=run.user_id,
            start_time=int(run.start_time or 0),
            tags=tags,
            run_key=run.run_id,
            deadline=_deadline(timeout),
        )
        created = True
    run_id = str(info["run_id"])
    tags = {k: v for k, v in run.tags.items() if k != RUN_KEY_TAG}
    bodies = encode_log_batches(run_id, [], sorted(run.params.items()), sorted(tags.items()))
    points = 0
    for key in store.metric_keys(run.run_id):
        history = store.metric_history(run.run_id, key)
        items: list[Any] = []
        for step, value, ts in zip(history.steps, history.values, history.timestamps, strict=True):
            items += (ts, value, step)
        bodies += encode_log_batches(run_id, [(key, items)])
        points += len(history)
    for body, _n in bodies:
        await client.retrying(partial(client.log_batch, body), deadline=_deadline(timeout), what=what)
    artifacts = 0
    if run.artifact_uri.startswith("file:") or "://" not in run.artifact_uri:
        folder = uri_to_path(run.artifact_uri) if run.artifact_uri else run.path / "artifacts"
        if folder.is_dir():
            artifact_uri = str(info.get("artifact_uri") or "")
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = file.relative_to(folder).as_posix()
                artifacts += await _upload_tree(client, artifact_uri, file, rel, timeout)
    if run.status.name != "RUNNING" and run.end_time is not None:
        status, end_time = run.status.name, int(run.end_time)
        await client.retrying(
            lambda: client.update_run(run_id, status, end_time), deadline=_deadline(timeout), what=what
        )
    return SyncResult(
        run.run_id, run_id, str(info["experiment_id"]), points, len(run.params), len(tags), artifacts, created
    )


async def _upload_tree(client: RestClient, artifact_uri: str, source: Path, artifact_path: str, timeout: float) -> int:
    """Upload a file (or each file of a directory) under ``artifact_path``; returns the number of files."""
    from ..sinks.mlflow_rest import artifact_files

    files = await anyio.to_thread.run_sync(artifact_files, source, artifact_path)
    for file, dest in files:
        data = await anyio.Path(file).read_bytes()
        await client.retrying(
            partial(client.upload_artifact, artifact_uri, dest, data),
            deadline=_deadline(timeout),
            what=f"uploading artifact {dest}",
        )
    return len(files)


def _orjson_dumps(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj)


# ---------------------------------------------------------------------------- the command


def register(subparsers: Any) -> None:
    """Add ``steplog sync`` to the command line."""
    parser = subparsers.add_parser(
        "sync",
        help="upload a local mlruns store or an outage journal to an MLflow tracking server",
        description=(
            "Upload a local mlruns store, a run's outage journal, or a folder of journals to an MLflow "
            "tracking server. Safe to run again: each point, param and tag is stored once."
        ),
    )
    parser.add_argument("source", help="an mlruns directory, a journal folder, or a folder of journals")
    parser.add_argument("--to", required=True, metavar="URL", help="the tracking server, http(s)://host:port")
    parser.add_argument("--experiment", help="only this experiment (name or id; mlruns sources)")
    parser.add_argument(
        "--run", dest="run_ids", action="append", metavar="RUN_ID", help="only this run (repeatable; mlruns sources)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a request may keep failing before giving up (60)"
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from . import CommandError

    if not args.to.lower().startswith(("http://", "https://")):
        raise CommandError(f"--to {args.to!r} is not a tracking server URL: give http(s)://host:port")
    results = anyio.run(
        lambda: sync(args.source, args.to, experiment=args.experiment, run_ids=args.run_ids, timeout=args.timeout)
    )
    from ..sinks.mlflow_rest import redact

    target = redact(args.to)
    if not results:
        print(f"nothing to upload from {args.source}")
        return 0
    for r in results:
        what = "created" if r.created else "updated"
        print(
            f"{r.source} -> {target} run {r.run_id} (experiment {r.experiment_id}, {what}): {r.points} points, "
            f"{r.params} params, {r.tags} tags, {r.artifacts} artifact files"
        )
    return 0
