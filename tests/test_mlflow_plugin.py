"""The MLflow drop-in: unchanged MLflow code with ``steplog+<uri>`` writes what plain MLflow writes, without blocking.

Each equality test runs the same MLflow code twice, once against ``<uri>`` (plain MLflow) and
once against ``steplog+<uri>``, and reads both runs back with a plain ``MlflowClient`` on the
underlying store: params, tags, status, metric histories (values compared bit for bit, steps,
timestamps) and artifacts must be the same.
"""

from __future__ import annotations

import getpass
import math
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service import utils as tracking_utils

from steplog._mlflow_store import SteplogFileStore, SteplogRestStore, split_uri

CHILD = Path(__file__).parent / "_children" / "mlflow_endings.py"
SCHEMES = ("steplog", "steplog+file", "steplog+http", "steplog+https")
T0 = 1_700_000_000_000  # explicit timestamps, so two runs of one workload can be compared point for point
# values whose text forms are easy to get wrong: shortest repr, signed zero, subnormal, non-finite, > 2**53
VALUES = [0.1 + 0.2, -0.0, 5e-324, 1e-310, math.nan, math.inf, -math.inf, 1.7976931348623157e308, 2**53 + 1, 3]


@pytest.fixture(scope="module", autouse=True)
def _plugin_registered() -> None:
    """MLflow knows steplog's schemes: from the installed entry points, or registered here (a source checkout)."""
    from mlflow.tracking._model_registry.utils import _get_store_registry

    from steplog._mlflow_plugin import registry_store, tracking_store

    registries = ((tracking_utils._tracking_store_registry, tracking_store), (_get_store_registry(), registry_store))
    for registry, builder in registries:
        for scheme in SCHEMES:
            registry._registry.setdefault(scheme, builder)


@pytest.fixture(autouse=True)
def _fresh_mlflow() -> Iterator[None]:
    """No active run, tracking URI or experiment leaks from one test into the next (or into steplog's own tests)."""
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # MLflow resets to its default with None
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None


def store_for(uri: str) -> Any:
    """The store object MLflow built for ``uri`` (one per URI and process)."""
    return tracking_utils._get_store(uri)


# ---------------------------------------------------------------------------- reading runs back


def bits(value: float) -> bytes:
    return struct.pack(">d", value)


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out.update(artifacts(client, run_id, item.path))
        else:
            local = client.download_artifacts(run_id, item.path)
            out[item.path] = Path(local).read_bytes()
    return out


def snapshot(client: MlflowClient, run_id: str, ids: dict[str, str]) -> dict[str, Any]:
    """What a plain-MLflow reader sees of a run, with run ids replaced by names and times by their presence."""
    run = client.get_run(run_id)
    info = run.info
    tags = {k: ids.get(v, v) for k, v in run.data.tags.items()}
    return {
        "status": info.status,
        "run_name": info.run_name,
        "lifecycle_stage": info.lifecycle_stage,
        "user_id": info.user_id,
        "has_end_time": info.end_time is not None,
        "artifact_uri_tail": info.artifact_uri.rsplit("/", 2)[-1],
        "params": run.data.params,
        "tags": tags,
        "latest": {k: bits(v) for k, v in run.data.metrics.items()},
        "histories": {
            key: [(m.step, m.timestamp, bits(m.value)) for m in client.get_metric_history(run_id, key)]
            for key in run.data.metrics
        },
        "artifacts": artifacts(client, run_id),
    }


def fluent_workload(uri: str, tmp: Path) -> dict[str, str]:
    """Typical training code with MLflow's fluent API (nested runs, params, tags, metrics, artifacts)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("dropin")
    note = tmp / "notes.txt"
    note.write_text("hello")
    with mlflow.start_run(run_name="parent") as parent:
        mlflow.log_param("lr", 0.001)
        mlflow.log_params({"layers": 3, "act": "relu", "none": None})
        mlflow.set_tag("team", "vision")
        mlflow.set_tags({"stage": "dev", "seed": 7})
        for step, value in enumerate(VALUES):
            mlflow.log_metric("odd", value, step=step, timestamp=T0 + step)
            mlflow.log_metrics({f"m{j}": value * j for j in range(3)}, step=step, timestamp=T0 + step)
        mlflow.log_metric("same_step", 1.0, step=5, timestamp=T0)
        mlflow.log_metric("same_step", 2.0, step=5, timestamp=T0)
        mlflow.log_metric("back", 9.0, step=10, timestamp=T0 + 10)
        mlflow.log_metric("back", 1.0, step=2, timestamp=T0 + 20)  # latest = greatest step, not last logged
        mlflow.log_artifact(str(note))
        mlflow.log_artifact(str(note), artifact_path="sub/dir")
        mlflow.log_text("text", "t/x.txt")
        mlflow.log_dict({"a": 1}, "d.json")
        # MLflow 3 reads the run back here: it must see everything logged so far
        seen = mlflow.get_run(parent.info.run_id)
        assert set(seen.data.metrics) == {"odd", "m0", "m1", "m2", "same_step", "back"}
        with mlflow.start_run(run_name="child", nested=True) as child:
            mlflow.log_metric("child_loss", 0.5, step=1, timestamp=T0)
            mlflow.set_tag("mlflow.note.content", "a child")
        mlflow.set_tag("mlflow.runName", "parent-renamed")
    client = MlflowClient(uri)
    experiment = mlflow.get_experiment_by_name("dropin")
    assert experiment is not None
    made = client.create_run(experiment.experiment_id, run_name="client")
    rid = made.info.run_id
    client.log_batch(
        rid,
        metrics=[Metric("h", float(i) / 3, T0 + i, i % 4) for i in range(20)] + [Metric("h", 7.0, T0, 0)],
        params=[Param("p", "1")],
        tags=[RunTag("k", "v"), RunTag("gone", "x")],
    )
    client.log_metric(rid, "single", 2.5, timestamp=T0, step=3)
    client.log_param(rid, "q", "2")
    client.set_tag(rid, "t", "3")
    client.delete_tag(rid, "gone")
    client.update_run(rid, name="client-renamed")
    client.set_terminated(rid, "FAILED")
    return {parent.info.run_id: "<parent>", child.info.run_id: "<child>", rid: "<client>"}


def read_all(uri: str, ids: dict[str, str]) -> dict[str, Any]:
    client = MlflowClient(uri)
    return {name: snapshot(client, run_id, ids) for run_id, name in ids.items()}


def assert_same_runs(plain: dict[str, Any], plugin: dict[str, Any]) -> None:
    # The one known difference: MlflowClient.create_run without tags records user "unknown";
    # steplog.start_run takes no user, so a run the plugin creates records the OS user.
    os_user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    assert ("unknown", os_user) == (plain["<client>"].pop("user_id"), plugin["<client>"].pop("user_id"))
    assert plain == plugin


# ---------------------------------------------------------------------------- URIs and registration


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("steplog+file:///abs/mlruns", ("file", "/abs/mlruns")),
        ("steplog+file:rel/mlruns", ("file", os.path.abspath("rel/mlruns"))),
        ("steplog:", ("file", os.path.abspath("mlruns"))),
        ("steplog:elsewhere", ("file", os.path.abspath("elsewhere"))),
        ("steplog+http://127.0.0.1:5000", ("rest", "http://127.0.0.1:5000")),
        ("STEPLOG+HTTPS://host/prefix", ("rest", "https://host/prefix")),
    ],
)
def test_split_uri_gives_what_start_run_takes(uri: str, expected: tuple[str, str]) -> None:
    """Each served scheme names a folder (made absolute once) or a server URL."""
    assert expected == split_uri(uri)


@pytest.mark.parametrize("uri", ["steplog+sqlite:///x.db", "steplog+http:", "steplog+http://", "steplog+file:", "x"])
def test_split_uri_refuses_what_it_does_not_serve(uri: str) -> None:
    """An unserved scheme or a URI without a destination is MLflow's INVALID_PARAMETER_VALUE, naming the forms."""
    with pytest.raises(MlflowException) as info:
        split_uri(uri)
    assert "INVALID_PARAMETER_VALUE" == info.value.error_code


def test_entry_points_name_the_builders() -> None:
    """pyproject registers every scheme for the tracking store and the model registry, and each target loads."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    for group, name in (("mlflow.tracking_store", "tracking_store"), ("mlflow.model_registry_store", "registry_store")):
        points = project["entry-points"][group]
        assert set(SCHEMES) == set(points)
        assert {f"steplog._mlflow_plugin:{name}"} == set(points.values())
    assert "mlflow>=3.17,<3.18" in project["optional-dependencies"]["mlflow"]


def test_installed_entry_points_reach_mlflow(tmp_path: Path) -> None:
    """Where steplog is installed with its entry points, MLflow builds steplog's store by itself (no registration)."""
    from importlib.metadata import entry_points

    names = {point.name for point in entry_points(group="mlflow.tracking_store")}
    # `make test` installs steplog with its entry points: MLflow must find them (reinstall a stale checkout)
    assert {"steplog", "steplog+file", "steplog+http", "steplog+https"} <= names
    code = (
        "import mlflow.tracking._tracking_service.utils as u, sys; "
        "print(type(u._get_store(sys.argv[1])).__name__, type(u._get_store(sys.argv[2])).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, f"steplog+{(tmp_path / 'mlruns').as_uri()}", "steplog+http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": ""},  # steplog+file is the opt-in by itself
    )
    assert "SteplogFileStore SteplogRestStore" == out.stdout.strip()


# ---------------------------------------------------------------------------- the file store


@pytest.mark.slow
def test_fluent_and_client_code_writes_what_plain_mlflow_writes(tmp_path: Path) -> None:
    """The same MLflow code against file: and steplog+file: leaves runs a plain client cannot tell apart."""
    plain_uri = (tmp_path / "plain").as_uri()
    plugin_root = tmp_path / "plugin"
    plain = read_all(plain_uri, fluent_workload(plain_uri, tmp_path))
    plugin_ids = fluent_workload(f"steplog+{plugin_root.as_uri()}", tmp_path)
    plugin = read_all(plugin_root.as_uri(), plugin_ids)
    assert_same_runs(plain, plugin)
    assert {"FINISHED", "FAILED"} == {run["status"] for run in plugin.values()}


def test_get_run_of_a_run_being_written_matches_mlflows_reader_without_io(tmp_path: Path) -> None:
    """get_run is answered from memory, and equals what MLflow's FileStore reads once everything is written."""
    import numpy as np

    uri = f"steplog+{(tmp_path / 'mlruns').as_uri()}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name="r") as run:
        mlflow.log_params({"a": 1, "b": "x"})
        mlflow.set_tags({"t": "v", "mlflow.runName": "renamed"})
        for step, value in enumerate(VALUES):
            mlflow.log_metrics({"v": value, "w": -value}, step=step % 3, timestamp=T0 + step)
        # a write steplog does not buffer (MLflow's store writes it), read back once: get_run stays in memory
        mlflow.log_input(
            mlflow.data.from_numpy(  # type: ignore[attr-defined]  # mlflow.data re-exports it lazily
                np.arange(6.0).reshape(3, 2), name="train"
            ),
            context="training",
        )
        mlflow.log_metric("after_input", 1.5, step=7, timestamp=T0)
        store = store_for(uri)
        touched: list[str] = []
        real_info = SteplogFileStore._get_run_info

        def spy(self: Any, run_id: str) -> Any:
            touched.append(run_id)
            return real_info(self, run_id)

        SteplogFileStore._get_run_info = spy  # type: ignore[method-assign]  # a spy on purpose
        try:
            cached = store.get_run(run.info.run_id)
        finally:
            SteplogFileStore._get_run_info = real_info  # type: ignore[method-assign]  # the spy removed
        assert [] == touched
        store.flush_runs()
        with_mlflows_reader = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(run.info.run_id)
    assert with_mlflows_reader.info.to_proto() == cached.info.to_proto()
    assert sorted(
        (m.key, m.step, m.timestamp, bits(m.value), m.run_id) for m in with_mlflows_reader.data._metric_objs
    ) == sorted((m.key, m.step, m.timestamp, bits(m.value), m.run_id) for m in cached.data._metric_objs)
    assert with_mlflows_reader.data.params == cached.data.params
    assert with_mlflows_reader.data.tags == cached.data.tags
    assert with_mlflows_reader.inputs is not None
    assert cached.inputs is not None
    assert with_mlflows_reader.inputs.to_proto() == cached.inputs.to_proto()
    assert with_mlflows_reader.outputs is not None
    assert cached.outputs is not None
    assert with_mlflows_reader.outputs.to_proto() == cached.outputs.to_proto()


def test_log_calls_touch_no_file_in_the_calling_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.log_metric/log_metrics/log_param/set_tag open no file in the caller's thread: the writer's thread does."""
    import builtins
    import io

    mlflow.set_tracking_uri(f"steplog+{(tmp_path / 'mlruns').as_uri()}")
    caller = threading.get_ident()
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == caller:
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if threading.get_ident() == caller:
            opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    with mlflow.start_run() as run:
        mlflow.log_metric("warm", 0.0)  # MLflow's first call imports and caches; count the steady state
        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        for step in range(50):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_metrics({"a": 1.0, "b": 2.0}, step=step)
        mlflow.log_param("p", 1)
        mlflow.set_tag("t", 2)
        monkeypatch.undo()
    assert [] == opened
    assert 50 == len(MlflowClient((tmp_path / "mlruns").as_uri()).get_metric_history(run.info.run_id, "loss"))


def test_reads_flush_first_and_only_when_something_is_pending(tmp_path: Path) -> None:
    """A history or a search right after logging sees every point; a read with nothing new pending costs no barrier."""
    uri = f"steplog+{(tmp_path / 'mlruns').as_uri()}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with mlflow.start_run() as run:
        store = store_for(uri)
        steplog_run = store._written[run.info.run_id].run
        barriers: list[float | None] = []
        real_flush = steplog_run.flush

        def counted_flush(timeout: float | None = None) -> None:
            barriers.append(timeout)
            real_flush(timeout)

        steplog_run.flush = counted_flush
        for step in range(300):
            mlflow.log_metric("loss", float(step), step=step)
        assert list(range(300)) == [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert 1 == len(barriers)
        client.get_metric_history(run.info.run_id, "loss")
        found = client.search_runs([run.info.experiment_id], "metrics.loss > 298")
        assert [run.info.run_id] == [r.info.run_id for r in found]
        assert 1 == len(barriers)  # nothing was logged since the first read
        mlflow.log_metric("loss", 300.0, step=300)
        assert 1 == len(client.search_runs([run.info.experiment_id], "metrics.loss > 299"))
        assert 2 == len(barriers)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mlflow.log_metric("bad key?", 1.0),
        lambda: mlflow.log_metric("x", "not a number"),  # type: ignore[arg-type]  # a wrong type on purpose
        lambda: mlflow.log_param("p", 2),  # logged as 1 first
        lambda: mlflow.log_params({"../escape": 1}),
        lambda: mlflow.set_tag("", "v"),
    ],
    ids=["key", "value", "param-changed", "param-key", "tag-key"],
)
@pytest.mark.parametrize("plugin", [False, True], ids=["plain", "steplog"])
def test_bad_input_raises_mlflows_invalid_parameter_value(
    tmp_path: Path, call: Callable[[], None], plugin: bool
) -> None:
    """What plain MLflow refuses with INVALID_PARAMETER_VALUE, the plugin refuses the same way (no steplog type)."""
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(f"steplog+{uri}" if plugin else uri)
    with mlflow.start_run():
        mlflow.log_param("p", 1)
        with pytest.raises(MlflowException) as info:
            call()
        mlflow.log_metric("after", 1.0)  # the run goes on
    assert "INVALID_PARAMETER_VALUE" == info.value.error_code


def test_end_run_status_and_later_writes(tmp_path: Path) -> None:
    """end_run(status) ends the steplog run with that status; MLflow may still log to the ended run, as usual."""
    root = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(f"steplog+{root}")
    run = mlflow.start_run()
    mlflow.log_metric("loss", 1.0, step=0)
    mlflow.end_run("KILLED")
    steplog_run = store_for(f"steplog+{root}")._written.get(run.info.run_id)
    assert steplog_run is None  # handed back to MLflow's store
    client = MlflowClient(f"steplog+{root}")
    client.log_metric(run.info.run_id, "late", 2.0, step=1)
    read = MlflowClient(root).get_run(run.info.run_id)
    assert ("KILLED", {"loss": 1.0, "late": 2.0}) == (read.info.status, read.data.metrics)
    assert read.info.end_time is not None


def test_resuming_a_run_writes_through_mlflows_store(tmp_path: Path) -> None:
    """mlflow.start_run(run_id=...) of an existing run works: MLflow's own store writes it (no steplog resume yet)."""
    root = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(root)
    with mlflow.start_run() as first:
        mlflow.log_metric("loss", 1.0, step=0)
    mlflow.set_tracking_uri(f"steplog+{root}")
    with mlflow.start_run(run_id=first.info.run_id):
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_param("resumed", "yes")
    client = MlflowClient(root)
    read = client.get_run(first.info.run_id)
    assert ("FINISHED", {"resumed": "yes"}) == (read.info.status, read.data.params)
    assert [(0, 1.0), (1, 0.5)] == [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "loss")]


def test_async_logging_goes_through_the_plugin(tmp_path: Path) -> None:
    """mlflow.log_metric(synchronous=False) reaches the same run (MLflow's own queue calls the store's log_batch)."""
    uri = f"steplog+{(tmp_path / 'mlruns').as_uri()}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        for step in range(20):
            mlflow.log_metric("loss", float(step), step=step, synchronous=False)
    history = MlflowClient((tmp_path / "mlruns").as_uri()).get_metric_history(run.info.run_id, "loss")
    assert list(range(20)) == sorted(m.step for m in history)


def test_logging_from_inside_an_event_loop_starts_the_run(tmp_path: Path) -> None:
    """MLflow code called from async code (a notebook, a server) still writes: the run gets its own writer thread."""
    import asyncio

    uri = f"steplog+{(tmp_path / 'mlruns').as_uri()}"

    async def main() -> str:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 0.5, step=1)
        return str(run.info.run_id)

    run_id = asyncio.run(main())
    read = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(run_id)
    assert ("FINISHED", {"loss": 0.5}) == (read.info.status, read.data.metrics)


def test_bare_scheme_writes_mlruns_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_URI=steplog: writes ./mlruns, as steplog.start_run() does by default."""
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri("steplog:")
    with mlflow.start_run() as run:
        mlflow.log_metric("loss", 0.25, step=3)
    read = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(run.info.run_id)
    assert {"loss": 0.25} == read.data.metrics


def test_deleting_a_run_being_written_stays_deleted(tmp_path: Path) -> None:
    """delete_run of an open run keeps what was logged and is not undone when the run ends (it ends KILLED)."""
    root = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(f"steplog+{root}")
    run_id = client.create_run("0").info.run_id
    client.log_metric(run_id, "loss", 1.0, step=0)
    client.delete_run(run_id)
    with pytest.raises(MlflowException):
        client.log_metric(run_id, "loss", 2.0, step=1)  # as plain MLflow: a deleted run takes no more writes
    read = MlflowClient(root).get_run(run_id)
    assert ("deleted", "KILLED", {"loss": 1.0}) == (read.info.lifecycle_stage, read.info.status, read.data.metrics)


def test_get_run_waits_for_an_input_being_logged_on_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's store writes an input's folder before its meta.yaml; a get_run from another thread waits for both.

    sklearn autolog logs its dataset on a thread of its own while the fit's thread reads the run
    (to log an artifact): read between the two, MLflow's reader fails on the missing meta.yaml.
    """
    import numpy as np
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.store.tracking.file_store import FileStore

    writing = threading.Event()
    real_write = FileStore._FileStoreInput.write_yaml

    def slow_write(self: Any, *args: Any) -> Any:
        writing.set()  # the input's folder exists, its meta.yaml not yet
        threading.Event().wait(0.3)
        return real_write(self, *args)

    monkeypatch.setattr(FileStore._FileStoreInput, "write_yaml", slow_write)
    uri = f"steplog+{(tmp_path / 'mlruns').as_uri()}"
    client = MlflowClient(uri)
    run_id = client.create_run("0").info.run_id
    client.log_metric(run_id, "loss", 1.0, step=0)
    dataset = mlflow.data.from_numpy(np.arange(6.0).reshape(3, 2), name="train")  # type: ignore[attr-defined]
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])
    logger = threading.Thread(target=client.log_inputs, args=(run_id, [entry]))
    logger.start()
    assert writing.wait(10)
    read = client.get_run(run_id)
    logger.join()
    assert read.inputs is not None
    assert ["train"] == [d.dataset.name for d in read.inputs.dataset_inputs]
    assert {"loss": 1.0} == read.data.metrics
    client.set_terminated(run_id)


@pytest.mark.slow
def test_sklearn_autolog_writes_what_plain_mlflow_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.sklearn.autolog() with a small model logs the same params, metrics and tags through the plugin."""
    import numpy as np
    import sklearn.linear_model as sklearn_linear  # type: ignore[import-untyped]  # scikit-learn ships no types

    x = np.arange(40, dtype=float).reshape(20, 2)
    y = x @ np.array([0.5, -1.5]) + 2.0

    def fit(uri: str) -> str:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("autolog")
        mlflow.sklearn.autolog(log_models=False, log_datasets=True, silent=True)
        with mlflow.start_run(run_name="fit") as run:
            sklearn_linear.LinearRegression().fit(x, y)
        mlflow.sklearn.autolog(disable=True)
        return str(run.info.run_id)

    plain_uri = (tmp_path / "plain").as_uri()
    with monkeypatch.context() as patch:
        # plain MLflow has the race the plugin closes (test_get_run_waits_for_an_input_being_logged_on_
        # another_thread): autolog's thread writes the dataset input while the fit's thread reads the
        # run, and a read between the input's folder and its meta.yaml loses the fit's metrics. The
        # reference run must not depend on it: its store does one of the two at a time
        from mlflow.store.tracking.file_store import FileStore

        one_at_a_time = threading.RLock()
        for name in ("log_inputs", "get_run"):
            patch.setattr(FileStore, name, _serialized(getattr(FileStore, name), one_at_a_time))
        plain_id = fit(plain_uri)
    plugin_id = fit(f"steplog+{(tmp_path / 'plugin').as_uri()}")
    plain = MlflowClient(plain_uri).get_run(plain_id)
    plugin = MlflowClient((tmp_path / "plugin").as_uri()).get_run(plugin_id)
    assert plain.data.params == plugin.data.params
    assert {k: bits(v) for k, v in plain.data.metrics.items()} == {k: bits(v) for k, v in plugin.data.metrics.items()}
    assert plain.data.tags == plugin.data.tags
    # the dataset went through log_inputs to MLflow's own store
    assert plain.inputs is not None
    assert plugin.inputs is not None
    assert len(plain.inputs.dataset_inputs) == len(plugin.inputs.dataset_inputs) > 0
    assert plain.info.status == plugin.info.status


def _serialized(method: Callable[..., Any], lock: threading.RLock) -> Callable[..., Any]:
    def serialized(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return serialized


def history_bits(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, bytes]]]:
    """Every metric history of a run as (step, value bits), timestamps left out (they are the time of the call).

    A point identical to the one before it (same step, timestamp and value) counts once: steplog
    writes such a repeat once (so ``mlflow migrate-filestore`` accepts the store), MLflow twice.
    """
    run = client.get_run(run_id)
    out: dict[str, list[tuple[int, bytes]]] = {}
    for key in run.data.metrics:
        points = [(m.step, m.timestamp, bits(m.value)) for m in client.get_metric_history(run_id, key)]
        kept = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]
        out[key] = [(step, value) for step, _ts, value in kept]
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # Lightning's own use of torch's deprecated pytree names
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on dataloader workers
def test_lightning_mlflow_logger_writes_what_plain_mlflow_writes(tmp_path: Path) -> None:
    """Lightning's own MLFlowLogger (MlflowClient underneath) pointed at steplog+file: logs the same run."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    module_base: Any = pl.LightningModule

    class Tiny(module_base):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.05, "width": 2, "nested": {"a": 1}})
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, index: int) -> Any:
            x, y = batch
            loss = ((self.layer(x) - y) ** 2).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(uri: str) -> str:
        torch.manual_seed(0)
        x = torch.randn(16, 2)
        data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
        logger = MLFlowLogger(experiment_name="lightning", tracking_uri=uri, run_name="fit")
        trainer = pl.Trainer(
            max_epochs=2,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Tiny(), data)
        return str(logger.run_id)

    plain_uri = (tmp_path / "plain").as_uri()
    plain_id = fit(plain_uri)
    plugin_id = fit(f"steplog+{(tmp_path / 'plugin').as_uri()}")
    plain_client, plugin_client = MlflowClient(plain_uri), MlflowClient((tmp_path / "plugin").as_uri())
    plain, plugin = plain_client.get_run(plain_id), plugin_client.get_run(plugin_id)
    assert (plain.info.status, plain.data.params, plain.data.tags) == (
        plugin.info.status,
        plugin.data.params,
        plugin.data.tags,
    )
    assert history_bits(plain_client, plain_id) == history_bits(plugin_client, plugin_id)
    assert 8 == len(history_bits(plugin_client, plugin_id)["train_loss"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' and torch's own deprecations
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformers_mlflow_callback_writes_what_plain_mlflow_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF's own MLflowCallback (fluent API, MLFLOW_TRACKING_URI) pointed at steplog+file: logs the same run."""
    import torch
    import transformers

    dataset_base: Any = torch.utils.data.Dataset

    class Data(dataset_base):  # type: ignore[misc]
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, Any]:
            ids = torch.tensor([(i + j) % 10 for j in range(4)])
            return {"input_ids": ids, "attention_mask": torch.ones(4, dtype=torch.long), "labels": torch.tensor(i % 2)}

    def train(uri: str, out: Path) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
        )
        args = transformers.TrainingArguments(
            output_dir=str(out),
            run_name="hf",
            max_steps=4,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to=["mlflow"],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=transformers.BertForSequenceClassification(config), args=args, train_dataset=Data()
        )
        trainer.train()
        run = mlflow.last_active_run()
        assert run is not None
        return str(run.info.run_id)

    plain_uri = (tmp_path / "plain").as_uri()
    plain_id = train(plain_uri, tmp_path / "out")
    plugin_id = train(f"steplog+{(tmp_path / 'plugin').as_uri()}", tmp_path / "out")
    plain_client, plugin_client = MlflowClient(plain_uri), MlflowClient((tmp_path / "plugin").as_uri())
    plain, plugin = plain_client.get_run(plain_id), plugin_client.get_run(plugin_id)
    assert (plain.info.status, plain.data.params, plain.data.tags) == (
        plugin.info.status,
        plugin.data.params,
        plugin.data.tags,
    )
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")

    # HF logs `epoch` again at the end with the same step and value: whether the two share a millisecond (and
    # are then one identical point, written once by steplog) is timing, so repeats are folded on both sides.
    # HF's callback logs with synchronous=False, so plain MLflow's file holds the points in the order its
    # background queue wrote them, which varies: the histories are compared in step order
    def folded(hist: dict[str, list[tuple[int, bytes]]]) -> dict[str, list[tuple[int, bytes]]]:
        ordered = {k: sorted(v) for k, v in hist.items() if k not in timing}
        return {k: [p for i, p in enumerate(v) if i == 0 or p != v[i - 1]] for k, v in ordered.items()}

    plugin_hist = history_bits(plugin_client, plugin_id)
    assert set(timing) <= set(plugin_hist)
    assert folded(history_bits(plain_client, plain_id)) == folded(plugin_hist)
    assert 4 == len(plugin_hist["loss"])


# ---------------------------------------------------------------------------- how a process ends


def run_child(uri: str, ending: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(CHILD), uri, ending], capture_output=True, text=True, timeout=120, check=False
    )
    return proc.returncode, proc.stdout.split()[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ending", "status", "rc"),
    [("end_run", "KILLED", 0), ("exit", "FINISHED", 0), ("crash", "FAILED", 1), ("sigterm", "KILLED", -signal.SIGTERM)],
)
def test_process_endings_close_the_run_as_steplog_does(tmp_path: Path, ending: str, status: str, rc: int) -> None:
    """end_run, a normal exit, a crash and SIGTERM leave every point written, the end time, and steplog's status.

    Plain MLflow records a crash as FINISHED and leaves a SIGTERMed run RUNNING; with the
    plugin they end FAILED and KILLED, as ``with steplog.start_run()`` does. The child logs
    with ``flush_interval=60``, so the points were written by the ending itself.
    """
    root = (tmp_path / "mlruns").as_uri()
    code, run_id = run_child(f"steplog+{root}", ending)
    assert rc == code
    client = MlflowClient(root)
    run = client.get_run(run_id)
    assert (status, True) == (run.info.status, run.info.end_time is not None)
    assert {"lr": "0.001", "layers": "3"} == run.data.params
    for key in ("loss", "acc", "lr"):
        assert list(range(200)) == [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize(("ending", "status", "rc"), [("crash", "FAILED", 1), ("sigterm", "KILLED", -signal.SIGTERM)])
def test_process_endings_on_a_server(mlflow_server: Any, ending: str, status: str, rc: int) -> None:
    """Through steplog+http:, a crash and SIGTERM also leave every point on the server and the run ended."""
    code, run_id = run_child(f"steplog+{mlflow_server.url}", ending)
    assert rc == code
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert (status, True) == (run.info.status, run.info.end_time is not None)
    for key in ("loss", "acc", "lr"):
        assert list(range(200)) == [m.step for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------------------- a tracking server


@pytest.mark.slow
@pytest.mark.server
def test_server_fluent_and_client_code_writes_what_plain_mlflow_writes(mlflow_server: Any, tmp_path: Path) -> None:
    """The same code against http:// and steplog+http:// leaves the same runs on a real mlflow server."""
    plain = read_all(mlflow_server.url, fluent_workload(mlflow_server.url, tmp_path))
    plugin = read_all(mlflow_server.url, fluent_workload(f"steplog+{mlflow_server.url}", tmp_path))
    for run in plugin.values():
        run["tags"].pop("steplog.run_key", None)  # steplog's REST sink marks its runs to find them after a lost answer
    assert_same_runs(plain, plugin)
    assert isinstance(store_for(f"steplog+{mlflow_server.url}"), SteplogRestStore)
