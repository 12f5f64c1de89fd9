"""The few MLflow REST calls steplog makes, each answer checked before anything trusts it.

Every call makes one try, bounded by a total deadline (connect, send and answer
together: httpx's own timeouts are per operation, so a server that trickles a byte
a second would never time out), and either returns a checked answer or raises:

* :class:`~.retry.TransientError`: connection errors, the deadline, HTTP 408, 429
  (``Retry-After`` honoured), 502, 503, 504, and 500 with MLflow's JSON error;
* :class:`AuthError` (401/403) and :class:`NotMlflowError` (an answer that is not
  MLflow's: an HTML page, a 200 without a JSON object, a malformed id): refusals that
  a fix elsewhere (a new token, the right URL) may undo, so the sink keeps the data;
* :class:`~steplog.ServerError` for any other refusal, naming ``error_code`` and message;
* :class:`~steplog.StepLogError` for TLS failures (permanent: a retry cannot help).
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx
import orjson

from ..._errors import ServerError, StepLogError
from ..._runmeta import check_experiment_id, check_run_id
from .options import client_options, split_credentials
from .retry import RetryPolicy, TransientError, parse_retry_after, retrying

__all__ = [
    "RUN_KEY_TAG",
    "AuthError",
    "NotMlflowError",
    "RestClient",
    "artifact_files",
    "check_answer",
    "check_artifact_uri",
    "replay_sync",
]

T = TypeVar("T")

RUN_KEY_TAG = "steplog.run_key"
"""Tag set at creation: lets a retried ``runs/create`` (and ``steplog sync``) find the run instead of doubling it."""

API = "/api/2.0/mlflow"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[\x21-\x7e]*")
_AUTH_HINT = (
    "set MLFLOW_TRACKING_TOKEN (a bearer token), or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
    "to credentials the server accepts"
)


class AuthError(ServerError):
    """Raised when the server answers 401 or 403: the credentials are missing, wrong or expired."""


class NotMlflowError(ServerError):
    """Raised when what answered is not an MLflow tracking server (or its answer is malformed)."""


# ---------------------------------------------------------------------------- identifiers from outside


def check_artifact_uri(value: object, source: str) -> str:
    """``value`` if it is a plain URI (``scheme:...``, printable ASCII, no ``..`` segment), else a StepLogError."""
    if isinstance(value, str) and _URI.fullmatch(value) and ".." not in value.split("/") and "\\" not in value:
        return value
    raise NotMlflowError(f"{source} gave the artifact URI {_show(value)}: not a URI steplog can use")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- answers


def _first_line(response: httpx.Response) -> str:
    try:
        text = response.text
    except Exception:  # undecodable bytes: say so rather than fail here
        return "<binary>"
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= 120 else line[:117] + "..."


def _describe(response: httpx.Response) -> str:
    """What answered, in one line: status, content type and the first line of the body."""
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    line = _first_line(response)
    return f"HTTP {response.status_code} {kind}" + (f": {line!r}" if line else " (empty body)")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS problem behind a connection error, in words, or None if it is not one."""
    seen: BaseException | None = exc
    text = ""
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return "certificate verify failed"
        if isinstance(seen, ssl.SSLError):
            text = str(seen)
        text = text or str(seen)
        seen = seen.__cause__ or seen.__context__
    upper = text.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        return "certificate verify failed"
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper or "UNKNOWN_PROTOCOL" in upper:
        return "not TLS"
    if "SSL" in upper or "TLS" in upper:
        return "handshake"
    return None


def check_answer(
    response: httpx.Response, display_uri: str, method: str, endpoint: str, *, json_answer: bool = True
) -> dict[str, Any]:
    """The one status parser: the answer's JSON object (``{}`` when none is expected), or the error it means."""
    status = response.status_code
    data = _json_object(response)
    if 200 <= status < 300:
        if data is not None:
            return data
        if not json_answer and (not response.content or "html" not in response.headers.get("Content-Type", "")):
            return {}
        raise NotMlflowError(
            f"{display_uri} answered {method} {endpoint} with {_describe(response)}, not MLflow's JSON: "
            "is the URL an MLflow tracking server (and not a login page or proxy)?",
            status=status,
        )
    code = data.get("error_code") if data is not None else None
    message = f"{code}: {str(data.get('message', ''))[:1000]}" if data and code else _describe(response)
    if status in _TRANSIENT_STATUS and (code is not None or status != 500):
        # a bare 500 page is how MLflow answers a malformed request: retrying cannot help
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientError(f"{endpoint}: {message}", retry_after=retry_after)
    if status in (401, 403):
        raise AuthError(
            f"authentication failed ({status}) at {display_uri} for {method} {endpoint}: {_AUTH_HINT} "
            f"(the server said {message})",
            status=status,
            error_code=code,
        )
    if code is None:
        raise NotMlflowError(
            f"{display_uri} is not answering as an MLflow tracking server: {method} {endpoint} got {message}",
            status=status,
        )
    raise ServerError(
        f"the MLflow server at {display_uri} refused {method} {endpoint}: {message}",
        status=status,
        error_code=code,
    )


class RestClient:
    """The few MLflow REST calls steplog makes, with error classification (shared by the sink and sync).

    Every call makes one try and raises :class:`TransientError` or a StepLogError;
    :meth:`retrying` retries transient failures until a deadline.
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
        bare = split_credentials(uri.rstrip("/"))[0]
        self.uri = bare
        self.display_uri = bare
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        options = client_options(env, uri)
        self._client = httpx.AsyncClient(
            base_url=bare,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            **options,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ one try

    async def request(
        self, method: str, path: str, *, json_answer: bool = True, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One try of a request within a total deadline; the response, once checked to be MLflow's answer."""
        return (await self._exchange(method, path, json_answer, timeout, kwargs))[0]

    async def fetch(
        self, method: str, path: str, *, json_answer: bool = True, timeout: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """One try of a request within a total deadline; the answer's JSON object (``{}`` when not expected)."""
        return (await self._exchange(method, path, json_answer, timeout, kwargs))[1]

    async def _exchange(
        self, method: str, path: str, json_answer: bool, timeout: float | None, kwargs: dict[str, Any]
    ) -> tuple[httpx.Response, dict[str, Any]]:
        endpoint = path.split("?")[0]
        total = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(total):
                response = await self._client.request(method, path, **kwargs)
        except TimeoutError as exc:
            raise TransientError(f"{endpoint} to {self.display_uri}: no complete answer within {total:g} s") from exc
        except httpx.ConnectError as exc:
            tls = _tls_failure(exc) if self.uri.lower().startswith("https:") else None
            if tls == "certificate verify failed":
                raise StepLogError(
                    f"certificate verify failed for {self.display_uri}: the server's certificate is not trusted; "
                    "set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle, or MLFLOW_TRACKING_INSECURE_TLS=true "
                    f"to skip the check ({exc})"
                ) from exc
            if tls == "not TLS":
                raise StepLogError(
                    f"TLS handshake failed: the server at {self.display_uri} does not speak TLS "
                    f"(use http:// if it serves plain HTTP) ({exc})"
                ) from exc
            if tls is not None:
                raise StepLogError(f"TLS handshake with {self.display_uri} failed: {exc}") from exc
            raise TransientError(
                f"cannot connect to {self.display_uri}: {exc or type(exc).__name__}", maybe_applied=False
            ) from exc
        except httpx.ConnectTimeout as exc:
            raise TransientError(f"cannot connect to {self.display_uri}: connect timeout", maybe_applied=False) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{endpoint} to {self.display_uri} failed: {exc or type(exc).__name__}") from exc
        return response, check_answer(response, self.display_uri, method, endpoint, json_answer=json_answer)

    async def retrying(self, fn: Callable[[], Awaitable[T]], *, deadline: float, what: str) -> T:
        """``await fn()`` retried on transient failures until ``deadline`` (anyio clock); then a StepLogError."""
        return await retrying(fn, policy=self.retry, deadline=deadline, what=what, server=self.display_uri)

    async def call(self, method: str, path: str, *, deadline: float, what: str, **kwargs: Any) -> dict[str, Any]:
        """A request retried on transient failures until ``deadline`` (anyio clock); then a StepLogError."""
        return await self.retrying(lambda: self.fetch(method, path, **kwargs), deadline=deadline, what=what)

    # ------------------------------------------------------------------ endpoints

    async def experiment_id(self, name: str, *, deadline: float) -> str:
        """Get or create the experiment ``name`` (safe against a concurrent create)."""
        for _ in range(3):
            found = await self._experiment_by_name(name, deadline=deadline)
            if found is not None:
                return found
            try:
                answer = await self.call(
                    "POST", f"{API}/experiments/create", json={"name": name}, deadline=deadline,
                    what=f"creating experiment {name!r}",
                )  # fmt: skip
            except ServerError as exc:
                if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                    continue  # someone created it meanwhile (or a retried create succeeded): fetch it
                raise
            return check_experiment_id(answer.get("experiment_id"), f"{self.display_uri} (experiments/create)")
        raise StepLogError(f"could neither find nor create experiment {name!r} on {self.display_uri}")

    async def _experiment_by_name(self, name: str, *, deadline: float) -> str | None:
        try:
            answer = await self.call(
                "GET", f"{API}/experiments/get-by-name", params={"experiment_name": name}, deadline=deadline,
                what=f"looking up experiment {name!r}",
            )  # fmt: skip
        except ServerError as exc:
            if exc.status == 404 and exc.error_code is not None:
                return None
            raise
        experiment = self._object(answer, "experiment", "experiments/get-by-name")
        experiment_id = check_experiment_id(
            experiment.get("experiment_id"), f"{self.display_uri} (experiments/get-by-name)"
        )
        if experiment.get("lifecycle_stage") == "deleted":
            raise StepLogError(
                f"experiment {name!r} is deleted on {self.display_uri} (id {experiment_id}): "
                "restore it (mlflow experiments restore) or log to another experiment name"
            )
        return experiment_id

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
        maybe_created = False

        def note(exc: TransientError) -> None:
            nonlocal maybe_created
            maybe_created = maybe_created or exc.maybe_applied

        async def once() -> dict[str, Any]:
            if maybe_created:
                found = await self.find_run(experiment_id, run_key)
                if found is not None:
                    return found
            answer = await self.fetch("POST", f"{API}/runs/create", json=body)
            return self._run_info(answer, "runs/create")

        return await retrying(
            once, policy=self.retry, deadline=deadline, what="creating the run", server=self.display_uri,
            on_transient=note,
        )  # fmt: skip

    async def find_run(self, experiment_id: str, run_key: str) -> dict[str, Any] | None:
        """The info of the run tagged with ``run_key`` in the experiment, or None (one try)."""
        answer = await self.fetch(
            "POST",
            f"{API}/runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                "run_view_type": "ALL",
                "max_results": 1,
            },
        )
        runs = answer.get("runs") or []
        if not isinstance(runs, list):
            raise NotMlflowError(f"{self.display_uri} answered runs/search with 'runs' that is not a list")
        return self._run_info(runs[0], "runs/search", inner=True) if runs else None

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """A run's info, or None if the server has no such run (one try)."""
        try:
            answer = await self.fetch("GET", f"{API}/runs/get", params={"run_id": run_id})
        except ServerError as exc:
            if exc.status == 404 and exc.error_code is not None:
                return None
            raise
        return self._run_info(answer, "runs/get")

    async def log_batch(self, body: bytes, *, timeout: float | None = None) -> None:
        """One ``runs/log-batch`` request with a body made by :func:`.encode.encode_log_batches` (one try).

        ``timeout``: the request's total deadline in seconds (default: the client's).
        """
        await self.request(
            "POST", f"{API}/runs/log-batch", content=body, headers={"Content-Type": "application/json"}, timeout=timeout
        )

    async def update_run(self, run_id: str, status: str, end_time: int) -> None:
        """End a run: ``runs/update`` with status and end time (one try)."""
        await self.request(
            "POST", f"{API}/runs/update", json={"run_id": run_id, "status": status, "end_time": int(end_time)}
        )

    async def upload_artifact(self, artifact_uri: str, path: str, data: bytes) -> None:
        """PUT one file through the server's ``mlflow-artifacts`` proxy (one try; more time for a big file)."""
        timeout = self.timeout + len(data) / 1_000_000  # at least 1 MB/s on top of the answer's deadline
        await self.request(
            "PUT", self.artifact_url(artifact_uri, path), content=data, json_answer=False, timeout=timeout
        )

    def artifact_url(self, artifact_uri: str, path: str) -> str:
        """The proxy URL of ``path`` inside a run whose artifact URI is ``artifact_uri``."""
        parts = urlsplit(artifact_uri)
        if parts.scheme != "mlflow-artifacts":
            raise StepLogError(
                f"the run's artifact location {artifact_uri!r} is not served by the tracking server: start "
                "the server with --serve-artifacts (the default) so steplog can upload artifacts through it"
            )
        segments = [s for s in f"{parts.path}/{path}".split("/") if s]
        if ".." in segments:
            raise StepLogError(f"artifact path {path!r} in {artifact_uri!r} may not contain '..' segments")
        url = f"{_ARTIFACTS_API}/{quote('/'.join(segments))}"
        if parts.netloc:  # mlflow-artifacts://host:port/... names another server
            base = urlsplit(self.uri)
            return urlunsplit((base.scheme, parts.netloc, url, "", ""))
        return url

    # ------------------------------------------------------------------ answer shapes

    def _object(self, answer: Mapping[str, Any], field: str, endpoint: str) -> dict[str, Any]:
        value = answer.get(field)
        if not isinstance(value, dict):
            raise NotMlflowError(f"{self.display_uri} answered {endpoint} without an {field!r} object")
        return value

    def _run_info(self, answer: Mapping[str, Any], endpoint: str, *, inner: bool = False) -> dict[str, Any]:
        """A run's ``info``, with its run id, experiment id and artifact URI checked."""
        run = answer if inner else self._object(answer, "run", endpoint)
        if not isinstance(run, dict):
            raise NotMlflowError(f"{self.display_uri} answered {endpoint} with a run that is not an object")
        info = self._object(run, "info", endpoint)
        source = f"{self.display_uri} ({endpoint})"
        info["run_id"] = check_run_id(info.get("run_id"), source)
        info["experiment_id"] = check_experiment_id(info.get("experiment_id"), source)
        if info.get("artifact_uri") not in (None, ""):
            info["artifact_uri"] = check_artifact_uri(info["artifact_uri"], source)
        return info


def artifact_files(source: Path, artifact_path: str) -> list[tuple[Path, str]]:
    """``(local file, artifact path)`` for a file, or for every file below a directory, in sorted order."""
    if not source.is_dir():
        return [(source, artifact_path)]
    return [
        (p, f"{artifact_path}/{p.relative_to(source).as_posix()}") for p in sorted(source.rglob("*")) if p.is_file()
    ]


def replay_sync(
    uri: str,
    ops: Iterable[tuple[int, dict[str, Any]]],
    ack: Callable[[int, int], None],
    *,
    run_id: str,
    budget: float,
    transport: httpx.BaseTransport | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Send journal operations with a blocking client until ``budget`` seconds are spent (the emergency path).

    ``ack(offset, points)`` records each acknowledged operation. The deadline covers each
    whole request: the answer is read in chunks and the request abandoned once time is up,
    so a server that trickles cannot hold the caller. Stops at the first failure, and at an
    artifact (left to ``steplog sync``); True when every operation was acknowledged.
    """
    deadline = time.monotonic() + budget
    bare = split_credentials(uri.rstrip("/"))[0]
    try:
        with httpx.Client(base_url=bare, transport=transport, **client_options(env, uri)) as client:
            for offset, op in ops:
                if op["op"] == "batch":
                    path, body = f"{API}/runs/log-batch", op["body"]
                elif op["op"] == "end":
                    path = f"{API}/runs/update"
                    body = {"run_id": run_id, "status": op["status"], "end_time": op["end_time"]}
                else:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with client.stream(
                    "POST", path, content=orjson.dumps(body), headers={"Content-Type": "application/json"},
                    timeout=httpx.Timeout(left),
                ) as response:  # fmt: skip
                    chunks = []
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                        if time.monotonic() > deadline:
                            return False
                    answer = httpx.Response(response.status_code, headers=response.headers, content=b"".join(chunks))
                check_answer(answer, bare, "POST", path)
                ack(offset, int(op.get("points", 0)))
    except (httpx.HTTPError, StepLogError, TransientError, OSError):
        return False
    return True
