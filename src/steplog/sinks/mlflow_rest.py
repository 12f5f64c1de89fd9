"""An MLflow tracking server over its REST API (needs the ``rest`` extra: httpx).

What the server is sent, and how (MLFLOW_FORMAT.md §3):

* Start: the experiment is fetched by name or created (a creation race is
  resolved by fetching again); the run is created with a client-generated
  ``steplog.run_key`` tag, so a ``runs/create`` whose answer was lost is found by a
  search instead of being created twice. A server that cannot be reached within
  ``start_timeout`` seconds is a :class:`~steplog.StepLogError` at start.
* Data: each batch becomes ``runs/log-batch`` requests within every server limit
  (1000 metrics, 100 params, 100 tags, 1000 entities, 1 MB body; params and tags
  deduplicated per request), sent one at a time so order holds. NaN and
  infinities are sent as ``"NaN"``/``"Infinity"``/``"-Infinity"``; timestamps and
  steps are int64 integers (a bare NaN token or a float timestamp makes the server
  silently drop the rest of the request, §3.5).
* Artifacts: ``PUT`` through the server's ``mlflow-artifacts`` proxy.
* End: ``runs/update`` with status and end time.
* Errors: connection errors and HTTP 408, 429 (``Retry-After`` honoured), 500,
  502, 503 and 504 are transient; anything else is permanent and becomes a
  :class:`~steplog.ServerError` naming the server's ``error_code`` and message.
* Outage: the sink takes each batch into its own backlog and returns at once, so
  the writer keeps draining and the training loop never waits. The backlog is
  sent in order when the server answers again (capped exponential backoff with
  jitter between tries); past ``max_buffer`` points it is spilled to the on-disk
  journal (:mod:`steplog._journal`). Timestamps are fixed when a point is logged,
  so a request sent twice stores each point once (the server keeps one copy of an
  identical point). ``close`` is bounded: what the server has not acknowledged by
  then stays in the journal, and the error names the ``steplog sync`` command that
  finishes the upload.

Auth and TLS come from MLflow's environment variables: ``MLFLOW_TRACKING_TOKEN``
(bearer), ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic),
``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` and
``MLFLOW_TRACKING_CLIENT_CERT_PATH``. Secrets never appear in messages.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import functools
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx
import orjson

from .._errors import ServerError, StepLogError, WriteError
from .._journal import Journal
from .._layout import encode_values
from .._records import ArtifactRecord, RunInfo, RunStatus
from ..typing import Batch, RunRequest
from .mlruns import source_name

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTITIES_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_TAGS_PER_BATCH",
    "MlflowRestSink",
    "RestClient",
    "RetryPolicy",
    "encode_log_batches",
]

log = logging.getLogger("steplog")
T = TypeVar("T")

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BODY_BYTES = 1_000_000
RUN_KEY_TAG = "steplog.run_key"
"""Tag set at creation: lets a retried ``runs/create`` (and ``steplog sync``) find the run instead of doubling it."""

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_API = "/api/2.0/mlflow"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_SPECIAL = {b"nan": b'"NaN"', b"inf": b'"Infinity"', b"-inf": b'"-Infinity"'}
_METRIC = b'{"key":%b,"value":%b,"timestamp":%d,"step":%d}'
_INT64 = (-(2**63), 2**63 - 1)


# ---------------------------------------------------------------------------- retry policy


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter between tries of a transient failure.

    The n-th wait (n from 0) is drawn uniformly from ``[d/2, d]`` with
    ``d = min(cap, base * 2**n)``; a server's ``Retry-After`` replaces it (at most
    ``max_retry_after`` seconds).
    """

    base: float = 0.25
    cap: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before try ``attempt + 1``."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        d = min(self.cap, self.base * float(2 ** min(attempt, 62)))
        return d / 2 + rand() * d / 2


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class TransientError(Exception):
    """A request that may succeed if tried again (connection error, 408/429/5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied
        """False when the request cannot have reached the server (the connection was refused)."""


# ---------------------------------------------------------------------------- encoding


def _encode_metrics(metrics: Iterable[tuple[str, list[Any]]]) -> list[bytes]:
    """One JSON object per point, in order: special floats as strings, int64 timestamps and steps."""
    out: list[bytes] = []
    lo, hi = _INT64
    for key, items in metrics:
        if not items:
            continue
        k = orjson.dumps(key)
        stamps = items[0::3]
        steps = items[2::3]
        texts = encode_values([float(v) for v in items[1::3]])
        for i, text in enumerate(texts):
            if text in _SPECIAL:
                texts[i] = _SPECIAL[text]
        for ts, text, step in zip(stamps, texts, steps, strict=True):
            ts = int(ts)
            step = int(step)
            if not (lo <= ts <= hi and lo <= step <= hi):
                raise StepLogError(f"metric {key!r}: timestamp {ts} or step {step} is outside int64")
            out.append(_METRIC % (k, text, ts, step))
    return out


def _encode_pairs(pairs: Iterable[tuple[str, str]]) -> list[bytes]:
    """``{"key":..,"value":..}`` objects, one per key (the last value of a key wins, first position kept)."""
    last = dict(pairs)
    return [orjson.dumps({"key": k, "value": v}) for k, v in last.items()]


def encode_log_batches(
    run_id: str,
    metrics: Iterable[tuple[str, list[Any]]],
    params: Iterable[tuple[str, str]] = (),
    tags: Iterable[tuple[str, str]] = (),
    *,
    max_bytes: int = MAX_BODY_BYTES,
) -> list[tuple[bytes, int]]:
    """Split a batch into ``runs/log-batch`` request bodies within every server limit.

    Returns ``(body, metric points)`` per request, in order: params and tags first, then
    metrics in logged order per key. Each body holds at most 1000 metrics, 100 params,
    100 tags, 1000 entities and ``max_bytes`` bytes; a key appears once per request
    among params (and among tags).
    """
    head = b'{"run_id":%b' % orjson.dumps(run_id)
    fixed = len(head) + len(b',"metrics":[],"params":[],"tags":[]}')
    chunks: list[tuple[bytes, int]] = []
    cur: dict[str, list[bytes]] = {"metrics": [], "params": [], "tags": []}
    size = fixed
    limits = {"metrics": MAX_METRICS_PER_BATCH, "params": MAX_PARAMS_PER_BATCH, "tags": MAX_TAGS_PER_BATCH}

    def emit() -> None:
        nonlocal cur, size
        if any(cur.values()):
            body = (
                head
                + b',"metrics":['
                + b",".join(cur["metrics"])
                + b'],"params":['
                + b",".join(cur["params"])
                + b'],"tags":['
                + b",".join(cur["tags"])
                + b"]}"
            )
            chunks.append((body, len(cur["metrics"])))
        cur = {"metrics": [], "params": [], "tags": []}
        size = fixed

    # params and tags were deduplicated over the whole batch, so each key is once per request too
    entities = [("params", p) for p in _encode_pairs(params)]
    entities += [("tags", t) for t in _encode_pairs(tags)]
    entities += [("metrics", m) for m in _encode_metrics(metrics)]
    for kind, data in entities:
        extra = len(data) + 1
        if fixed + extra > max_bytes:
            raise StepLogError(f"one {kind[:-1]} is {len(data)} bytes: more than a request may carry ({max_bytes})")
        n = len(cur["metrics"]) + len(cur["params"]) + len(cur["tags"])
        if len(cur[kind]) >= limits[kind] or n >= MAX_ENTITIES_PER_BATCH or size + extra > max_bytes:
            emit()
        cur[kind].append(data)
        size += extra
    emit()
    return chunks


# ---------------------------------------------------------------------------- settings from the environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def redact(url: str) -> str:
    """The URL without user:password (safe to print)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # keeps an IPv6 literal's brackets and the port as written
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def client_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """httpx client options (auth, TLS) from MLflow's environment variables."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {"headers": {"User-Agent": "steplog"}}
    token = env.get("MLFLOW_TRACKING_TOKEN")
    user = env.get("MLFLOW_TRACKING_USERNAME")
    password = env.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        options["headers"]["Authorization"] = f"Bearer {token}"
    elif user and password is not None:
        options["auth"] = httpx.BasicAuth(user, password)
    if _truthy(env.get("MLFLOW_TRACKING_INSECURE_TLS")):
        if env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            raise StepLogError(
                "MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: unset one of them"
            )
        options["verify"] = False
    elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        import ssl

        options["verify"] = ssl.create_default_context(cafile=env["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    if env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        options["cert"] = env["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
    return options


# ---------------------------------------------------------------------------- the REST client


class RestClient:
    """The few MLflow REST calls steplog makes, with error classification (shared by the sink and sync).

    Every call makes one try and raises :class:`TransientError` or
    :class:`~steplog.ServerError`; :meth:`call` retries transient failures until a deadline.
    """

    def __init__(
        self,
        uri: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.display_uri = redact(self.uri)
        self.retry = retry or RetryPolicy()
        options = client_options(env)
        parts = urlsplit(self.uri)
        if parts.username is not None and "auth" not in options and "Authorization" not in options["headers"]:
            options["auth"] = httpx.BasicAuth(parts.username, parts.password or "")
        self._base = self.display_uri
        self._client = httpx.AsyncClient(
            base_url=self._base,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            **options,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ one try

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One try of a request; returns a 2xx response or raises TransientError / ServerError."""
        endpoint = path.split("?")[0]
        try:
            response = await self._client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise TransientError(
                f"cannot connect to {self.display_uri}: {exc or type(exc).__name__}", maybe_applied=False
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{endpoint} to {self.display_uri} failed: {exc or type(exc).__name__}") from exc
        status = response.status_code
        if status < 300:
            return response
        code, message = _error_of(response)
        if status in _TRANSIENT_STATUS:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise TransientError(f"{endpoint}: HTTP {status} {code or ''} {message}".rstrip(), retry_after=retry_after)
        raise ServerError(
            f"the MLflow server at {self.display_uri} refused {method} {endpoint}: {code or f'HTTP {status}'}: "
            f"{message}",
            status=status,
            error_code=code,
        )

    async def call(self, method: str, path: str, *, deadline: float, what: str, **kwargs: Any) -> httpx.Response:
        """A request retried on transient failures until ``deadline`` (anyio clock); then a StepLogError."""
        return await self.retrying(
            functools.partial(self.request, method, path, **kwargs), deadline=deadline, what=what
        )

    async def retrying(self, fn: Callable[[], Awaitable[T]], *, deadline: float, what: str) -> T:
        """``await fn()`` retried on transient failures until ``deadline`` (anyio clock); then a StepLogError."""
        attempt = 0
        while True:
            try:
                return await fn()
            except TransientError as exc:
                wait = self.retry.delay(attempt, exc.retry_after)
                attempt += 1
                if anyio.current_time() + wait > deadline:
                    raise StepLogError(
                        f"{what}: the MLflow tracking server at {self.display_uri} did not answer in time "
                        f"({attempt} tries): {exc}. Check that the server is running and the URL is right"
                    ) from exc
                await anyio.sleep(wait)

    # ------------------------------------------------------------------ endpoints

    async def experiment_id(self, name: str, *, deadline: float) -> str:
        """Get or create the experiment ``name`` (safe against a concurrent create)."""
        for _ in range(3):
            found = await self._experiment_by_name(name, deadline=deadline)
            if found is not None:
                return found
            try:
                response = await self.call(
                    "POST", f"{_API}/experiments/create", json={"name": name}, deadline=deadline,
                    what=f"creating experiment {name!r}",
                )  # fmt: skip
            except ServerError as exc:
                if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                    continue  # someone created it meanwhile (or a retried create succeeded): fetch it
                raise
            return str(response.json()["experiment_id"])
        raise StepLogError(f"could neither find nor create experiment {name!r} on {self.display_uri}")

    async def _experiment_by_name(self, name: str, *, deadline: float) -> str | None:
        try:
            response = await self.call(
                "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name}, deadline=deadline,
                what=f"looking up experiment {name!r}",
            )  # fmt: skip
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise
        experiment = response.json()["experiment"]
        if experiment.get("lifecycle_stage") == "deleted":
            raise StepLogError(
                f"experiment {name!r} is deleted on {self.display_uri} (id {experiment['experiment_id']}): "
                "restore it (mlflow experiments restore) or log to another experiment name"
            )
        return str(experiment["experiment_id"])

    async def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        user_id: str,
        start_time: int,
        tags: Mapping[str, str],
        run_key: str,
        deadline: float,
    ) -> dict[str, Any]:
        """Create a run, safe to retry: after a failure that may have created it, search by its run key first."""
        body = {
            "experiment_id": experiment_id,
            "user_id": user_id,
            "run_name": run_name,
            "start_time": int(start_time),
            "tags": [{"key": k, "value": v} for k, v in {**tags, RUN_KEY_TAG: run_key}.items()],
        }
        attempt = 0
        maybe_created = False
        while True:
            try:
                if maybe_created:
                    found = await self.find_run(experiment_id, run_key)
                    if found is not None:
                        return found
                response = await self.request("POST", f"{_API}/runs/create", json=body)
                info: dict[str, Any] = response.json()["run"]["info"]
                return info
            except TransientError as exc:
                maybe_created = maybe_created or exc.maybe_applied
                wait = self.retry.delay(attempt, exc.retry_after)
                attempt += 1
                if anyio.current_time() + wait > deadline:
                    raise StepLogError(
                        f"creating the run: the MLflow tracking server at {self.display_uri} did not answer in "
                        f"time ({attempt} tries): {exc}. Check that the server is running and the URL is right"
                    ) from exc
                await anyio.sleep(wait)

    async def find_run(self, experiment_id: str, run_key: str) -> dict[str, Any] | None:
        """The info of the run tagged with ``run_key`` in the experiment, or None (one try)."""
        response = await self.request(
            "POST",
            f"{_API}/runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                "run_view_type": "ALL",
                "max_results": 1,
            },
        )
        runs = response.json().get("runs") or []
        return dict(runs[0]["info"]) if runs else None

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """A run's info, or None if the server has no such run (one try)."""
        try:
            response = await self.request("GET", f"{_API}/runs/get", params={"run_id": run_id})
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise
        info: dict[str, Any] = response.json()["run"]["info"]
        return info

    async def log_batch(self, body: bytes) -> None:
        """One ``runs/log-batch`` request with a body made by :func:`encode_log_batches` (one try)."""
        await self.request("POST", f"{_API}/runs/log-batch", content=body, headers={"Content-Type": "application/json"})

    async def update_run(self, run_id: str, status: str, end_time: int) -> None:
        """End a run: ``runs/update`` with status and end time (one try)."""
        await self.request(
            "POST", f"{_API}/runs/update", json={"run_id": run_id, "status": status, "end_time": int(end_time)}
        )

    async def upload_artifact(self, artifact_uri: str, path: str, data: bytes) -> None:
        """PUT one file through the server's ``mlflow-artifacts`` proxy (one try)."""
        await self.request("PUT", self.artifact_url(artifact_uri, path), content=data)

    def artifact_url(self, artifact_uri: str, path: str) -> str:
        """The proxy URL of ``path`` inside a run whose artifact URI is ``artifact_uri``."""
        parts = urlsplit(artifact_uri)
        if parts.scheme != "mlflow-artifacts":
            raise StepLogError(
                f"the run's artifact location {artifact_uri!r} is not served by the tracking server: start "
                "the server with --serve-artifacts (the default) so steplog can upload artifacts through it"
            )
        rel = "/".join(s for s in f"{parts.path}/{path}".split("/") if s)
        url = f"{_ARTIFACTS_API}/{quote(rel)}"
        if parts.netloc:  # mlflow-artifacts://host:port/... names another server
            base = urlsplit(self.uri)
            return urlunsplit((base.scheme, parts.netloc, url, "", ""))
        return url


def artifact_files(source: Path, artifact_path: str) -> list[tuple[Path, str]]:
    """``(local file, artifact path)`` for a file, or for every file below a directory, in sorted order."""
    if not source.is_dir():
        return [(source, artifact_path)]
    return [
        (p, f"{artifact_path}/{p.relative_to(source).as_posix()}") for p in sorted(source.rglob("*")) if p.is_file()
    ]


def _error_of(response: httpx.Response) -> tuple[str | None, str]:
    """The server's ``error_code`` and message (lenient: HTML and text bodies too)."""
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip().replace("\n", " ")
        return None, text[:300] or response.reason_phrase
    if isinstance(data, dict):
        return data.get("error_code"), str(data.get("message", ""))[:1000]
    return None, str(data)[:300]


# ---------------------------------------------------------------------------- the sink


@dataclasses.dataclass(slots=True)
class _Item:
    """One request waiting in the backlog: a log-batch body, or an artifact."""

    body: bytes | None = None
    points: int = 0
    artifact: ArtifactRecord | None = None


class MlflowRestSink:
    """Streams a run to an MLflow tracking server (see the module docstring for the contract).

    Args:
        uri: ``http(s)://host:port[/prefix]`` of the tracking server.
        max_buffer: metric points held in memory during an outage before the backlog
            is spilled to the journal.
        journal_dir: where outage journals go (default ``STEPLOG_JOURNAL_DIR`` or
            ``./steplog-journal``); nothing is written there unless an outage outlasts
            ``max_buffer`` or the run closes before the server acknowledged everything.
        start_timeout: seconds to reach the server when the run starts (then a StepLogError).
        request_timeout: seconds for one request to be answered.
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
        self._backlog: collections.deque[_Item] = collections.deque()
        self._backlog_points = 0
        self._journal: Journal | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self._outage_since: float | None = None
        self._closed = False
        self._refused: list[StepLogError] = []
        self._unreported: list[StepLogError] = []
        self.bytes_written = 0
        self.acknowledged_points = 0
        self.spilled_points = 0
        self.requests = 0

    @property
    def display_uri(self) -> str:
        return redact(self.uri)

    @property
    def journal_path(self) -> Path | None:
        """The journal folder of this run, once one exists."""
        return None if self._journal is None else self._journal.folder

    @property
    def backlog_points(self) -> int:
        """Metric points taken from the writer and not yet acknowledged by the server (memory and journal)."""
        return self._backlog_points + self._journal_points()

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
                tags = {
                    "mlflow.user": request.user_id,
                    "mlflow.source.name": source_name(),
                    "mlflow.source.type": "LOCAL",
                    **request.tags,
                    "mlflow.runName": request.run_name,
                }
                info = await client.create_run(
                    experiment_id,
                    run_name=request.run_name,
                    user_id=request.user_id,
                    start_time=request.start_time,
                    tags=tags,
                    run_key=uuid.uuid4().hex,
                    deadline=deadline,
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            self._client = None
            raise
        self._info = RunInfo(
            run_id=str(info["run_id"]),
            experiment_id=str(info["experiment_id"]),
            experiment_name=request.experiment_name,
            run_name=str(info.get("run_name") or request.run_name),
            artifact_uri=str(info.get("artifact_uri") or ""),
            tracking_uri=self.display_uri,
            start_time=int(info.get("start_time") or request.start_time),
            user_id=str(info.get("user_id") or request.user_id),
        )
        return self._info

    async def _join(self, client: RestClient, request: RunRequest, deadline: float) -> dict[str, Any]:
        assert request.run_id is not None
        while True:
            try:
                info = await client.get_run(request.run_id)
                break
            except TransientError as exc:
                if anyio.current_time() > deadline:
                    raise StepLogError(
                        f"joining run {request.run_id}: the MLflow tracking server at {self.display_uri} did not "
                        f"answer in time: {exc}"
                    ) from exc
                await anyio.sleep(self._retry.delay(0, exc.retry_after))
        if info is None:
            raise StepLogError(
                f"run {request.run_id} does not exist on {self.display_uri}: put the server first in "
                "tracking_uri, so the server creates the run and the other destinations join it"
            )
        return info

    # ------------------------------------------------------------------ write

    async def write(self, batch: Batch) -> None:
        """Take the batch into the backlog (marking it done) and send what is due, in order.

        Returns without waiting out an outage: the backlog keeps the data (in memory up to
        ``max_buffer`` points, then in the journal) and is retried at the next write or at close.
        Raises ServerError once for requests the server refused for good (they are not retried).
        """
        self._take(batch)
        if self._backlog_points > self._max_buffer:
            # past the memory allowance: to the journal (fsynced; off the event loop's thread)
            await anyio.to_thread.run_sync(self._spill)
        if anyio.current_time() >= self._retry_at:
            await self._send_backlog()
        if self._unreported:
            errors, self._unreported = self._unreported, []
            raise errors[0]

    def _take(self, batch: Batch) -> None:
        """Move the batch's unfinished entries into the backlog (the sink now answers for them)."""
        info = self._require_info()
        rest = batch.remaining()
        items = [
            _Item(body=body, points=points)
            for body, points in encode_log_batches(info.run_id, rest.metrics, rest.params, rest.tags)
        ]
        items += [_Item(artifact=record) for record in rest.artifacts]
        self._backlog.extend(items)
        self._backlog_points += sum(item.points for item in items)
        done = batch.done
        done.update(("metric", k) for k, _ in rest.metrics)
        done.update(("param", k) for k, _ in rest.params)
        done.update(("tag", k) for k, _ in rest.tags)
        done.update(("artifact", a.artifact_path) for a in rest.artifacts)

    async def _send_backlog(self) -> bool:
        """Send the journal's pending lines, then the memory backlog, in order; False at the first transient failure."""
        client = self._client
        assert client is not None
        try:
            if self._journal is not None:
                for offset, op in self._journal.pending():
                    if op["op"] == "batch":
                        await self._send(client.log_batch(orjson.dumps(op["body"])), int(op.get("points", 0)))
                    elif op["op"] == "artifact":
                        await self._send_artifact(self._journal.artifact_file(op["path"]), op["path"])
                    await anyio.to_thread.run_sync(self._journal.ack, offset)
                self._journal.remove()
                self._journal = None
            while self._backlog:
                item = self._backlog[0]
                if item.body is not None:
                    await self._send(client.log_batch(item.body), item.points, len(item.body))
                elif item.artifact is not None:
                    await self._send_record(item.artifact)
                self._backlog.popleft()
                self._backlog_points -= item.points
        except TransientError as exc:
            self._enter_outage(exc)
            return False
        if self._outage_since is not None:
            log.warning(
                "steplog: the MLflow server at %s is answering again after %.0f s; the backlog is sent",
                self.display_uri,
                time.monotonic() - self._outage_since,
            )
        self._outage_since = None
        self._attempt = 0
        self._retry_at = 0.0
        return True

    async def _send(self, request: Any, points: int, size: int = 0) -> None:
        """Await one request; a permanent refusal is recorded (not retried), a transient one raised."""
        self.requests += 1
        try:
            await request
        except StepLogError as exc:  # ServerError, or an artifact the server cannot take: not retried
            self._refused.append(exc)
            self._unreported.append(exc)
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

    def _enter_outage(self, exc: TransientError) -> None:
        now = anyio.current_time()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "steplog: the MLflow server at %s is not answering (%s); records are kept (in memory up to "
                "max_buffer=%d points, then in the journal under %s) and sent when it is back",
                self.display_uri,
                exc,
                self._max_buffer,
                self._journal_dir,
            )
        self._retry_at = now + self._retry.delay(self._attempt, exc.retry_after)
        self._attempt += 1

    # ------------------------------------------------------------------ the journal

    def _open_journal(self) -> Journal:
        if self._journal is None:
            info = self._require_info()
            self._journal = Journal.create(
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
        return self._journal

    def _spill(self, end: tuple[RunStatus, int] | None = None) -> None:
        """Move the memory backlog (and the run's end, if given) to the journal, in order."""
        if not self._backlog and end is None:
            return
        journal = self._open_journal()
        lines: list[bytes] = []
        for item in self._backlog:
            if item.body is not None:
                lines.append(journal.batch_line(item.body, item.points))
            elif item.artifact is not None:
                lines.append(journal.artifact_line(item.artifact))
        if end is not None:
            lines.append(journal.end_line(end[0].name, end[1]))
        journal.append(lines)
        self.spilled_points += self._backlog_points
        self._backlog.clear()
        self._backlog_points = 0

    def _journal_points(self) -> int:
        if self._journal is None:
            return 0
        return sum(int(op.get("points", 0)) for _, op in self._journal.pending())

    # ------------------------------------------------------------------ close

    async def close(self, status: RunStatus, end_time: int) -> None:
        """Send the backlog and end the run, within the caller's deadline.

        What the server has not acknowledged by then goes to the journal, and a
        StepLogError names the ``steplog sync`` command that finishes the upload.
        """
        client = self._client
        if client is None or self._closed:
            return
        self._closed = True
        budget = _budget(anyio.current_effective_deadline(), self._request_timeout)
        ended = False
        try:
            with anyio.move_on_after(budget):
                while True:
                    if await self._send_backlog():
                        break
                    await anyio.sleep(max(0.0, self._retry_at - anyio.current_time()))
                info = self._require_info()
                while True:
                    try:
                        await client.update_run(info.run_id, status.name, end_time)
                        break
                    except TransientError as exc:
                        self._enter_outage(exc)
                        await anyio.sleep(max(0.0, self._retry_at - anyio.current_time()))
                ended = True
        finally:
            if not ended:
                self._spill(end=(status, end_time))
            if self._journal is not None:
                self._journal.close()
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
        assert self._journal is not None
        folder = self._journal.folder
        return (
            f"the MLflow server at {self.display_uri} did not acknowledge everything before close() ran out of "
            f"time: {self._journal_points()} metric points (and the run's end) are kept in the journal {folder}. "
            f"Finish the upload with: steplog sync {folder} --to {self.display_uri}"
        )

    # ------------------------------------------------------------------ emergency path

    def write_sync(self, batch: Batch) -> None:
        """Emergency write (no event loop): spill the batch to the journal, behind the backlog (no network)."""
        self._take(batch)
        self._spill()

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        """Emergency close (no event loop): record the end in the journal and say how to upload it."""
        if self._info is None or self._closed:
            return
        self._closed = True
        self._spill(end=(status, end_time))
        if self._journal is not None:
            self._journal.close()
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
                response = await client.call(
                    "GET",
                    f"{_API}/runs/get",
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
            run = response.json()["run"]
            info, data = run["info"], run.get("data") or {}
            if info.get("lifecycle_stage") == "deleted":
                raise StepLogError(f"run {run_id} is deleted on {self.display_uri}: restore it to resume it")
            await client.call(
                "POST", f"{_API}/runs/update", json={"run_id": run_id, "status": "RUNNING"}, deadline=deadline,
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


def _budget(deadline: float, default: float) -> float:
    """Seconds this close may spend: the caller's deadline less a margin to spill and report."""
    left = deadline - anyio.current_time()
    if math.isinf(left):
        return default
    return max(0.05, min(left - 0.5, left * 0.8))
