"""MLflow 3.17's own client reads back exactly what steplog logged: sync runs, and async runs on asyncio and trio.

Values are compared bit for bit (``struct.pack('<d', v)``); every NaN counts as one NaN, since no text
format (MLflow's included) can carry a NaN's payload.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import mlflow
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

import steplog

SPECIAL = [
    0.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    0.1,
    1 / 3,
    123456789.12345679,
    1e-300,
    float(2**53 + 1),
]


def bits(values: list[float]) -> list[bytes]:
    """The exact bits of each float (every NaN as the one canonical NaN)."""
    return [struct.pack("<d", math.nan if v != v else v) for v in values]


# --------------------------------------------------------------------------- one run, everything in it


class Logged:
    """What a test logged, to compare with what MLflow reads back."""

    def __init__(self, tmp_path: Path) -> None:
        self.values = SPECIAL + [i * 0.01 for i in range(200)]
        self.steps = list(range(-2, len(self.values) - 2))  # negative steps are valid too
        self.params = {"lr": "0.001", "layers": "3", "optimizer": "adamw", "long": "x" * 6000, "unicode": "é 日本"}
        self.tags = {"team": "vision", "multi": "line one\nline two", "mlflow.note.content": "a note"}
        self.nested = {"eval/acc/top1": 0.75, "eval/acc/top5": 0.95, "eval/loss": 0.5}
        self.source = tmp_path / "source"
        (self.source / "dir" / "sub").mkdir(parents=True)
        (self.source / "model.bin").write_bytes(bytes(range(256)) * 4)
        (self.source / "dir" / "a.txt").write_text("a", encoding="utf-8")
        (self.source / "dir" / "sub" / "b.txt").write_text("b", encoding="utf-8")
        self.config = {"model": {"layers": [64, 32], "dropout": 0.1}, "name": "mlp", "ok": True}

    def log(self, run: steplog.Run) -> None:
        """Log everything through the run's public methods."""
        run.log_params(self.params)
        run.set_tags(self.tags)
        for step, value in zip(self.steps, self.values, strict=True):
            run.log_metric("values", value, step=step)
        run.log_metrics(self.nested, step=7)
        run.log_metric("explicit", 2.5, step=3, timestamp=1_600_000_000_123)
        run.log_artifact(self.source / "model.bin")
        run.log_artifact(self.source / "model.bin", artifact_path="models/best")
        run.log_artifact(self.source / "dir")
        run.log_text("hello\nworld", "notes/readme.txt")
        run.log_dict(self.config, "config.json")
        run.log_dict(self.config, "config.yaml")

    def check(self, store: Path, run: steplog.Run, tmp_path: Path) -> None:
        """MLflow's client returns exactly what was logged."""
        client = MlflowClient(tracking_uri=store.as_uri())
        got = client.get_run(run.run_id)
        info = got.info
        assert (run.run_id, run.experiment_id, run.info.run_name) == (info.run_id, info.experiment_id, info.run_name)
        assert ("FINISHED", "active") == (info.status, info.lifecycle_stage)
        assert (run.info.start_time, run.info.end_time) == (info.start_time, info.end_time)
        assert run.info.user_id == info.user_id
        assert self.params == got.data.params
        assert self.tags.items() <= got.data.tags.items()
        assert run.info.run_name == got.data.tags["mlflow.runName"]

        history = client.get_metric_history(run.run_id, "values")
        assert bits(self.values) == bits([m.value for m in history])
        assert self.steps == [m.step for m in history]
        assert all(isinstance(m.timestamp, int) and m.timestamp >= run.info.start_time - 1000 for m in history)
        for key, value in self.nested.items():
            assert [(7, value)] == [(m.step, m.value) for m in client.get_metric_history(run.run_id, key)]
        explicit = client.get_metric_history(run.run_id, "explicit")
        assert [(3, 2.5, 1_600_000_000_123)] == [(m.step, m.value, m.timestamp) for m in explicit]
        # MLflow's "latest" rule: max by (step, timestamp, value)
        assert {**self.nested, "explicit": 2.5}.items() <= got.data.metrics.items()

        listed = {a.path: a.is_dir for a in client.list_artifacts(run.run_id)}
        expected_root = {
            "model.bin": False,
            "models": True,
            "dir": True,
            "notes": True,
            "config.json": False,
            "config.yaml": False,
        }
        assert expected_root == listed
        assert ["dir/a.txt", "dir/sub"] == sorted(a.path for a in client.list_artifacts(run.run_id, "dir"))
        out = Path(client.download_artifacts(run.run_id, "", dst_path=str(tmp_path / "download")))
        assert (self.source / "model.bin").read_bytes() == (out / "model.bin").read_bytes()
        assert (self.source / "model.bin").read_bytes() == (out / "models" / "best" / "model.bin").read_bytes()
        assert "b" == (out / "dir" / "sub" / "b.txt").read_text(encoding="utf-8")
        assert "hello\nworld" == (out / "notes" / "readme.txt").read_text(encoding="utf-8")
        assert self.config == json.loads((out / "config.json").read_text(encoding="utf-8"))
        assert self.config == yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        assert self.config == mlflow.artifacts.load_dict(f"{info.artifact_uri}/config.json")


def test_sync_run_reads_back_exactly(store: Path, tmp_path: Path) -> None:
    """A sync run: values (bit-exact), steps, params, tags, status, name, times and artifacts read back in MLflow."""
    logged = Logged(tmp_path)
    with steplog.start_run("roundtrip", run_name="sync run", tracking_uri=store) as run:
        logged.log(run)
    logged.check(store, run, tmp_path)


@pytest.mark.anyio
async def test_async_run_reads_back_exactly(store: Path, tmp_path: Path, anyio_backend: str) -> None:
    """An async run on asyncio and on trio reads back in MLflow exactly like a sync one."""
    logged = Logged(tmp_path)
    async with steplog.start_run("roundtrip", run_name=f"{anyio_backend} run", tracking_uri=store) as run:
        logged.log(run)
        await anyio.lowlevel.checkpoint()  # let the writer interleave with logging (not a wait for it)
        run.log_metric("after-yield", 1.0)
    logged.check(store, run, tmp_path)
    assert [1.0] == [
        m.value for m in MlflowClient(tracking_uri=store.as_uri()).get_metric_history(run.run_id, "after-yield")
    ]


@settings(
    deadline=None,  # the machine is shared: timings are noisy
    max_examples=25,  # each example is a whole run read back by MLflow
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1, max_size=50),
    start=st.integers(min_value=-(2**62), max_value=2**62),
)
def test_any_floats_read_back_bit_exactly(values: list[float], start: int, tmp_path: Path) -> None:
    """Hypothesis-generated floats (NaN, ±inf, -0.0, subnormals, extremes) read back bit for bit, steps exact."""
    store = tmp_path / "mlruns"
    with steplog.start_run("hypothesis", tracking_uri=store) as run:
        for i, value in enumerate(values):
            run.log_metric("v", value, step=start + i)
    history = MlflowClient(tracking_uri=store.as_uri()).get_metric_history(run.run_id, "v")
    assert bits(values) == bits([m.value for m in history])
    assert [start + i for i in range(len(values))] == [m.step for m in history]


def test_more_keys_than_open_file_handles(store: Path) -> None:
    """With more metric keys than the sink keeps open, files are closed and reopened and every point still lands."""
    keys = [f"layer{i:03d}/grad_norm" for i in range(300)]  # the sink keeps 128 files open
    with steplog.start_run("many keys", tracking_uri=store) as run:
        for step in range(4):
            run.log_metrics({key: step + i / 1000 for i, key in enumerate(keys)}, step=step)
            run.flush()
    client = MlflowClient(tracking_uri=store.as_uri())
    assert set(keys) == set(client.get_run(run.run_id).data.metrics)
    for i in (0, 127, 128, 299):
        history = client.get_metric_history(run.run_id, keys[i])
        assert [(s, s + i / 1000) for s in range(4)] == [(m.step, m.value) for m in history]


# --------------------------------------------------------------------------- store-level interop


def test_search_runs_over_the_experiment(store: Path) -> None:
    """search_runs over a steplog experiment works, with metric and param filters, and sees every run."""
    ids = []
    for lr, final in [("0.1", 0.9), ("0.01", 0.4), ("0.001", 0.2)]:
        with steplog.start_run("search", tracking_uri=store) as run:
            run.log_param("lr", lr)
            for step in range(5):
                run.log_metric("loss", final + (4 - step) * 0.1, step=step)
            run.log_metric("weird", math.nan, step=0)
            run.log_metric("weird", math.inf, step=1)
        ids.append(run.run_id)
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("search")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(ids) == sorted(r.info.run_id for r in runs)
    low = client.search_runs([experiment.experiment_id], "metrics.loss < 0.5")
    assert sorted(ids[1:]) == sorted(r.info.run_id for r in low)
    exact = client.search_runs([experiment.experiment_id], "params.lr = '0.01'")
    assert [ids[1]] == [r.info.run_id for r in exact]
    assert {math.inf} == {r.data.metrics["weird"] for r in runs}
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    assert 3 == len(finished)


@pytest.fixture
def mlflow_uri(store: Path) -> Iterator[str]:
    """MLflow's fluent API pointed at ``store`` for the test (restored afterwards)."""
    with _use_tracking_uri(store.as_uri()):
        yield store.as_uri()
    assert mlflow.active_run() is None


def test_mlflow_start_run_works_in_a_root_steplog_created(store: Path, mlflow_uri: str) -> None:
    """On a root steplog created, the Default experiment 0 exists, so plain ``mlflow.start_run()`` works."""
    with steplog.start_run("mine", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
    default = yaml.safe_load((store / "0" / "meta.yaml").read_text(encoding="utf-8"))
    assert ("0", "Default", "active") == (default["experiment_id"], default["name"], default["lifecycle_stage"])
    with mlflow.start_run() as mlflow_run:
        mlflow.log_metric("y", 2.0, step=1)
        mlflow.log_param("p", "q")
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert "0" == mlflow_run.info.experiment_id
    assert [(1, 2.0)] == [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "y")]
    names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ALL))
    assert ["Default", "mine"] == names
    # and steplog's reader reads MLflow's run
    assert {"p": "q"} == steplog.Store(store).get_run(mlflow_run.info.run_id).params


def test_experiments_are_reused_by_name(store: Path) -> None:
    """A second run in the same experiment name joins the experiment; MLflow sees one experiment with two runs."""
    with steplog.start_run("shared", tracking_uri=store) as first:
        pass
    with steplog.start_run("shared", tracking_uri=store) as second:
        pass
    with steplog.start_run("other", tracking_uri=store) as third:
        pass
    assert first.experiment_id == second.experiment_id != third.experiment_id
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("shared")
    assert experiment is not None
    assert first.experiment_id == experiment.experiment_id
    assert (store / first.experiment_id).as_uri() == experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    assert sorted([first.run_id, second.run_id]) == sorted(r.info.run_id for r in runs)
    assert ["Default", "other", "shared"] == sorted(e.name for e in client.search_experiments())


def test_the_default_experiment_is_experiment_0(store: Path) -> None:
    """start_run() without an experiment logs to MLflow's Default experiment, id 0, on a fresh or existing root."""
    with steplog.start_run(tracking_uri=store) as first:
        pass
    with steplog.start_run(tracking_uri=store) as second:
        pass
    assert ("0", "0") == (first.experiment_id, second.experiment_id)
    client = MlflowClient(tracking_uri=store.as_uri())
    assert ["Default"] == [e.name for e in client.search_experiments()]
    assert sorted([first.run_id, second.run_id]) == sorted(r.info.run_id for r in client.search_runs(["0"]))


def test_a_deleted_experiment_is_not_reused(store: Path) -> None:
    """Logging to the name of an experiment deleted in MLflow is refused, saying how to restore it."""
    with steplog.start_run("gone", tracking_uri=store) as run:
        pass
    MlflowClient(tracking_uri=store.as_uri()).delete_experiment(run.experiment_id)
    with pytest.raises(steplog.StepLogError, match=r"experiment 'gone' is deleted.*restore"):
        steplog.start_run("gone", tracking_uri=store)


def test_an_experiment_mlflow_created_is_reused(store: Path) -> None:
    """steplog joins an experiment MLflow itself created, by name."""
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment_id = client.create_experiment("made by mlflow")
    with steplog.start_run("made by mlflow", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
    assert experiment_id == run.experiment_id
    assert [run.run_id] == [r.info.run_id for r in client.search_runs([experiment_id])]


def test_ids_have_mlflows_shape(store: Path) -> None:
    """Experiment ids are 18-digit integers (as MLflow's file store makes them); run ids are 32 lowercase hex."""
    runs = []
    for name in ["a", "b", "c"]:
        with steplog.start_run(name, tracking_uri=store) as run:
            pass
        runs.append(run)
    for run in runs:
        assert re.fullmatch(r"[1-9]\d{17}", run.experiment_id), run.experiment_id
        assert re.fullmatch(r"[0-9a-f]{32}", run.run_id), run.run_id
    client = MlflowClient(tracking_uri=store.as_uri())
    assert sorted(["0"] + [r.experiment_id for r in runs]) == sorted(
        e.experiment_id for e in client.search_experiments()
    )


def test_unicode_experiment_and_run_names(store: Path) -> None:
    """Experiment and run names YAML would misread (numbers, words, unicode, quotes) read back exactly in MLflow."""
    for name in ["0123", "yes", "null", "日本 é", "1e5", 'say "hi"', "a: b", "- dash"]:
        with steplog.start_run(name, run_name=name, tracking_uri=store) as run:
            pass
        client = MlflowClient(tracking_uri=store.as_uri())
        experiment = client.get_experiment(run.experiment_id)
        assert name == experiment.name
        assert name == client.get_run(run.run_id).info.run_name


def test_param_values_are_raw_files_read_back_exactly(store: Path) -> None:
    """Params and tags are raw files (no trailing newline), so MLflow reads exactly str(value)."""
    values: dict[str, Any] = {"int": 5, "float": 1e-3, "none": None, "text": "two\nlines", "spaces": " a b "}
    with steplog.start_run("raw", tracking_uri=store) as run:
        run.log_params(values)
        run.set_tags(values)
    got = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    expected = {k: str(v) for k, v in values.items()}  # None too: MLflow stores "None"
    assert expected == got.data.params
    assert expected.items() <= got.data.tags.items()
    assert b"5" == (store / run.experiment_id / run.run_id / "params" / "int").read_bytes()


@pytest.mark.parametrize("artifact_file", ["bad.json", "bad.yaml"])
def test_log_dict_refuses_what_it_cannot_serialize(artifact_file: str, store: Path) -> None:
    """log_dict with an object JSON/YAML cannot represent raises InvalidValueError at the call, naming the file."""
    match = re.escape(f"artifact file {artifact_file!r}")
    with (
        steplog.start_run("artifacts", tracking_uri=store) as run,
        pytest.raises(steplog.InvalidValueError, match=match),
    ):
        run.log_dict({"when": object()}, artifact_file)
    assert [] == MlflowClient(tracking_uri=store.as_uri()).list_artifacts(run.run_id)


@pytest.mark.parametrize("artifact_path", ["../escape", "/abs", "a/../../b"])
def test_artifact_paths_cannot_escape_the_run(artifact_path: str, store: Path, tmp_path: Path) -> None:
    """Artifact destinations outside the run's artifact directory are refused at the call."""
    source = tmp_path / "f.txt"
    source.write_text("x", encoding="utf-8")
    with steplog.start_run("artifacts", tracking_uri=store) as run:
        with pytest.raises(steplog.InvalidValueError, match="artifact"):
            run.log_artifact(source, artifact_path=artifact_path)
        with pytest.raises(steplog.InvalidValueError, match="artifact"):
            run.log_text("x", artifact_path)
        with pytest.raises(steplog.InvalidValueError, match="does not exist"):
            run.log_artifact(tmp_path / "missing.txt")


def test_renaming_through_the_run_name_tag(store: Path) -> None:
    """Setting the mlflow.runName tag renames the run in meta.yaml too, as MLflow does, so both agree."""
    with steplog.start_run("rename", run_name="before", tracking_uri=store) as run:
        run.set_tag("mlflow.runName", "after")
    got = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    assert ("after", "after") == (got.info.run_name, got.data.tags["mlflow.runName"])


def test_fsync_durability_with_more_keys_than_open_files(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """durability='fsync' with more keys than the open-file cap fsyncs each metric file itself, and writes all."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # the file the descriptor is open on right now
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with steplog.start_run("fsync", tracking_uri=store, durability="fsync") as run:
        run.log_metrics({f"k{i:03d}": float(i) for i in range(200)}, step=0)
    metric_files = {Path(p).name for p in synced if "/metrics/" in p}
    assert {f"k{i:03d}" for i in range(200)} == metric_files
    client = MlflowClient(tracking_uri=store.as_uri())
    assert 200 == len(client.get_run(run.run_id).data.metrics)


def test_params_and_tags_are_written_without_temp_files_beside_them(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Param and tag files are replaced through a temp file in the run folder, never in params/ or tags/."""
    import steplog._layout as layout

    temp_dirs: list[str] = []
    real_replace = os.replace

    def recording_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(layout.TMP_PREFIX):
            temp_dirs.append(Path(src).parent.name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    with steplog.start_run("tmp", tracking_uri=store) as run:
        run.log_params({"lr": 0.1, "nested/p": 1})
        run.set_tags({"team": "ml"})
    assert temp_dirs
    assert not {"params", "tags", "nested"} & set(temp_dirs), temp_dirs
