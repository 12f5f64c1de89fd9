"""Reading runs from an MLflow tracking server over REST, read-only (``steplog runs --uri http://...``).

:class:`RestStore` answers the questions :class:`steplog.Store` answers for a local
store (experiments, runs, one run, a metric's history, a run's artifacts) with the
read-only calls MLflow's server offers: ``experiments/search``, ``runs/search``,
``runs/get``, ``metrics/get-history`` and ``artifacts/list``. It never writes to the
server. Every answer is checked before use: a server that answers something that is
not MLflow's JSON is a :class:`~steplog.store.StoreError` saying what answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from ._records import MetricPoint, RunStatus
from .store import Experiment, History, StoreError

__all__ = ["RemoteArtifact", "RemoteRun", "RemoteRunWatcher", "RestStore", "is_server_uri"]

_API = "/api/2.0/mlflow"
_PAGE = 1000
_STATUSES = {s.name: s for s in RunStatus}


def is_server_uri(uri: str) -> bool:
    """True for an ``http(s)://`` tracking server URI."""
    return uri.lower().startswith(("http://", "https://"))


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteArtifact:
    """One file of a run's artifacts on the server."""

    path: str
    size: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteRun:
    """A run on a tracking server: the same fields as :class:`steplog.store.RunData` that a server has."""

    run_id: str
    experiment_id: str
    run_name: str | None
    status: RunStatus
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    user_id: str
    artifact_uri: str
    params: dict[str, str]
    tags: dict[str, str]
    latest: Mapping[str, MetricPoint]
    """Latest point per metric key, as the server computes it (MLflow's rule)."""
    metric_keys: tuple[str, ...] = ()

    @property
    def metrics(self) -> dict[str, float]:
        return {k: p.value for k, p in self.latest.items()}


class RestStore:
    """A read-only view of the runs on an MLflow tracking server, with :class:`steplog.Store`'s method names.

    ``steplog.Store("http(s)://...")`` returns one. It is not a :class:`steplog.Store` subclass: its
    runs are :class:`RemoteRun` (no folder), and ``root`` is the server's URL without credentials.

    Args:
        uri: ``http(s)://host:port[/prefix]``; credentials as MLflow's client takes them
            (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, or in the URL).
        transport: an httpx transport (tests).
    """

    def __init__(self, uri: str, *, timeout: float = 30.0, transport: Any = None) -> None:
        try:
            import httpx
        except ImportError:
            raise StoreError("reading a tracking server needs httpx: pip install 'steplog[rest]'") from None
        from urllib.parse import urlsplit

        from .sinks.mlflow_rest import client_options, redact

        if not is_server_uri(uri):
            raise StoreError(f"{uri!r} is not a tracking server URL: give http(s)://host:port")
        self.uri = uri.rstrip("/")
        self.root = redact(self.uri)
        """The server's URL without credentials (what messages show)."""
        options = client_options()
        parts = urlsplit(self.uri)
        if parts.username is not None and "auth" not in options and "Authorization" not in options["headers"]:
            options["auth"] = httpx.BasicAuth(parts.username, parts.password or "")
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=self.root,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            **options,
        )

    def __repr__(self) -> str:
        return f"<steplog.RestStore {self.root}>"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one request

    def _request(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        """One call; the JSON object answered, or a StoreError saying what went wrong (404: ``None`` body)."""
        try:
            response = self._client.request(method, f"{_API}/{endpoint}", **kwargs)
        except self._httpx.TransportError as exc:
            raise StoreError(
                f"cannot reach the tracking server at {self.root} ({endpoint}): {exc or type(exc).__name__}; "
                "check that it is running and the URL is right"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            first = response.text.strip().splitlines()[0][:80] if response.text.strip() else "(empty)"
            kind = response.headers.get("content-type", "no content type")
            raise StoreError(
                f"{self.root} did not answer {endpoint} as an MLflow tracking server does: HTTP "
                f"{response.status_code}, {kind}, {first!r}"
            )
        if response.status_code >= 300:
            code = data.get("error_code") or f"HTTP {response.status_code}"
            raise _HttpError(response.status_code, f"{self.root} refused {endpoint}: {code}: {data.get('message', '')}")
        return data

    # ------------------------------------------------------------------ experiments

    def experiments(self, *, include_deleted: bool = False) -> list[Experiment]:
        """Every experiment on the server, sorted by id (deleted ones only if asked)."""
        out: list[Experiment] = []
        body: dict[str, Any] = {"max_results": _PAGE, "view_type": "ALL" if include_deleted else "ACTIVE_ONLY"}
        for page in self._pages("POST", "experiments/search", body):
            for raw in _list(page.get("experiments"), "experiments"):
                exp = _dict(raw, "experiment")
                out.append(
                    Experiment(
                        experiment_id=_str(exp.get("experiment_id"), "experiment_id"),
                        name=_str(exp.get("name"), "name"),
                        artifact_location=str(exp.get("artifact_location") or ""),
                        lifecycle_stage=str(exp.get("lifecycle_stage") or "active"),
                        creation_time=_int_or_none(exp.get("creation_time")),
                        path=_NO_PATH,
                    )
                )
        return sorted(out, key=lambda e: (len(e.experiment_id), e.experiment_id))

    def experiment(self, name_or_id: str) -> Experiment:
        """An experiment by name or id (deleted ones included)."""
        experiments = self.experiments(include_deleted=True)
        for exp in experiments:
            if name_or_id in (exp.name, exp.experiment_id):
                return exp
        names = ", ".join(sorted(repr(e.name) for e in experiments if e.lifecycle_stage == "active")) or "none"
        raise StoreError(f"no experiment named {name_or_id!r} on {self.root} (experiments: {names})")

    # ------------------------------------------------------------------ runs

    def runs(
        self, experiment: str | None = None, *, status: str | RunStatus | None = None, include_deleted: bool = False
    ) -> list[RemoteRun]:
        """Runs, newest first (as :meth:`steplog.Store.runs`)."""
        experiments = [self.experiment(experiment)] if experiment is not None else self.experiments()
        if not experiments:
            return []
        body: dict[str, Any] = {
            "experiment_ids": [e.experiment_id for e in experiments],
            "run_view_type": "ALL" if include_deleted else "ACTIVE_ONLY",
            "max_results": _PAGE,
            "order_by": ["attributes.start_time DESC"],
        }
        if status is not None:
            body["filter"] = f"attributes.status = '{_to_status(status).name}'"
        runs = [
            _run(raw) for page in self._pages("POST", "runs/search", body) for raw in _list(page.get("runs"), "runs")
        ]
        runs.sort(key=lambda r: (-(r.start_time or 0), r.run_id))
        return runs

    def get_run(self, run_id: str) -> RemoteRun:
        """A run by id or unique id prefix."""
        if not run_id or any(c in run_id for c in "/?#&% \\"):
            raise StoreError(f"{run_id!r} is not a run id: give a run id or the first characters of one")
        try:
            return _run(self._request("GET", "runs/get", params={"run_id": run_id}).get("run"))
        except _HttpError as exc:
            if exc.status not in (400, 404):
                raise StoreError(str(exc)) from None
        matches = [r for r in self.runs(include_deleted=True) if r.run_id.startswith(run_id)]
        if not matches:
            raise StoreError(f"no run with id {run_id!r} on {self.root} (list them with `steplog runs --uri ...`)")
        if len(matches) > 1:
            shown = ", ".join(sorted(m.run_id[:12] for m in matches)[:5])
            raise StoreError(f"run id prefix {run_id!r} is ambiguous: {len(matches)} runs match ({shown}); give more")
        return matches[0]

    def resolve_run_id(self, prefix: str) -> str:
        return self.get_run(prefix).run_id

    # ------------------------------------------------------------------ metrics and artifacts

    def metric_keys(self, run_id: str | RemoteRun) -> list[str]:
        run = run_id if isinstance(run_id, RemoteRun) else self.get_run(run_id)
        return list(run.metric_keys)

    def metric_history(self, run_id: str | RemoteRun, key: str) -> History:
        """The full history of one metric, in the server's order."""
        run = run_id if isinstance(run_id, RemoteRun) else self.get_run(run_id)
        if key not in run.metric_keys:
            shown = ", ".join(run.metric_keys[:20]) or "none"
            raise StoreError(f"run {run.run_id[:12]} has no metric {key!r} (its metrics: {shown})")
        steps: list[int] = []
        values: list[float] = []
        stamps: list[int] = []
        params = {"run_id": run.run_id, "metric_key": key}
        for page in self._pages("GET", "metrics/get-history", params):
            for raw in _list(page.get("metrics"), "metrics"):
                point = _point(raw)
                steps.append(point.step)
                values.append(point.value)
                stamps.append(point.timestamp)
        return History(key, steps, values, stamps)

    def artifacts(self, run: RemoteRun) -> list[RemoteArtifact]:
        """Every artifact file of the run (``artifacts/list``, walking folders), sorted by path."""
        out: list[RemoteArtifact] = []
        folders = [""]
        seen: set[str] = set()
        while folders:
            folder = folders.pop()
            if folder in seen:  # a server answering a folder inside itself must not loop us
                continue
            seen.add(folder)
            params = {"run_id": run.run_id, **({"path": folder} if folder else {})}
            data = self._request("GET", "artifacts/list", params=params)
            for raw in _list(data.get("files"), "files"):
                entry = _dict(raw, "file")
                path = _str(entry.get("path"), "path")
                if entry.get("is_dir"):
                    folders.append(path)
                else:
                    out.append(RemoteArtifact(path, _int_or_none(entry.get("file_size"))))
        return sorted(out, key=lambda a: a.path)

    def watch(self, run_id: str) -> RemoteRunWatcher:
        return RemoteRunWatcher(self, self.get_run(run_id))

    def alive(self, run_id: str) -> bool | None:
        """Always None: a server does not say whether a RUNNING run's writer lives (its heartbeat is local)."""
        self.get_run(run_id)  # an unknown id is still an error, as for a local store
        return None

    # ------------------------------------------------------------------ paging

    def _pages(self, method: str, endpoint: str, args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        token: str | None = None
        seen: set[str] = set()
        while True:
            page_args = {**args, **({"page_token": token} if token else {})}
            try:
                if method == "GET":
                    page = self._request("GET", endpoint, params=page_args)
                else:
                    page = self._request("POST", endpoint, json=page_args)
            except _HttpError as exc:
                raise StoreError(str(exc)) from None
            yield page
            token = page.get("next_page_token") or None
            if token is None:
                return
            if not isinstance(token, str) or token in seen:
                raise StoreError(f"{self.root} answered {endpoint} with a page token that repeats or is not text")
            seen.add(token)


class RemoteRunWatcher:
    """Follows a run on a server: each :meth:`poll` reads the latest points, and the counts of keys that moved."""

    def __init__(self, store: RestStore, run: RemoteRun) -> None:
        self._store = store
        self._run = run
        self.run_id = run.run_id
        self.latest: dict[str, MetricPoint] = {}
        self.counts: dict[str, int] = {}

    def run(self) -> RemoteRun:
        self._run = self._store.get_run(self.run_id)
        return self._run

    def poll(self) -> dict[str, MetricPoint]:
        run = self.run()
        changed: dict[str, MetricPoint] = {}
        for key, point in run.latest.items():
            if point != self.latest.get(key):
                self.latest[key] = point
                changed[key] = point
                self.counts[key] = len(self._store.metric_history(run, key))
        return changed


class _HttpError(StoreError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# A remote experiment has no folder; Experiment.path is typed Path for local stores.
_NO_PATH: Any = None


# ---------------------------------------------------------------------------- checking answers


def _bad(what: str) -> StoreError:
    return StoreError(f"the tracking server answered a malformed {what} (not what MLflow's server sends)")


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(what)
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(what)
    return value


def _str(value: Any, what: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _bad(what)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii():
        return int(value)
    return None


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise _bad("metric value")
    if isinstance(value, int | float):
        return float(value)
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    raise _bad("metric value")


def _point(raw: Any) -> MetricPoint:
    entry = _dict(raw, "metric")
    step = _int_or_none(entry.get("step", 0))
    stamp = _int_or_none(entry.get("timestamp"))
    if step is None or stamp is None:
        raise _bad("metric point")
    return MetricPoint(step, _float(entry.get("value")), stamp)


def _pairs(raw: Any, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in _list(raw, what):
        entry = _dict(item, what)
        out[_str(entry.get("key"), f"{what} key")] = str(entry.get("value", ""))
    return out


def _run(raw: Any) -> RemoteRun:
    run = _dict(raw, "run")
    info = _dict(run.get("info"), "run info")
    data = _dict(run.get("data") or {}, "run data")
    latest: dict[str, MetricPoint] = {}
    for item in _list(data.get("metrics"), "metrics"):
        key = _str(_dict(item, "metric").get("key"), "metric key")
        latest[key] = _point(item)
    tags = dict(sorted(_pairs(data.get("tags"), "tag").items()))
    status = _STATUSES.get(str(info.get("status") or "RUNNING"), RunStatus.RUNNING)
    name = info.get("run_name") or tags.get("mlflow.runName")
    return RemoteRun(
        run_id=_str(info.get("run_id") or info.get("run_uuid"), "run_id"),
        experiment_id=_str(info.get("experiment_id"), "experiment_id"),
        run_name=None if name is None else str(name),
        status=status,
        start_time=_int_or_none(info.get("start_time")),
        end_time=_int_or_none(info.get("end_time")),
        lifecycle_stage=str(info.get("lifecycle_stage") or "active"),
        user_id=str(info.get("user_id") or ""),
        artifact_uri=str(info.get("artifact_uri") or ""),
        params=dict(sorted(_pairs(data.get("params"), "param").items())),
        tags=tags,
        latest=latest,
        metric_keys=tuple(sorted(latest)),
    )


def _to_status(status: str | RunStatus) -> RunStatus:
    if isinstance(status, RunStatus):
        return status
    try:
        return RunStatus[str(status).upper()]
    except KeyError:
        raise StoreError(f"unknown run status {status!r}: use RUNNING, SCHEDULED, FINISHED, FAILED or KILLED") from None
