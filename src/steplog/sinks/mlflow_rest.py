"""An MLflow tracking server over its REST API (needs the ``rest`` extra: httpx).

What the server is sent, and how (MLFLOW_FORMAT.md §3):

* Start: the experiment is fetched by name or created (a creation race is
  resolved by fetching again); the run is created with a client-generated
  ``steplog.run_key`` tag, so a ``runs/create`` whose answer was lost is found by a
  search instead of being created twice. Every identifier the server answers (run
  id, experiment id, artifact URI) is checked before it is used. A server that
  cannot be reached within ``start_timeout`` seconds, or whose answers are not
  MLflow's, is a :class:`~steplog.StepLogError` at start.
* Data: batches become ``runs/log-batch`` requests within every server limit
  (1000 metrics, 100 params, 100 tags, 1000 entities, 1 MB body; a key once per
  request), cut as full as fits from the front of the backlog and sent one at a
  time so order holds. Each request has a total deadline (``request_timeout``),
  however slowly the server trickles its answer.
* Artifacts: ``PUT`` through the server's ``mlflow-artifacts`` proxy.
* End: ``runs/update`` with status and end time.
* Errors: connection errors, the deadline and HTTP 408, 429 (``Retry-After``
  honoured), 500 (MLflow's JSON error), 502, 503 and 504 are transient. A 401/403
  (an expired token) or an answer that is not MLflow's keeps the data in the journal
  for ``steplog sync`` and says what to fix. TLS failures are permanent and say
  which. Any other refusal becomes a :class:`~steplog.ServerError` naming the
  server's ``error_code`` and message.
* Outage: the sink takes each batch into its own backlog and returns at once, so
  the writer keeps draining and the training loop never waits. The backlog is
  sent in order when the server answers again (capped exponential backoff with
  jitter between tries), in full requests back to back; past ``max_buffer`` points
  it is spilled to the on-disk journal (:mod:`steplog._journal`). Timestamps are
  fixed when a point is logged, so a request sent twice stores each point once.
  :meth:`MlflowRestSink.outage_state` describes an outage while it lasts.
* Close: a backlog is journaled first, then sent with the time left, so a process
  killed soon after SIGTERM still has every point on disk. After SIGTERM or SIGINT
  (:meth:`MlflowRestSink.interrupt`) a request in flight is abandoned and nothing
  waits on the network before the journal holds everything, even when the server
  hangs instead of refusing. What the server has not
  acknowledged stays in the journal, and the error names the ``steplog sync``
  command that finishes the upload.

Auth and TLS come from MLflow's environment variables: ``MLFLOW_TRACKING_TOKEN``
(bearer), ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic; else the
URL's percent-decoded ``user:password``), ``MLFLOW_TRACKING_INSECURE_TLS``,
``MLFLOW_TRACKING_SERVER_CERT_PATH`` and ``MLFLOW_TRACKING_CLIENT_CERT_PATH``.
Secrets never appear in messages.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from .._errors import ServerError, StepLogError, WriteError
from .._journal import Journal
from .._records import ArtifactRecord, RunInfo, RunStatus
from .._runmeta import check_run_id, system_tags
from ..typing import Batch, RunRequest
from ._rest.client import API, AuthError, NotMlflowError, replay_sync
from ._rest.client import RUN_KEY_TAG as RUN_KEY_TAG
from ._rest.client import RestClient as RestClient
from ._rest.client import artifact_files as artifact_files
from ._rest.encode import MAX_BODY_BYTES as MAX_BODY_BYTES
from ._rest.encode import encode_log_batches as encode_log_batches
from ._rest.encode import encode_parts
from ._rest.options import client_options as client_options
from ._rest.options import redact as redact
from ._rest.outage import Backlog, OutageState
from ._rest.retry import RetryPolicy as RetryPolicy
from ._rest.retry import TransientError

__all__ = ["MlflowRestSink", "OutageState", "RetryPolicy"]

# defined in private modules, documented here: they print as this module's names
OutageState.__module__ = RetryPolicy.__module__ = __name__

log = logging.getLogger("steplog")

_RECOVERABLE = (AuthError, NotMlflowError)
"""Refusals that a fix elsewhere undoes (a new token, the right URL): the data goes to the journal, not away."""


class MlflowRestSink:
    """Streams a run to an MLflow tracking server (see the module docstring for the contract).

    Args:
        uri: ``http(s)://[user:password@]host:port[/prefix]`` of the tracking server.
        max_buffer: metric points held in memory during an outage before the backlog
            is spilled to the journal.
        journal_dir: where outage journals go (default ``STEPLOG_JOURNAL_DIR`` or
            ``./steplog-journal``); nothing is written there unless an outage outlasts
            ``max_buffer`` or the run closes before the server acknowledged everything.
        start_timeout: seconds to reach the server when the run starts (then a StepLogError).
        request_timeout: seconds one request may take in all (connect, send, answer).
        retry: the backoff between tries.
        transport: an httpx transport (tests inject ``httpx.MockTransport``).
    """

    def __init__(
        self,
        uri: str,
        *,
        max_buffer: int = 1_000_000,
        journal_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        request_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self._max_buffer = max_buffer
        self._journal_dir = Path(journal_dir or os.environ.get("STEPLOG_JOURNAL_DIR") or "steplog-journal").absolute()
        self._start_timeout = start_timeout
        self._request_timeout = request_timeout
        self._retry = retry or RetryPolicy()
        self._transport = transport
        self._client: RestClient | None = None
        self._info: RunInfo | None = None
        self._backlog = Backlog(self._open_journal)
        self._attempt = 0
        self._retry_at = 0.0
        self._outage_since: float | None = None
        self._held: ServerError | None = None
        """A recoverable refusal (401/403, not MLflow) that holds the backlog until the server takes it."""
        self._closed = False
        self._interrupted = False
        """The process got SIGTERM/SIGINT and the run is closing: journal before any network wait."""
        self._sending: anyio.CancelScope | None = None
        self._refused: list[StepLogError] = []
        self._unreported: list[StepLogError] = []
        self._last_error: str | None = None
        self._retries = 0
        self.bytes_written = 0
        self.acknowledged_points = 0
        """Metric points the server acknowledged."""
        self.requests = 0

    @property
    def display_uri(self) -> str:
        """The server's URL without credentials."""
        return redact(self.uri)

    @property
    def journal_path(self) -> Path | None:
        """The journal folder of this run, once one exists."""
        journal = self._backlog.journal
        return None if journal is None else journal.folder

    @property
    def backlog_points(self) -> int:
        """Metric points taken from the writer and not yet acknowledged by the server (memory and journal)."""
        return self._backlog.points

    @property
    def spilled_points(self) -> int:
        """Metric points moved to the journal so far."""
        return self._backlog.spilled_points

    def outage_state(self) -> OutageState:
        """How the sink stands with its server: backlog, spilled points, retries, the last error in words."""
        since = self._outage_since
        return OutageState(
            backlog_points=self._backlog.points,
            memory_points=self._backlog.memory_points,
            journal_points=self._backlog.journal_points,
            spilled_points=self._backlog.spilled_points,
            acknowledged_points=self.acknowledged_points,
            requests=self.requests,
            retries=self._retries,
            last_error=self._last_error,
            outage_seconds=0.0 if since is None else time.monotonic() - since,
            journal=self.journal_path,
        )

    # ------------------------------------------------------------------ open

    async def open(self, request: RunRequest) -> RunInfo:
        """Get or create the experiment and create (or join) the run; a StepLogError if the server is unreachable."""
        client = RestClient(self.uri, timeout=self._request_timeout, retry=self._retry, transport=self._transport)
        self._client = client
        deadline = anyio.current_time() + self._start_timeout
        try:
            if request.run_id is not None:
                info = await self._join(client, request, deadline)
            else:
                experiment_id = request.experiment_id or await client.experiment_id(
                    request.experiment_name, deadline=deadline
                )
                info = await client.create_run(
                    experiment_id,
                    run_name=request.run_name,
                    user_id=request.user_id,
                    start_time=request.start_time,
                    tags=system_tags(request.user_id, request.run_name, request.tags),
                    run_key=uuid.uuid4().hex,
                    deadline=deadline,
                )
            self._info = _run_info(info, request, self.display_uri)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            self._client = None
            raise
        return self._info

    async def _join(self, client: RestClient, request: RunRequest, deadline: float) -> dict[str, Any]:
        run_id = check_run_id(request.run_id, "the first destination")
        info = await client.retrying(lambda: client.get_run(run_id), deadline=deadline, what=f"joining run {run_id}")
        if info is None:
            raise StepLogError(
                f"run {run_id} does not exist on {self.display_uri}: put the server first in "
                "tracking_uri, so the server creates the run and the other destinations join it"
            )
        return info

    # ------------------------------------------------------------------ write

    async def write(self, batch: Batch) -> None:
        """Take the batch into the backlog (marking it done) and send what is due, in order.

        Returns without waiting out an outage: the backlog keeps the data (in memory up to
        ``max_buffer`` points, then in the journal) and is retried at the next write or at close.
        Raises once for requests the server refused: for good (ServerError), or until a fix
        elsewhere (401/403, an answer that is not MLflow's: the data is in the journal).
        """
        self._take(batch)
        if self._backlog.memory_points > self._max_buffer or (self._held is not None and self._backlog.memory):
            # past the memory allowance, or held by a refusal only a fix undoes: to the journal
            await anyio.to_thread.run_sync(self._spill)
        # once interrupted, the close that follows journals the backlog before it tries the server
        if anyio.current_time() >= self._retry_at and not self._interrupted:
            with anyio.CancelScope() as self._sending:
                await self._send_backlog()
            self._sending = None
        if self._unreported:
            errors, self._unreported = self._unreported, []
            raise errors[0]

    def interrupt(self) -> None:
        """The process got SIGTERM or SIGINT and the run is closing (the writer calls this in its loop).

        A request in flight is abandoned (its points stay in the backlog: only an answer removes
        them), later writes only take their batch, and :meth:`close` journals the backlog before
        it tries the server: a server that hangs cannot keep the points in memory until SIGKILL.
        """
        self._interrupted = True
        if self._sending is not None:
            self._sending.cancel()

    def _take(self, batch: Batch) -> None:
        """Move the batch's unfinished entries into the backlog (the sink now answers for them)."""
        info = self._require_info()
        rest = batch.remaining()
        self._backlog.add(encode_parts(info.run_id, rest.metrics, rest.params, rest.tags), list(rest.artifacts))
        done = batch.done
        done.update(("metric", k) for k, _ in rest.metrics)
        done.update(("param", k) for k, _ in rest.params)
        done.update(("tag", k) for k, _ in rest.tags)
        done.update(("artifact", a.artifact_path) for a in rest.artifacts)

    async def _send_backlog(self, *, timeout: float | None = None) -> bool:
        """Send the journal's pending lines, then the memory backlog, in order, in full requests back to back.

        False at the first transient failure (the outage goes on) or recoverable refusal.
        """
        client = self._client
        info = self._require_info()
        assert client is not None
        if self._outage_since is not None and timeout is None:
            timeout = min(self._request_timeout, 5.0)  # a probe of a server that did not answer: short
        backlog = self._backlog
        try:
            for offset, op in backlog.journal_ops():
                points = int(op.get("points", 0))
                if op["op"] == "batch":
                    await self._send(client.log_batch(orjson.dumps(op["body"]), timeout=timeout), points)
                elif op["op"] == "artifact":
                    await self._send_artifact(backlog.journal.artifact_file(op["path"]), op["path"])  # type: ignore[union-attr]
                elif op["op"] == "end":
                    continue  # the end is recorded by close()
                await anyio.to_thread.run_sync(backlog.ack_journal, offset, points)
            if backlog.journal is not None:
                await anyio.to_thread.run_sync(backlog.journal_done)
            while (front := backlog.front(info.run_id)) is not None:
                if isinstance(front, ArtifactRecord):
                    await self._send_record(front)
                    backlog.pop(1, 0)
                else:
                    body, points, n = front
                    await self._send(client.log_batch(body, timeout=timeout), points, len(body))
                    backlog.pop(n, points)
        except TransientError as exc:
            self._enter_outage(exc)
            return False
        except _RECOVERABLE as exc:
            self._hold(exc)
            return False
        if self._outage_since is not None or self._held is not None:
            log.warning("steplog: the MLflow server at %s is taking data again; the backlog is sent", self.display_uri)
        self._outage_since = None
        self._held = None
        self._last_error = None
        self._attempt = 0
        self._retry_at = 0.0
        return True

    async def _send(self, request: Any, points: int, size: int = 0) -> None:
        """Await one request; a permanent refusal is recorded (not retried); transient and recoverable ones raised."""
        self.requests += 1
        try:
            await request
        except _RECOVERABLE:
            raise  # the data stays in the backlog (and goes to the journal): see _hold
        except StepLogError as exc:  # ServerError, or an artifact the server cannot take: not retried
            self._refused.append(exc)
            self._unreported.append(exc)
            self._last_error = str(exc)
            log.error("steplog: %s (%d metric points not stored)", exc, points)
            return
        self.acknowledged_points += points
        self.bytes_written += size

    async def _send_record(self, record: ArtifactRecord) -> None:
        if record.data is not None:
            await self._send(self._upload(record.artifact_path, record.data), 0, len(record.data))
        elif record.source is not None:
            await self._send_artifact(Path(record.source), record.artifact_path)

    async def _send_artifact(self, source: Path, artifact_path: str) -> None:
        """Upload a file, or every file of a directory, under ``artifact_path``."""
        for file, dest in await anyio.to_thread.run_sync(artifact_files, source, artifact_path):
            try:
                data = await anyio.Path(file).read_bytes()
            except OSError as exc:  # gone or unreadable: retrying would stall everything behind it
                error = StepLogError(f"cannot read artifact {dest!r} from {file}: {exc.strerror or exc}")
                self._refused.append(error)
                self._unreported.append(error)
                log.error("steplog: %s", error)
                continue
            await self._send(self._upload(dest, data), 0, len(data))

    async def _upload(self, path: str, data: bytes) -> None:
        assert self._client is not None
        assert self._info is not None
        await self._client.upload_artifact(self._info.artifact_uri, path, data)

    def _enter_outage(self, exc: Exception) -> None:
        now = anyio.current_time()
        self._retries += 1
        self._last_error = str(exc) or type(exc).__name__
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "steplog: the MLflow server at %s is not answering (%s); records are kept (in memory up to "
                "max_buffer=%d points, then in the journal under %s) and sent when it is back",
                self.display_uri,
                self._last_error,
                self._max_buffer,
                self._journal_dir,
            )
        self._retry_at = now + self._retry.delay(self._attempt, getattr(exc, "retry_after", None))
        self._attempt += 1

    def _hold(self, exc: ServerError) -> None:
        """A refusal that a fix elsewhere undoes: keep everything in the journal, say it once, try again later."""
        first = self._held is None
        self._held = exc
        self._enter_outage(exc)
        if first:
            self._unreported.append(
                type(exc)(
                    f"{exc}. The data is kept in the journal under {self._journal_dir}; once fixed, upload it "
                    f"with: steplog sync {self._journal_dir} --to {self.display_uri}",
                    status=getattr(exc, "status", None),
                    error_code=getattr(exc, "error_code", None),
                )
            )
            log.error("steplog: %s", exc)

    # ------------------------------------------------------------------ the journal

    def _open_journal(self) -> Journal:
        info = self._require_info()
        return Journal.create(
            self._journal_dir,
            {
                "tracking_uri": self.display_uri,
                "run_id": info.run_id,
                "experiment_id": info.experiment_id,
                "experiment_name": info.experiment_name,
                "run_name": info.run_name,
                "artifact_uri": info.artifact_uri,
            },
        )

    def _spill(self, end: tuple[RunStatus, int] | None = None) -> None:
        """Move the memory backlog (and the run's end, if given) to the journal, in order."""
        info = self._require_info()
        self._backlog.spill(info.run_id, None if end is None else (end[0].name, end[1]))

    # ------------------------------------------------------------------ close

    async def close(self, status: RunStatus, end_time: int) -> None:
        """Journal any backlog, then send it and end the run within the caller's deadline.

        What the server has not acknowledged by then stays in the journal, and a
        StepLogError names the ``steplog sync`` command that finishes the upload.
        """
        client = self._client
        if client is None or self._closed:
            return
        self._closed = True
        budget = _budget(anyio.current_effective_deadline(), self._request_timeout)
        ended = end_journaled = False
        try:
            with anyio.move_on_after(budget):
                if self._backlog.memory and (
                    self._outage_since is not None or self._held is not None or self._interrupted
                ):
                    # journal first: a SIGKILL that follows a SIGTERM must not find the backlog only in memory
                    await anyio.to_thread.run_sync(self._spill)
                while not await self._send_backlog(timeout=self._request_timeout):
                    if self._held is not None:
                        break  # only a fix elsewhere helps: the journal keeps it
                    await anyio.sleep(max(0.0, self._retry_at - anyio.current_time()))
                info = self._require_info()
                while self._held is None:
                    if self._interrupted and not end_journaled:
                        # SIGKILL may come while the server takes the end: the journal records it first
                        # (everything before it is acknowledged), and goes once the server has it
                        await anyio.to_thread.run_sync(lambda: self._spill(end=(status, end_time)))
                        end_journaled = True
                    try:
                        with anyio.CancelScope() as sending:
                            self._sending = sending
                            await client.update_run(info.run_id, status.name, end_time)
                        self._sending = None
                        if sending.cancelled_caught:
                            continue  # interrupted by a signal: journal the end, then try again
                        ended = True
                        if end_journaled:
                            await anyio.to_thread.run_sync(self._backlog.journal_done)
                        break
                    except TransientError as exc:
                        self._enter_outage(exc)
                        await anyio.sleep(max(0.0, self._retry_at - anyio.current_time()))
        except _RECOVERABLE as exc:
            self._hold(exc)
        finally:
            self._sending = None
            if not (ended or end_journaled):
                self._spill(end=(status, end_time))
            self._backlog.close_journal()
            with anyio.CancelScope(shield=True):
                await client.aclose()
            self._client = None
        if not ended:
            raise StepLogError(self._left_in_journal_message())
        if self._refused:
            first = self._refused[0]
            raise ServerError(
                f"the MLflow server refused {len(self._refused)} request(s) for good; the first: {first}",
                status=getattr(first, "status", None),
                error_code=getattr(first, "error_code", None),
            )

    def _left_in_journal_message(self) -> str:
        folder = self.journal_path
        reason = f" ({self._last_error})" if self._last_error else ""
        return (
            f"the MLflow server at {self.display_uri} did not acknowledge everything before close() ran out of "
            f"time{reason}: {self._backlog.journal_points} metric points (and the run's end) are kept in the "
            f"journal {folder}. Finish the upload with: steplog sync {folder} --to {self.display_uri}"
        )

    # ------------------------------------------------------------------ emergency path

    def write_sync(self, batch: Batch) -> None:
        """Emergency write (no event loop): spill the batch to the journal, behind the backlog (no network)."""
        self._take(batch)
        self._spill()

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        """Emergency close (no event loop): journal first, then try the server with a short budget.

        The backlog and the run's end are in the journal (fsynced) before any network wait;
        then a blocking client replays it within ``min(request_timeout, 5)`` seconds in all.
        What the server did not acknowledge stays in the journal, and the warning names the
        ``steplog sync`` command that finishes the upload.
        """
        info = self._info
        if info is None or self._closed:
            return
        self._closed = True
        self._spill(end=(status, end_time))
        backlog = self._backlog
        journal = backlog.journal
        if journal is not None:

            def ack(offset: int, points: int) -> None:
                backlog.ack_journal(offset, points)
                self.acknowledged_points += points

            transport = self._transport if isinstance(self._transport, httpx.BaseTransport) else None
            sent = replay_sync(
                self.uri, journal.pending(), ack, run_id=info.run_id, budget=min(self._request_timeout, 5.0),
                transport=transport,
            )  # fmt: skip
            if sent:
                backlog.journal_done()
                return
        backlog.close_journal()
        log.warning("steplog: %s", self._left_in_journal_message())

    def _require_info(self) -> RunInfo:
        if self._info is None:
            raise WriteError("the MLflow REST sink was used before open()")
        return self._info

    # ------------------------------------------------------------------ resume (steplog._resume)

    async def resume(self, run_id: str) -> Any:
        """Read a run to resume (``runs/get``) and mark it RUNNING again (``runs/update``).

        Returns a :class:`steplog._resume.ResumeState`. MLflow's server keeps the old end time
        (its ``runs/update`` cannot clear one); the next close overwrites it.
        """
        from .._resume import ResumeState, check_run_id

        client = RestClient(self.uri, timeout=self._request_timeout, retry=self._retry, transport=self._transport)
        deadline = anyio.current_time() + self._start_timeout
        try:
            try:
                answer = await client.call(
                    "GET",
                    f"{API}/runs/get",
                    params={"run_id": run_id},
                    deadline=deadline,
                    what=f"resuming run {run_id}",
                )
            except ServerError as exc:
                if exc.status in (400, 404):
                    raise StepLogError(
                        f"run {run_id} does not exist on {self.display_uri} (or is deleted): check the run id "
                        "and the tracking_uri (a run is resumed where it was logged)"
                    ) from exc
                raise
            run = answer["run"]
            info, data = run["info"], run.get("data") or {}
            if info.get("lifecycle_stage") == "deleted":
                raise StepLogError(f"run {run_id} is deleted on {self.display_uri}: restore it to resume it")
            await client.call(
                "POST", f"{API}/runs/update", json={"run_id": run_id, "status": "RUNNING"}, deadline=deadline,
                what=f"resuming run {run_id}",
            )  # fmt: skip
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
        metrics = data.get("metrics") or []
        return ResumeState(
            run_id=check_run_id(str(info.get("run_id")), f"the run id {self.display_uri} answered"),
            experiment_id=str(info["experiment_id"]),
            run_name=str(info.get("run_name") or run_id),
            start_time=int(info.get("start_time") or time.time() * 1000),
            params={str(p["key"]): str(p.get("value", "")) for p in data.get("params") or []},
            tags={str(t["key"]): str(t.get("value", "")) for t in data.get("tags") or []},
            metric_keys=tuple(str(m["key"]) for m in metrics),
            last_step=max(
                (int(m.get("step") or 0) for m in metrics if not str(m["key"]).startswith("system/")), default=0
            ),
            last_system_step=max(
                (int(m.get("step") or 0) for m in metrics if str(m["key"]).startswith("system/")), default=-1
            ),
        )


def _run_info(info: dict[str, Any], request: RunRequest, display_uri: str) -> RunInfo:
    """The run's identity from the server's (checked) answer."""
    start_time = info.get("start_time")
    if not (isinstance(start_time, (int, str)) and str(start_time).isdigit()):
        start_time = request.start_time
    return RunInfo(
        run_id=info["run_id"],
        experiment_id=info["experiment_id"],
        experiment_name=request.experiment_name,
        run_name=str(info.get("run_name") or request.run_name),
        artifact_uri=str(info.get("artifact_uri") or ""),
        tracking_uri=display_uri,
        start_time=int(start_time)
        if isinstance(start_time, (int, str)) and str(start_time).isdigit()
        else request.start_time,
        user_id=str(info.get("user_id") or request.user_id),
    )


def _budget(deadline: float, default: float) -> float:
    """Seconds this close may spend: the caller's deadline less a margin to spill and report."""
    left = deadline - anyio.current_time()
    if math.isinf(left):
        return default
    return max(0.05, min(left - 0.5, left * 0.8))
