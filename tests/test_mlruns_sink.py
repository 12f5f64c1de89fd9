"""The file sink (``steplog.sinks.mlruns``): ids and names from outside are checked before they touch a path.

A run id handed to the sink (a tracking server's answer when a server created the run) becomes a
folder name, so a malformed one is refused at start and nothing is written outside the store. Names
that UTF-8 cannot encode are refused before anything is created. Keys as long as MLflow allows are
written. Experiments that MLflow created with Unicode digits or spaces in their names are found, not
twinned. Errors creating the store name the path and keep the OS error's errno.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import steplog
from steplog import InvalidValueError, StepLogError, WriteError
from steplog._records import RunStatus
from steplog.sinks.mlruns import MlrunsSink
from steplog.typing import RunRequest


def request(**changes: Any) -> RunRequest:
    fields: dict[str, Any] = {
        "experiment_name": "exp",
        "run_name": "run",
        "tags": {},
        "start_time": 1_700_000_000_000,
        "user_id": "tester",
    }
    fields.update(changes)
    return RunRequest(**fields)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


HOSTILE_RUN_IDS = [
    "../../escaped",
    "/tmp/absolute",
    "..",
    "a" * 31,
    "A" * 32,  # MLflow's ids are lowercase
    "0123456789abcdef0123456789abcdeg",
    "0123456789abcdef0123456789abcde\n",
    "0123456789abcdef0123456789abcdef/x",
    "",
]


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS, ids=repr)
def test_malformed_run_id_is_refused_at_start_and_nothing_is_written_outside(tmp_path: Path, run_id: str) -> None:
    """A run id not of 32 lowercase hex digits is a StepLogError at open, naming its source; nothing escapes."""
    store = tmp_path / "deep" / "mlruns"
    sink = MlrunsSink(store)
    with pytest.raises(StepLogError, match="MLflow run ids are 32 lowercase hex digits") as caught:
        sink.open_sync(request(run_id=run_id))
    assert "runs/create answer" in str(caught.value)
    assert set() == tree(tmp_path)  # not even the store was created


@pytest.mark.parametrize("experiment_id", ["../x", "/abs", "1/2", "\u0661\u0662\u0663", "-1", "", "1" * 20], ids=repr)
def test_malformed_experiment_id_is_refused_at_start(tmp_path: Path, experiment_id: str) -> None:
    """An experiment id that is not ASCII digits is refused at open; nothing is written."""
    with pytest.raises(StepLogError, match="experiment ids are 1 to 19 ASCII digits"):
        MlrunsSink(tmp_path / "mlruns").open_sync(request(experiment_id=experiment_id))
    assert set() == tree(tmp_path)


def test_a_servers_run_id_is_joined_under_that_id(store: Path) -> None:
    """A well-formed run id (as a server's answer) is used as the run's folder, and MLflow reads the run."""
    run_id = "0123456789abcdef0123456789abcdef"
    sink = MlrunsSink(store)
    info = sink.open_sync(request(run_id=run_id))
    sink.close_sync(RunStatus.FINISHED, 1_700_000_000_500)
    assert run_id == info.run_id
    got = MlflowClient(tracking_uri=store.as_uri()).get_run(run_id)
    assert ("run", "FINISHED") == (got.info.run_name, got.info.status)


def test_run_name_that_utf8_cannot_encode_is_refused_before_anything_is_created(store: Path) -> None:
    """A lone surrogate in the run name is InvalidValueError at start, and no half-made run is left."""
    with pytest.raises(InvalidValueError, match=r"run_name .* valid Unicode"):
        steplog.start_run("exp", run_name="bad\udc80name", tracking_uri=store, handle_signals=False)
    assert not store.exists() or [] == [p for p in store.rglob("meta.yaml") if p.parent.parent != store]


def test_experiment_name_that_utf8_cannot_encode_is_refused(store: Path) -> None:
    """A lone surrogate in the experiment name is InvalidValueError at start; MLflow can still list the store."""
    steplog.start_run("good", tracking_uri=store, handle_signals=False).close()
    with pytest.raises(InvalidValueError, match=r"experiment name .* valid Unicode"):
        steplog.start_run("bad\ud800", tracking_uri=store, handle_signals=False)
    with pytest.raises(InvalidValueError, match="valid Unicode"):
        MlrunsSink(store).open_sync(request(experiment_name="bad\udc80"))
    names = {e.name for e in MlflowClient(tracking_uri=store.as_uri()).search_experiments()}
    assert {"Default", "good"} == names


@pytest.mark.parametrize("name", ["\u0661\u0662\u0663", "実験\u3000", "012", "yes", "1.5"], ids=repr)
def test_experiments_mlflow_created_are_found_not_twinned(store: Path, name: str) -> None:
    """An experiment MLflow created (a name of Unicode digits, a trailing ideographic space, ...) is reused by name."""
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment_id = client.create_experiment(name)
    with steplog.start_run(name, tracking_uri=store, handle_signals=False) as run:
        run.log_metric("loss", 1.0, step=0)
    assert experiment_id == run.experiment_id
    assert [experiment_id] == [e.experiment_id for e in client.search_experiments() if e.name == name]
    assert {"loss": 1.0} == client.get_run(run.run_id).data.metrics


def test_keys_as_long_as_mlflow_allows_are_written(store: Path) -> None:
    """Param and tag keys of 230 to 250 characters are written (the temp name used to pass 255 bytes)."""
    params = {"p" * n: n for n in (230, 245, 250)}
    tags = {"t" * n: str(n) for n in (230, 250)}
    with steplog.start_run("long", tracking_uri=store, handle_signals=False) as run:
        run.log_params(params)
        run.set_tags(tags)
        run.log_metric("m" * 250, 1.0, step=0)
        run.flush(timeout=30)
    got = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    assert "FINISHED" == got.info.status
    assert {k: str(v) for k, v in params.items()} == got.data.params
    assert tags.items() <= got.data.tags.items()
    assert {"m" * 250: 1.0} == got.data.metrics


def test_key_with_a_part_over_255_bytes_is_refused_at_the_call(store: Path) -> None:
    """A metric, param or tag key with a part over 255 bytes of UTF-8 is refused at the call, naming the rule."""
    long_part = "é" * 128  # 128 characters (MLflow allows 250), 256 bytes: no file system names a file so
    with steplog.start_run("bytes", tracking_uri=store, handle_signals=False) as run:
        call: Callable[[], object]
        for call in (
            lambda: run.log_metric(f"grp/{long_part}", 1.0, step=0),
            lambda: run.log_param(long_part, 1),
            lambda: run.set_tag(long_part, "x"),
        ):
            with pytest.raises(steplog.InvalidKeyError, match="at most 255 bytes in UTF-8"):
                call()
        run.log_metric("é" * 127, 2.0, step=0)  # 254 bytes: fine
    got = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    assert ("FINISHED", {"é" * 127: 2.0}) == (got.info.status, got.data.metrics)


def test_store_under_a_regular_file_names_the_path_and_errno(tmp_path: Path) -> None:
    """A store path that cannot be a folder (under a regular file) fails at start with the path and ENOTDIR."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError) as caught:
        MlrunsSink(blocker / "mlruns").open_sync(request())
    assert errno.ENOTDIR == caught.value.errno
    assert str(blocker / "mlruns") in str(caught.value)
    assert isinstance(caught.value.__cause__, NotADirectoryError)


def test_permission_denied_names_the_path_and_keeps_the_cause(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No write permission: a WriteError naming the path, with EACCES and the PermissionError as its cause."""

    def denied(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # the seam: running as root, no folder is really read-only
    with pytest.raises(WriteError) as caught:
        MlrunsSink(store).open_sync(request())
    assert errno.EACCES == caught.value.errno
    assert str(store) in str(caught.value)
    assert "Permission denied" in str(caught.value)
    assert isinstance(caught.value.__cause__, PermissionError)
