"""steplog.Store reads steplog's and MLflow's own file stores exactly as MLflow does, and fast.

MLflow 3.17's client is the reference: every figure Store returns (runs, params, tags,
latest metrics, histories) is checked against what ``MlflowClient`` reads from the same
store, for a store written by steplog and one written by MLflow itself.
"""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import steplog
from steplog import MetricPoint, RunStatus, Store
from steplog._layout import encode_metric_lines, parse_metric_lines
from steplog.store import History, StoreError, _latest_index


def bits(values: list[float]) -> list[bytes]:
    """Float values as raw bytes, so NaN and -0.0 compare exactly."""
    return [struct.pack("<d", v) for v in values]


def write_steplog_store(root: Path) -> dict[str, str]:
    """Two steplog runs in 'mnist' (one FINISHED, one FAILED) and one in 'other'; returns their ids."""
    ids = {}
    with steplog.start_run("mnist", run_name="baseline", tracking_uri=root) as run:
        run.log_params({"lr": 0.001, "batch_size": 64})
        run.set_tags({"model": "mlp"})
        for step in range(200):
            run.log_metrics({"loss": 1 / (step + 1), "acc/top1": step / 200}, step=step)
        run.log_metric("loss", 5.0, step=50)  # an out-of-order step: "latest" is still step 199's
    ids["baseline"] = run.run_id
    with pytest.raises(ZeroDivisionError):
        fail_a_run(root, ids)
    with steplog.start_run("other", run_name="solo", tracking_uri=root) as run:
        run.log_metric("reward", -0.0, step=0)
    ids["solo"] = run.run_id
    return ids


def fail_a_run(root: Path, ids: dict[str, str]) -> None:
    """A run whose block raises, so it ends FAILED."""
    with steplog.start_run("mnist", run_name="broken", tracking_uri=root) as run:
        run.log_metric("loss", float("nan"), step=0)
        run.log_metric("loss", math.inf, step=1)
        ids["broken"] = run.run_id
        raise ZeroDivisionError


def write_mlflow_store(root: Path) -> dict[str, str]:
    """A store written by MLflow's own client: two runs (FINISHED, KILLED) and a deleted one."""
    client = MlflowClient(tracking_uri=root.as_uri())
    exp = client.create_experiment("mlflow-exp")
    ids = {}
    run = client.create_run(exp, run_name="mlflow-run")
    client.log_batch(
        run.info.run_id,
        metrics=[Metric("loss", 1.0 / (s + 1), 1_700_000_000_000 + s, s) for s in range(50)]
        + [Metric("weird", v, 1_700_000_000_000 + i, i) for i, v in enumerate([math.nan, math.inf, -math.inf])],
        params=[Param("optimizer", "adam")],
        tags=[RunTag("team", "vision")],
    )
    client.set_terminated(run.info.run_id, status="FINISHED")
    ids["mlflow-run"] = run.info.run_id
    run = client.create_run(exp, run_name="killed")
    client.log_metric(run.info.run_id, "loss", 3.0, step=7)
    client.set_terminated(run.info.run_id, status="KILLED")
    ids["killed"] = run.info.run_id
    run = client.create_run(exp, run_name="gone")
    client.delete_run(run.info.run_id)
    ids["gone"] = run.info.run_id
    return ids


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A steplog-written store and an MLflow-written store, shared by the read-only tests here."""
    base = tmp_path_factory.mktemp("stores")
    ours, theirs = base / "steplog", base / "mlflow"
    return {"steplog": (ours, write_steplog_store(ours)), "mlflow": (theirs, write_mlflow_store(theirs))}


@pytest.mark.parametrize("kind", ["steplog", "mlflow"])
def test_runs_params_tags_and_latest_match_mlflow(stores: dict[str, Any], kind: str) -> None:
    """Every active run's status, times, params, tags and latest metrics equal MLflow's reading."""
    root, _ids = stores[kind]
    client = MlflowClient(tracking_uri=root.as_uri())
    theirs = {
        r.info.run_id: r
        for exp in client.search_experiments()
        for r in client.search_runs([exp.experiment_id])  # active runs only, as Store.runs()
    }
    ours = {r.run_id: r for r in Store(root).runs()}
    assert sorted(theirs) == sorted(ours)
    for run_id, ref in theirs.items():
        run = ours[run_id]
        assert (ref.info.status, ref.info.start_time, ref.info.end_time, ref.info.run_name) == (
            run.status.name,
            run.start_time,
            run.end_time,
            run.run_name,
        )
        assert ref.data.params == run.params
        assert ref.data.tags == run.tags
        assert sorted(ref.data.metrics) == list(run.metric_keys) == list(run.latest)
        for key, value in ref.data.metrics.items():
            assert bits([value]) == bits([run.latest[key].value]), key


@pytest.mark.parametrize("kind", ["steplog", "mlflow"])
def test_histories_match_mlflow_exactly(stores: dict[str, Any], kind: str) -> None:
    """Every metric history equals MLflow's get_metric_history point for point, in file order, bit for bit."""
    root, _ids = stores[kind]
    client = MlflowClient(tracking_uri=root.as_uri())
    store = Store(root)
    checked = 0
    for run in store.runs():
        for key in run.metric_keys:
            ref = client.get_metric_history(run.run_id, key)
            history = store.metric_history(run.run_id, key)
            assert [m.step for m in ref] == history.steps
            assert [m.timestamp for m in ref] == history.timestamps
            assert bits([m.value for m in ref]) == bits(history.values)
            checked += 1
    assert checked >= 3


def test_experiments_and_filters(stores: dict[str, Any]) -> None:
    """Experiments are listed by name; runs() filters by experiment name or id and by status."""
    root, ids = stores["steplog"]
    store = Store(root)
    names = [e.name for e in store.experiments()]
    assert ["Default", "mnist", "other"] == sorted(names)
    mnist = store.experiment("mnist")
    assert {ids["baseline"], ids["broken"]} == {r.run_id for r in store.runs("mnist")}
    assert {ids["baseline"], ids["broken"]} == {r.run_id for r in store.runs(mnist.experiment_id)}
    assert [ids["broken"]] == [r.run_id for r in store.runs("mnist", status="failed")]
    assert [ids["baseline"]] == [r.run_id for r in store.runs(status=RunStatus.FINISHED) if r.run_name == "baseline"]
    with pytest.raises(StoreError, match=r"no experiment named 'nope'.*mnist"):
        store.runs("nope")
    with pytest.raises(StoreError, match="unknown run status 'DONE'"):
        store.runs(status="DONE")


def test_deleted_runs_are_left_out_unless_asked(stores: dict[str, Any]) -> None:
    """A run MLflow marked deleted is not listed (as in search_runs) unless include_deleted is set."""
    root, ids = stores["mlflow"]
    store = Store(root)
    assert ids["gone"] not in {r.run_id for r in store.runs()}
    assert ids["gone"] in {r.run_id for r in store.runs(include_deleted=True)}
    assert "deleted" == store.get_run(ids["gone"]).lifecycle_stage


def test_latest_follows_mlflows_rule(stores: dict[str, Any]) -> None:
    """Latest is the max by (step, timestamp, value): an out-of-order step, NaN and infinities included."""
    root, ids = stores["steplog"]
    store = Store(root)
    assert 1 / 200 == store.get_run(ids["baseline"]).latest["loss"].value
    assert math.inf == store.get_run(ids["broken"]).latest["loss"].value
    assert bits([-0.0]) == bits([store.get_run(ids["solo"]).latest["reward"].value])
    root, ids = stores["mlflow"]
    assert -math.inf == Store(root).get_run(ids["mlflow-run"]).latest["weird"].value


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-3, 3),
            st.integers(0, 3),
            st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, math.nan, math.inf, -math.inf]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_latest_index_equals_mlflows_tuple_max(points: list[tuple[int, int, float]]) -> None:
    """The C-speed latest picks the very point (same index) that MLflow's max by (step, timestamp, value) picks."""
    steps, stamps, values = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
    expected = max(range(len(points)), key=lambda i: (steps[i], stamps[i], values[i]))
    assert expected == _latest_index(steps, stamps, values)


def test_history_views(stores: dict[str, Any]) -> None:
    """A history is a sequence of MetricPoint with list columns, numpy arrays and a pandas frame."""
    root, ids = stores["steplog"]
    history = Store(root).metric_history(ids["baseline"][:10], "acc/top1")
    assert 200 == len(history)
    assert MetricPoint(0, 0.0, history.timestamps[0]) == history[0]
    assert [MetricPoint(s, s / 200, t) for s, t in zip([198, 199], history.timestamps[-2:], strict=True)] == history[
        -2:
    ]
    assert list(history) == history[:]
    assert list(range(200)) == history.steps
    steps, values, stamps = history.to_numpy()
    assert (np.dtype(np.int64), np.dtype(np.float64), np.dtype(np.int64)) == (steps.dtype, values.dtype, stamps.dtype)
    assert history.values == values.tolist()
    frame = history.to_pandas()
    assert ["step", "value", "timestamp"] == list(frame.columns)
    assert history.steps == frame["step"].tolist()
    assert isinstance(frame, pd.DataFrame)
    assert "<History 'acc/top1': 200 points>" == repr(history)
    store = Store(root)
    assert history.values == store.metric_history(store.get_run(ids["baseline"]), "acc/top1").values


def test_run_ids_resolve_by_unique_prefix(tmp_path: Path) -> None:
    """A unique prefix finds its run; an ambiguous one and an unknown one are errors saying what to do."""
    root = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=root) as run:
        run.log_metric("loss", 1.0)
    store = Store(root)
    assert run.run_id == store.resolve_run_id(run.run_id[:5])
    assert run.run_id == store.get_run(run.run_id).run_id
    # shares exactly 6 characters with the run (the 7th differs), so a 7-character prefix is unique
    seventh = "1" if run.run_id[6] == "0" else "0"
    twin_id = run.run_id[:6] + seventh * 26
    twin = shutil.copytree(store.get_run(run.run_id).path, store.get_run(run.run_id).path.parent / twin_id)
    meta = (twin / "meta.yaml").read_text().replace(run.run_id, twin_id)
    (twin / "meta.yaml").write_text(meta)
    with pytest.raises(StoreError, match=rf"prefix '{run.run_id[:4]}' is ambiguous: 2 runs match.*give more"):
        store.get_run(run.run_id[:4])
    assert run.run_id == store.get_run(run.run_id[:7]).run_id
    with pytest.raises(StoreError, match="no run with id 'zzz'"):
        store.get_run("zzz")
    with pytest.raises(StoreError, match="not a run id"):
        store.get_run("../x")


def test_metric_errors_name_the_metrics(stores: dict[str, Any]) -> None:
    """An unknown key lists the run's metrics; a key that climbs out of the run is refused."""
    root, ids = stores["steplog"]
    store = Store(root)
    with pytest.raises(StoreError, match=r"has no metric 'los' \(its metrics: acc/top1, loss\)"):
        store.metric_history(ids["baseline"], "los")
    with pytest.raises(StoreError, match="is not a metric key"):
        store.metric_history(ids["baseline"], "../meta.yaml")
    assert ["acc/top1", "loss"] == store.metric_keys(ids["baseline"])


def test_missing_and_unsupported_stores(tmp_path: Path) -> None:
    """A missing directory and a non-file URI are errors, and opening a store writes nothing to it."""
    with pytest.raises(StoreError, match=r"no MLflow store at .*does not exist"):
        Store(tmp_path / "nope")
    with pytest.raises(StoreError, match="no MLflow database at"):
        Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(StoreError, match="not a local file store"):
        Store("http://localhost:5000")
    (tmp_path / "empty").mkdir()
    store = Store((tmp_path / "empty").as_uri())
    assert ([], []) == (store.experiments(), store.runs())
    assert [] == list((tmp_path / "empty").iterdir())


def test_default_uri_follows_start_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store() with no URI reads STEPLOG_TRACKING_URI, then MLFLOW_TRACKING_URI, then ./mlruns."""
    for name in ("a", "b", "c"):
        with steplog.start_run(name, tracking_uri=tmp_path / name / "mlruns") as run:
            run.log_metric("x", 1.0)
    monkeypatch.chdir(tmp_path / "c")
    assert {"c"} == {e.name for e in Store().experiments()} - {"Default"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "b" / "mlruns"))
    assert {"b"} == {e.name for e in Store().experiments()} - {"Default"}
    monkeypatch.setenv("STEPLOG_TRACKING_URI", (tmp_path / "a" / "mlruns").as_uri())
    assert {"a"} == {e.name for e in Store().experiments()} - {"Default"}


def test_live_runs_incomplete_last_line_is_ignored(tmp_path: Path) -> None:
    """A metric file whose last line is still being written reads as the complete lines before it."""
    root = tmp_path / "mlruns"
    run = steplog.start_run("live", tracking_uri=root)
    try:
        run.log_metric("loss", 0.5, step=0)
        run.flush()
        store = Store(root)
        path = store.get_run(run.run_id).path / "metrics" / "loss"
        with open(path, "ab") as f:
            f.write(b"1700000000000 0.2")  # a writer mid-append
        assert [0] == store.metric_history(run.run_id, "loss").steps
        assert RunStatus.RUNNING == store.get_run(run.run_id).status
        with open(path, "ab") as f:
            f.write(b"5 7\n")
        assert ([0, 7], [0.5, 0.25]) == (
            store.metric_history(run.run_id, "loss").steps,
            store.metric_history(run.run_id, "loss").values,
        )
    finally:
        run.close()


def test_watcher_reads_only_what_was_appended(tmp_path: Path) -> None:
    """RunWatcher.poll reports the keys whose latest changed, continuing MLflow's scan across polls."""
    root = tmp_path / "mlruns"
    run = steplog.start_run("live", tracking_uri=root)
    try:
        run.log_metrics({"loss": 1.0, "acc": 0.1}, step=0)
        run.flush()
        watcher = Store(root).watch(run.run_id[:8])
        first = watcher.poll()
        assert ({"acc": 0.1, "loss": 1.0}, {"acc": 1, "loss": 1}) == (
            {k: p.value for k, p in first.items()},
            watcher.counts,
        )
        assert {} == watcher.poll()
        run.log_metric("loss", 0.5, step=1)
        run.flush()
        assert {"loss": 0.5} == {k: p.value for k, p in watcher.poll().items()}
        # Same step and timestamp: MLflow's scan keeps 0.5 against a NaN and a smaller value,
        # and a larger value after the NaN replaces it.
        path = watcher.run().path / "metrics" / "loss"
        ts = watcher.latest["loss"].timestamp
        with open(path, "ab") as f:
            f.write(b"%d nan 1\n%d 0.25 1\n" % (ts, ts))
        assert {} == watcher.poll()
        with open(path, "ab") as f:
            f.write(b"%d 0.75 1\n" % ts)
        assert {"loss": MetricPoint(1, 0.75, ts)} == watcher.poll()
        assert 5 == watcher.counts["loss"]
        path.write_bytes(b"%d 9.0 3\n" % ts)  # replaced by a shorter file: read again from the start
        assert ({"loss": MetricPoint(3, 9.0, ts)}, 1) == (watcher.poll(), watcher.counts["loss"])
        assert RunStatus.RUNNING == watcher.run().status
    finally:
        run.close()


# --------------------------------------------------------------------------- the parser's fast path


def exact_parse(data: bytes) -> tuple[list[int], list[float], list[int], int]:
    """MLflow's per-line rule (strip, split on one space, 2/3/5 fields, int/float/int), the reference."""
    end = data.rfind(b"\n")
    steps: list[int] = []
    values: list[float] = []
    stamps: list[int] = []
    bad = 0
    for raw in data[: end + 1].split(b"\n")[:-1]:
        fields = raw.decode("utf-8", "replace").strip().split(" ")
        try:
            if len(fields) in (3, 5):
                ts, value, step = int(fields[0]), float(fields[1]), int(fields[2])
            elif len(fields) == 2:
                ts, value, step = int(fields[0]), float(fields[1]), 0
            else:
                raise ValueError(raw)
        except ValueError:
            bad += 1
            continue
        stamps.append(ts)
        values.append(value)
        steps.append(step)
    return steps, values, stamps, bad


EDGE_FILES = [
    b"1 nan 0\n2 inf 1\n3 -inf 2\n",
    b"1 -0 0\n",
    b"1 -0.0 0\n1 -0e0 0\n",
    b"1 2\n3 4 5 6\n",
    b"1 2 3\n4 5 6 7 8\n9 10\n",
    b"1 0.5 nan\n",
    b"1.5 0.5 1\n",
    b"1e3 0.5 1\n",
    b"1 0.5 1\n2 0.5",
    b"\n",
    b"1 5 2\n",
    b"1 1e400 2\n1 -1e400 2\n",
    b"1 ninf 2\n",
    b"1 infnan 2\n",
    b"1 -nan 2\n",
    b"1 1 1\n\n",
    b"007 1 1\n",
    b"1 +1 1\n1 .5 1\n1 1. 1\n",
    b"1  1 1\n",
    b" 1 1 1\n",
    b"1 1 1 \n",
    b"1\t1\t1\n",
    b"1 1 1\r\n",
    b"1 1_0 1\n",
    b"99999999999999999999999 1 1\n",
    b"1 0.1000000000000000055511151231257827021181583404541015625 18446744073709551616\n",
    b"1 2.4703282292062328e-324 1\n1 1.7976931348623159e308 1\n",
]


@pytest.mark.parametrize("data", EDGE_FILES)
def test_parser_matches_mlflows_rule_on_edge_cases(data: bytes) -> None:
    """Whichever path parse_metric_lines takes, it reads exactly what MLflow's per-line rule reads."""
    steps, values, stamps, bad = parse_metric_lines(data)
    ref_steps, ref_values, ref_stamps, ref_bad = exact_parse(data)
    assert (ref_steps, bits(ref_values), ref_stamps, ref_bad) == (steps, bits(values), stamps, bad)


_TOKENS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats().map(lambda f: f"{f:.25e}"),
    st.sampled_from(["nan", "inf", "-inf", "-0", "1.", ".5", "+1", "1e5", "", "x", "0x10", "1_000", "NaN", "007"]),
)


@settings(max_examples=250, deadline=None)
@given(st.lists(st.lists(_TOKENS, min_size=1, max_size=5).map(" ".join), max_size=12), st.booleans())
def test_parser_matches_mlflows_rule_on_random_files(lines: list[str], torn: bool) -> None:
    """Random lines of random tokens (valid or not) parse exactly as MLflow's rule, torn tail ignored."""
    data = "".join(f"{line}\n" for line in lines).encode() + (b"17 0.5" if torn else b"")
    steps, values, stamps, bad = parse_metric_lines(data)
    ref_steps, ref_values, ref_stamps, ref_bad = exact_parse(data)
    assert (ref_steps, bits(ref_values), ref_stamps, ref_bad) == (steps, bits(values), stamps, bad)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**62), st.floats(allow_nan=True), st.integers(-(2**63), 2**63 - 1)),
        max_size=40,
    )
)
def test_parser_reads_well_formed_files_bit_exactly(points: list[tuple[int, float, int]]) -> None:
    """Files as MLflow writes them (f"{ts} {value} {step}") come back bit-exactly, the fast path's case.

    (Bit-exactly as ``float()`` reads the text: "nan" carries no sign or payload.)
    """
    data = "".join(f"{ts} {value} {step}\n" for ts, value, step in points).encode()
    steps, values, stamps, bad = parse_metric_lines(data)
    expected_values = [float(str(p[1])) for p in points]
    assert ([p[2] for p in points], bits(expected_values), [p[0] for p in points], 0) == (
        steps,
        bits(values),
        stamps,
        bad,
    )


def test_a_long_history_reads_back() -> None:
    """A 250,000-point file (10 MB) parses to every point, the last ones right (benchmarks/reader.py times 1 M)."""
    ts = 1_700_000_000_000
    items: list[Any] = []
    for i in range(250_000):
        items += (ts + i // 10, i / 7, i)
    data = encode_metric_lines(items)
    steps, values, stamps, bad = parse_metric_lines(data)
    assert (250_000, 0, 249_999, 249_999 / 7, ts + 24_999) == (len(steps), bad, steps[-1], values[-1], stamps[-1])
    history = History("k", steps, values, stamps)
    assert MetricPoint(249_999, 249_999 / 7, ts + 24_999) == history.latest()
