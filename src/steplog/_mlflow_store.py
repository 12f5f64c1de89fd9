"""MLflow tracking stores that write runs through steplog (``MLFLOW_TRACKING_URI=steplog+<uri>``).

:func:`make_tracking_store` builds, for ``steplog+<uri>``, a subclass of the store MLflow
itself would build for ``<uri>`` (its ``FileStore`` for a folder, its ``RestStore`` for a
server). The subclass overrides the run writes: ``create_run`` starts a steplog run (so
MLflow's run id is steplog's), and ``log_batch``, ``log_metric``, ``log_param``,
``set_tag`` and ``update_run_info`` of that run go through the run's buffer and return
without I/O. Every other method is MLflow's own, so searches, experiments, models,
traces and artifacts work as without steplog.

Reads of a run this store writes see every write made before them: ``get_run`` is
answered from what the store already knows (no disk, no network), and the reads that
go to the destination (metric histories, searches, a delegated write) flush the run
first, and only when something is pending. Runs this store did not create (another
process's, an ended one, a resumed one) are written through MLflow's own store.

steplog errors cross into MLflow here, at one boundary (:func:`_mlflow_errors`): bad
input becomes ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, as MLflow raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunInputs, RunOutputs, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.store.tracking.file_store import FileStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.validation import (
    _validate_batch_log_data,
    _validate_batch_log_limits,
    _validate_metric,
    _validate_param_keys_unique,
)

import steplog

from ._errors import BufferFullError, InvalidKeyError, InvalidValueError, RunStateError, StepLogError

__all__ = ["make_registry_store", "make_tracking_store", "split_uri"]

_RUN_NAME = "mlflow.runName"
# Tags every steplog run gets at creation; MLflow's store sets them only when the caller passes them
# (the fluent API always does, MlflowClient.create_run does not), so they are removed again when not asked for.
_CREATION_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type")
_ENDED = frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED})
_SCHEMES = {"steplog": "", "steplog+file": "file", "steplog+http": "http", "steplog+https": "https"}

_T = TypeVar("_T")


# ---------------------------------------------------------------------------- URIs


def split_uri(store_uri: str) -> tuple[str, str]:
    """``(kind, target)`` for a ``steplog+<uri>`` tracking URI: kind ``"file"`` or ``"rest"``.

    ``target`` is what ``steplog.start_run`` takes as ``tracking_uri``: an absolute folder
    (resolved now, so a later ``chdir`` cannot split the store in two) or the server's URL.

    Raises:
        MlflowException: (``INVALID_PARAMETER_VALUE``) not a scheme this plugin serves.
    """
    scheme, colon, rest = store_uri.partition(":")
    inner = _SCHEMES.get(scheme.lower()) if colon else None
    if inner is None:
        raise MlflowException(
            f"tracking URI {_redact(store_uri)!r} is not served by steplog: use steplog+file:///abs/mlruns, "
            "steplog+file:relative/mlruns, steplog+http(s)://host:port, or steplog: (./mlruns)",
            databricks_pb2.INVALID_PARAMETER_VALUE,
        )
    if inner in ("http", "https"):
        if not rest.startswith("//") or len(rest) <= 2:
            raise MlflowException(
                f"tracking URI {_redact(store_uri)!r} names no server: use {scheme}://host:port",
                databricks_pb2.INVALID_PARAMETER_VALUE,
            )
        return "rest", f"{inner}:{rest}"
    from mlflow.utils.file_utils import local_file_uri_to_path

    # bare steplog: is ./mlruns, as steplog.start_run's default
    path = (local_file_uri_to_path(f"file:{rest}") if rest else "") if inner == "file" else rest or "mlruns"
    if not path:
        raise MlflowException(
            f"tracking URI {store_uri!r} names no folder: use steplog+file:///abs/mlruns or steplog+file:mlruns",
            databricks_pb2.INVALID_PARAMETER_VALUE,
        )
    return "file", os.path.abspath(path)


def _redact(uri: str) -> str:
    from ._destinations import redact_uri

    return redact_uri(uri)


@contextlib.contextmanager
def _file_store_allowed() -> Iterator[None]:
    """Let MLflow build its file store: ``steplog+file:`` names the file store on purpose.

    MLflow 3.13+ refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; asking for
    ``steplog+file:`` is that opt-in, so the one variable ``MLFLOW_TRACKING_URI`` suffices.
    The variable is set only while the store object is built (under MLflow's store-building
    lock) and restored after.
    """
    name = "MLFLOW_ALLOW_FILE_STORE"
    before = os.environ.get(name)
    os.environ[name] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def make_tracking_store(store_uri: str, artifact_uri: str | None = None) -> FileStore | RestStore:
    """The tracking store for ``store_uri`` (MLflow calls this once per URI and process, and caches it)."""
    kind, target = split_uri(store_uri)
    store: FileStore | RestStore
    if kind == "rest":
        from mlflow.utils.credentials import get_default_host_creds

        store = SteplogRestStore(target, partial(get_default_host_creds, target))
    else:
        root = _file_uri(target)
        with _file_store_allowed():
            store = SteplogFileStore(target, root, artifact_uri or root)
    store._steplog_uri = store_uri
    return store


def _settle_registry_uri(store_uri: str) -> None:
    """Name the registry MLflow would find anyway, so its fluent calls stop looking for a Spark session.

    With no registry URI set, each ``mlflow.log_metric`` asks for one, and MLflow tries
    ``import pyspark`` to read it from a Spark session: about 100 µs per call where pyspark is not
    installed, more than the rest of the call. A tracking URI that is not Databricks' is its own
    registry (MLflow's default), so where pyspark is missing and nothing is set, the registry is set to
    this URI for this process only (MLflow's module setting, not ``MLFLOW_REGISTRY_URI``: child
    processes decide for themselves). ``mlflow.set_registry_uri`` still overrides it.
    """
    import importlib.util

    from mlflow.environment_variables import MLFLOW_REGISTRY_URI
    from mlflow.tracking._model_registry import utils as registry_utils

    unset = registry_utils._registry_uri is None and not MLFLOW_REGISTRY_URI.get()
    if unset and importlib.util.find_spec("pyspark") is None:
        registry_utils._registry_uri = store_uri  # type: ignore[assignment]  # MLflow annotates it None only


def make_registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """MLflow's own model-registry store for the URI inside ``steplog+<uri>`` (models are not steplog's)."""
    kind, target = split_uri(store_uri)
    if kind == "rest":
        from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
        from mlflow.utils.credentials import get_default_host_creds

        return RegistryRestStore(partial(get_default_host_creds, target))
    from mlflow.store.model_registry.file_store import FileStore as RegistryFileStore

    with _file_store_allowed():
        return RegistryFileStore(_file_uri(target))


def _file_uri(path: str) -> str:
    from mlflow.utils.file_utils import path_to_local_file_uri

    return str(path_to_local_file_uri(path))


# ---------------------------------------------------------------------------- errors


@contextlib.contextmanager
def _mlflow_errors() -> Iterator[None]:
    """Translate steplog's errors into the ``MlflowException`` MLflow callers catch (the one boundary)."""
    try:
        yield
    except (InvalidKeyError, InvalidValueError) as exc:  # ParamChangedError included
        raise MlflowException(str(exc), databricks_pb2.INVALID_PARAMETER_VALUE) from exc
    except RunStateError as exc:
        raise MlflowException(str(exc), databricks_pb2.INVALID_STATE) from exc
    except BufferFullError as exc:
        raise MlflowException(str(exc), databricks_pb2.RESOURCE_EXHAUSTED) from exc
    except StepLogError as exc:  # WriteError, FlushTimeoutError, ServerError: the destination failed
        raise MlflowException(str(exc), databricks_pb2.INTERNAL_ERROR) from exc


# ---------------------------------------------------------------------------- what a store knows of a run


class _Written:
    """One run this store writes: the steplog run and what MLflow's ``get_run`` would read back."""

    __slots__ = ("current", "flushed", "info", "inputs", "latest", "outputs", "params", "run", "tags", "writes")

    def __init__(self, run: steplog.Run, base: Run) -> None:
        self.run = run
        self.info: RunInfo = base.info
        # each key's latest point as (step, timestamp, value): MLflow's latest is the greatest such tuple
        self.latest: dict[str, tuple[int, int, float]] = {
            m.key: (m.step, m.timestamp, m.value) for m in base.data._metric_objs
        }
        self.params: dict[str, str] = dict(base.data.params)
        self.tags: dict[str, str] = dict(base.data.tags)
        self.inputs: RunInputs | None = base.inputs
        self.outputs: RunOutputs | None = base.outputs
        self.writes = 0  # write calls so far; a read flushes only when this moved since the last flush
        self.flushed = 0
        self.current = True  # False when the store may not know all the destination holds: read it

    def refresh(self, base: Run) -> None:
        """Take what the destination knows after a write that went around steplog (inputs, outputs, tags, ...)."""
        self.info = base.info
        self.tags = dict(base.data.tags)
        self.params.update(base.data.params)
        latest = self.latest
        for m in base.data._metric_objs:  # points MLflow's store wrote itself (metrics linked to a model)
            point = (m.step, m.timestamp, m.value)
            old = latest.get(m.key)
            if old is None or point > old:
                latest[m.key] = point
        self.inputs = base.inputs
        self.outputs = base.outputs
        self.current = True

    def remember_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)
        name = tags.get(_RUN_NAME)
        if name is not None:
            self.info = self._info(run_name=name)

    def _info(self, **changes: Any) -> RunInfo:
        info = self.info
        fields: dict[str, Any] = {
            "run_id": info.run_id,
            "experiment_id": info.experiment_id,
            "user_id": info.user_id,
            "status": info.status,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "lifecycle_stage": info.lifecycle_stage,
            "artifact_uri": info.artifact_uri,
            "run_name": info.run_name,
        }
        fields.update(changes)
        return RunInfo(**fields)

    def ended(self) -> RunInfo:
        """The info once the steplog run ended: its status and end time, as it wrote them."""
        info = self.run.info
        self.info = self._info(status=RunStatus.to_string(int(info.status)), end_time=info.end_time)
        return self.info

    def as_run(self) -> Run:
        """A fresh ``Run`` entity equal to what MLflow's store reads back (callers may change it)."""
        return Run(
            self._info(),
            RunData(
                metrics=[
                    Metric(key, value, timestamp, step, run_id=self.info.run_id)
                    for key, (step, timestamp, value) in self.latest.items()
                ],
                params=[Param(k, v) for k, v in self.params.items()],
                tags=[RunTag(k, v) for k, v in self.tags.items()],
            ),
            self.inputs,
            self.outputs,
        )


def _plain(metrics: Sequence[Metric]) -> bool:
    """True when no metric is linked to a logged model or a dataset (those go to MLflow's store)."""
    return all(m.model_id is None and m.dataset_name is None for m in metrics)


def _log_metrics(written: _Written, metrics: Sequence[Metric]) -> None:
    """Log MLflow ``Metric`` entities to the steplog run, and remember each key's latest point."""
    run = written.run
    if len(metrics) == 1:
        m = metrics[0]
        _check_number(m)
        run.log_metric(m.key, m.value, m.step, m.timestamp)
    else:
        for m in metrics:
            _check_number(m)
        # one log_metrics call per stretch of points sharing (step, timestamp) with distinct keys:
        # what mlflow.log_metrics sends is one such stretch
        group: dict[str, Any] = {}
        stamp = (metrics[0].step, metrics[0].timestamp)
        for m in metrics:
            here = (m.step, m.timestamp)
            if here != stamp or m.key in group:
                run.log_metrics(group, stamp[0], stamp[1])
                group, stamp = {}, here
            group[m.key] = m.value
        run.log_metrics(group, stamp[0], stamp[1])
    latest = written.latest
    for m in metrics:
        point = (m.step, m.timestamp, float(m.value))
        old = latest.get(m.key)
        if old is None or point > old:  # MLflow's latest: the greatest (step, timestamp, value), first on ties
            latest[m.key] = point


def _check_number(metric: Metric) -> None:
    """MLflow's rule for a metric value: a Python or NumPy number (steplog also takes tensors; MLflow does not)."""
    value = metric.value
    if type(value) is not float and type(value) is not int:
        _validate_metric(metric.key, value, metric.timestamp, metric.step)


# ---------------------------------------------------------------------------- the store


class _SteplogStoreMixin:
    """The run writes of MLflow's store, routed through steplog runs; put before FileStore/RestStore."""

    _target: str
    _written: dict[str, _Written]
    _lock: threading.Lock
    run_options: dict[str, Any]

    def _setup(self, target: str) -> None:
        self._target = target
        self._steplog_uri = target  # the steplog+ URI MLflow built this store for (set by make_tracking_store)
        self._written = {}
        self._lock = threading.Lock()
        # held by a write that goes around steplog (MLflow's store writes it, e.g. log_inputs) and by
        # reads that go to MLflow's store: MLflow's file store writes an input's folder before its
        # meta.yaml, and a read between the two fails (sklearn autolog logs its dataset on a thread
        # of its own while the fit's thread reads the run)
        self._around_lock = threading.RLock()
        self.run_options: dict[str, Any] = {}
        """Keyword options for ``steplog.start_run`` of each new run (``flush_interval``, ...; a seam for tests)."""

    # the MLflow store this class extends (FileStore or RestStore), for calls that go around steplog
    @property
    def _mlflow(self) -> Any:
        return super()

    def _open(self, run_id: str) -> _Written | None:
        """The run this store writes under ``run_id``, if it is still open."""
        written = self._written.get(run_id)
        if written is None or written.run.closed:
            return None
        return written

    def _flush(self, written: _Written) -> None:
        """Write everything logged to the run before this call (no barrier when nothing is pending)."""
        writes = written.writes
        if writes != written.flushed:
            with _mlflow_errors():
                written.run.flush()
            written.flushed = writes

    def _flush_all(self) -> None:
        for written in list(self._written.values()):
            if not written.run.closed:
                self._flush(written)

    def _around(self, run_id: str, call: Callable[[], _T]) -> _T:
        """Run a write that steplog cannot buffer through MLflow's store, after flushing the run.

        For a run this store writes, what the write changed is read back once, so that
        ``get_run`` keeps being answered from memory.
        """
        written = self._open(run_id)
        if written is None:
            return call()
        self._flush(written)
        with self._around_lock:
            written.current = False  # until read back: the destination knows something the store does not
            result = call()
            with contextlib.suppress(MlflowException):
                written.refresh(self._mlflow.get_run(run_id))
        return result

    # ------------------------------------------------------------------ create

    def create_run(
        self, experiment_id: str, user_id: str, start_time: int, tags: Sequence[RunTag] | None, run_name: str | None
    ) -> Run:
        _settle_registry_uri(self._steplog_uri)
        store = self._mlflow
        experiment_id = "0" if experiment_id is None else str(experiment_id)
        experiment = store.get_experiment(experiment_id)
        if experiment is None:
            raise MlflowException(
                f"Could not create run under experiment with ID {experiment_id} - no such experiment exists.",
                databricks_pb2.RESOURCE_DOES_NOT_EXIST,
            )
        if experiment.lifecycle_stage != "active":
            raise MlflowException(
                f"Could not create run under non-active experiment with ID {experiment_id}.",
                databricks_pb2.INVALID_STATE,
            )
        wanted = {tag.key: tag.value for tag in tags or ()}
        name_tag = wanted.pop(_RUN_NAME, None)
        if run_name and name_tag and run_name != name_tag:
            raise MlflowException(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                f"different values (run_name='{run_name}', mlflow.runName='{name_tag}').",
                databricks_pb2.INVALID_PARAMETER_VALUE,
            )
        if not (run_name or name_tag):
            from mlflow.utils.name_utils import _generate_random_name

            run_name = _generate_random_name()
        with _mlflow_errors():
            run = steplog.start_run(
                experiment.name,
                run_name=run_name or name_tag,
                tracking_uri=self._target,
                tags=wanted,
                # MLflow's create_run always creates: MLflow itself resumes MLFLOW_RUN_ID through
                # get_run/update_run_info, and every process writes its own runs, as with plain MLflow
                **{"run_id": "", "ranks": "off", **self.run_options},
            )
            run.__enter__()  # started inside an event loop, a run waits for `async with`: start its thread now
        run_id = run.run_id
        try:
            for key in _CREATION_TAGS:
                if key not in wanted:
                    with contextlib.suppress(MlflowException):
                        store.delete_tag(run_id, key)
            written = _Written(run, store.get_run(run_id))
        except BaseException:
            with contextlib.suppress(StepLogError):
                run.close("FAILED")  # the caller gets the error and no run: do not leave one open until exit
            raise
        with self._lock:
            self._written[run_id] = written
        return written.as_run()

    # ------------------------------------------------------------------ buffered writes

    def log_batch(
        self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param], tags: Sequence[RunTag]
    ) -> None:
        written = self._written.get(run_id)
        if written is None or written.run.closed or not _plain(metrics):
            # a run this store does not write, or metrics linked to a model or dataset (kept elsewhere)
            return self._around(run_id, lambda: self._mlflow.log_batch(run_id, metrics, params, tags))  # type: ignore[no-any-return]
        _validate_batch_log_limits(metrics, params, tags)
        if params or tags:  # MLflow's own checks (and its cut of over-long values); metrics are checked by steplog
            _unused, params, tags = _validate_batch_log_data((), params, tags)
            _validate_param_keys_unique(params)
        run = written.run
        with _mlflow_errors():
            if params:
                values = {p.key: p.value for p in params}
                run.log_params(values)
                written.params.update(values)
            if metrics:
                _log_metrics(written, metrics)
            if tags:
                values = {t.key: t.value for t in tags}
                run.set_tags(values)
                written.remember_tags(values)
        written.writes += 1
        return None

    def log_metric(self, run_id: str, metric: Metric) -> None:
        self.log_batch(run_id, [metric], [], [])

    def log_param(self, run_id: str, param: Param) -> None:
        self.log_batch(run_id, [], [param], [])

    def set_tag(self, run_id: str, tag: RunTag) -> None:
        self.log_batch(run_id, [], [], [tag])

    def update_run_info(self, run_id: str, run_status: int, end_time: int | None, run_name: str | None) -> RunInfo:
        written = self._written.get(run_id)
        if written is None:
            return self._mlflow.update_run_info(run_id, run_status, end_time, run_name)  # type: ignore[no-any-return]
        if written.run.closed:
            # ended by steplog itself (its exit hook after a crash, a signal): that status stands,
            # and MLflow's own atexit end_run() that follows does not turn FAILED into FINISHED
            with self._lock:
                self._written.pop(run_id, None)
            return written.ended()
        if run_name:
            self.set_tag(run_id, RunTag(_RUN_NAME, run_name))
        if run_status not in _ENDED:
            return written._info(status=RunStatus.to_string(run_status))
        with self._lock:
            self._written.pop(run_id, None)  # ended: later writes and reads are MLflow's store's
        with _mlflow_errors():
            written.run.close(RunStatus.to_string(run_status))
        return written.ended()

    # ------------------------------------------------------------------ reads

    def get_run(self, run_id: str) -> Run:
        written = self._open(run_id)
        if written is None:
            return self._mlflow.get_run(run_id)  # type: ignore[no-any-return]
        if written.current:
            return written.as_run()
        self._flush(written)
        with self._around_lock:  # a write around steplog in another thread ends first (see _setup)
            if written.current:
                return written.as_run()
            return self._mlflow.get_run(run_id)  # type: ignore[no-any-return]

    def get_metric_history(self, run_id: str, metric_key: str, *args: Any, **kwargs: Any) -> Any:
        written = self._open(run_id)
        if written is not None:
            self._flush(written)
        return self._mlflow.get_metric_history(run_id, metric_key, *args, **kwargs)

    def get_metric_history_bulk_interval_from_steps(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        written = self._open(run_id)
        if written is not None:
            self._flush(written)
        return self._mlflow.get_metric_history_bulk_interval_from_steps(run_id, *args, **kwargs)

    def _search_runs(self, *args: Any, **kwargs: Any) -> Any:
        self._flush_all()
        with self._around_lock:
            return self._mlflow._search_runs(*args, **kwargs)

    # ------------------------------------------------------------------ writes steplog cannot buffer

    def delete_tag(self, run_id: str, key: str) -> None:
        self._around(run_id, lambda: self._mlflow.delete_tag(run_id, key))

    def log_inputs(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        return self._around(run_id, lambda: self._mlflow.log_inputs(run_id, *args, **kwargs))

    def log_outputs(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        return self._around(run_id, lambda: self._mlflow.log_outputs(run_id, *args, **kwargs))

    def record_logged_model(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        return self._around(run_id, lambda: self._mlflow.record_logged_model(run_id, *args, **kwargs))

    def delete_run(self, run_id: str) -> None:
        written = self._open(run_id)
        if written is not None:
            # steplog's close writes the run's meta file, which would undo the deletion: end it first
            with self._lock:
                self._written.pop(run_id, None)
            with _mlflow_errors():
                written.run.close("KILLED")
        self._mlflow.delete_run(run_id)

    def flush_runs(self) -> None:
        """Write everything logged to the runs this store writes (a barrier, for tests and benchmarks)."""
        self._flush_all()


class SteplogFileStore(_SteplogStoreMixin, FileStore):
    """MLflow's file store, with the writes of the runs it creates going through steplog."""

    def __init__(self, target: str, root_uri: str, artifact_root_uri: str) -> None:
        super().__init__(root_uri, artifact_root_uri)
        self._setup(target)


class SteplogRestStore(_SteplogStoreMixin, RestStore):  # type: ignore[misc]
    """MLflow's REST store (a tracking server), with the writes of the runs it creates going through steplog."""

    def __init__(self, target: str, get_host_creds: Callable[[], Any]) -> None:
        super().__init__(get_host_creds)
        self._setup(target)

    # A server keeps artifacts under ``mlflow-artifacts:/`` URIs, which MLflow's artifact repository
    # resolves against the *tracking* URI and refuses unless its scheme is http(s). So for each run
    # and logged model this store hands out, MLflow's per-process cache of artifact repositories
    # (what MlflowClient consults first) gets the repository resolved against the server's own URL.

    def create_run(self, *args: Any, **kwargs: Any) -> Run:
        return self._seed(super().create_run(*args, **kwargs))

    def get_run(self, run_id: str) -> Run:
        return self._seed(super().get_run(run_id))

    def create_logged_model(self, *args: Any, **kwargs: Any) -> Any:
        model = super().create_logged_model(*args, **kwargs)
        self._seed_repo(model.model_id, model.artifact_location)
        return model

    def get_logged_model(self, model_id: str, *args: Any, **kwargs: Any) -> Any:
        model = super().get_logged_model(model_id, *args, **kwargs)
        self._seed_repo(model.model_id, model.artifact_location)
        return model

    def _seed(self, run: Run) -> Run:
        self._seed_repo(run.info.run_id, run.info.artifact_uri)
        return run

    def _seed_repo(self, key: str, artifact_uri: str | None) -> None:
        if not artifact_uri or not artifact_uri.startswith("mlflow-artifacts:"):
            return
        from mlflow.tracking._tracking_service import utils

        cache = getattr(utils, "_artifact_repos_cache", None)
        if cache is None or key in cache:
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        cache[key] = get_artifact_repository(artifact_uri, tracking_uri=self._target)
