"""``steplog fsck [--repair] [STORE]``: finds what breaks MLflow's reader, repairs what is safe, says what changed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog._cli import main as cli_main


def mlflow_store(store: Path) -> tuple[Any, str, str]:
    """A store written by MLflow itself: (client, experiment id, run id) with two metrics and a param."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment_id = client.create_experiment("by-mlflow")
    run = client.create_run(experiment_id)
    for step in range(5):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step, timestamp=1_700_000_000_000 + step)
        client.log_metric(run.info.run_id, "acc", step / 5, step=step, timestamp=1_700_000_000_000 + step)
    client.log_param(run.info.run_id, "lr", "0.01")
    client.set_terminated(run.info.run_id)
    return client, experiment_id, run.info.run_id


def fsck(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Run the command; return (exit status, output lines)."""
    status = cli_main(["fsck", *args])
    return status, capsys.readouterr().out.splitlines()


def test_clean_stores_have_no_problems(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store written by MLflow and a run written by steplog pass with exit status 0."""
    mlflow_store(store)
    with steplog.start_run("by-steplog", tracking_uri=store, handle_signals=False) as run:
        for step in range(100):
            run.log_metrics({"loss": 1 / (step + 1), "grp/acc": step / 100}, step=step)
        run.log_param("lr", 0.1)
    status, out = fsck(capsys, str(store))
    assert (0, [f"{store}: no problems found"]) == (status, out)


def test_finds_and_repairs_a_damaged_mlflow_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Torn tail, bad and duplicate lines, an empty file, bad run meta and stray temp files are found, then repaired."""
    client, experiment_id, run_id = mlflow_store(store)
    run_dir = store / experiment_id / run_id
    loss, acc = run_dir / "metrics" / "loss", run_dir / "metrics" / "acc"
    lines = loss.read_bytes().splitlines(keepends=True)
    loss.write_bytes(
        b"".join(lines[:3]) + lines[1] + b"garbage line here\n" + b"".join(lines[3:]) + b"1700000000099 0.2"
    )
    acc.write_bytes(acc.read_bytes() + b"17000000")  # a torn tail of one field: MLflow fails the whole search
    (run_dir / "metrics" / "empty").write_bytes(b"")
    meta = (run_dir / "meta.yaml").read_text()
    (run_dir / "meta.yaml").write_text(meta.replace("status: 3", "status: FINISHED"))
    old_tmp = run_dir / ".steplog-tmp-0123456789ab"
    old_tmp.write_bytes(b"1 2.0 3\n")
    an_hour_ago = time.time() - 3600
    os.utime(old_tmp, (an_hour_ago, an_hour_ago))
    young_tmp = run_dir / "params" / ".steplog-tmp-ba9876543210-lr"
    young_tmp.write_bytes(b"0.01")

    status, out = fsck(capsys, str(store))
    assert 1 == status
    text = "\n".join(out)
    assert f"problem  {loss}: torn last line b'1700000000099 0.2'" in text
    assert f"problem  {loss}: 1 unreadable lines (line 5)" in text
    assert "1 duplicate points: mlflow migrate-filestore fails on them" in text
    assert f"problem  {acc}: torn last line b'17000000'" in text
    assert f"problem  {run_dir / 'metrics' / 'empty'}: empty metric file" in text
    assert "status 'FINISHED' -> 3" in text
    assert f"problem  {old_tmp}: stray steplog temp file" in text
    assert f"{young_tmp}: stray steplog temp file left by an interrupted write (" in text
    assert out[-1].startswith(f"{store}: 7 problems, 0 repaired, 7 remaining")

    status, out = fsck(capsys, "--repair", str(store))
    text = "\n".join(out)
    assert 1 == status  # the young temp file is left alone: it may belong to a live run
    assert "cut 17 bytes back to the last whole line" in text
    assert "rewrote the file with 5 lines (1 unreadable and 1 duplicates dropped)" in text
    assert "deleted the empty file" in text
    assert "rewrote meta.yaml: status 'FINISHED' -> 3" in text
    assert f"repaired {old_tmp}" in text
    assert out[-1] == f"{store}: 7 problems, 6 repaired, 1 remaining"
    assert not old_tmp.exists()
    assert young_tmp.exists()

    young_tmp.unlink()
    assert (0, [f"{store}: no problems found"]) == fsck(capsys, str(store))
    # MLflow reads the whole experiment again, with every good point exactly once
    (found,) = client.search_runs([experiment_id])
    assert "FINISHED" == found.info.status
    assert [1.0 / (s + 1) for s in range(5)] == [m.value for m in client.get_metric_history(run_id, "loss")]
    assert list(range(5)) == [m.step for m in client.get_metric_history(run_id, "acc")]


def test_broken_meta_files_are_reported_and_fixed_only_where_certain(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A moved run's ids and missing folders are repaired; an experiment meta lacking its name is only reported."""
    client, experiment_id, run_id = mlflow_store(store)
    run_dir = store / experiment_id / run_id
    text = (run_dir / "meta.yaml").read_text()
    (run_dir / "meta.yaml").write_text(text.replace(f"experiment_id: '{experiment_id}'", "experiment_id: '42'"))
    (run_dir / "artifacts").rmdir()
    other = store / "123456789012345678"
    other.mkdir()
    (other / "meta.yaml").write_text("experiment_id: '123456789012345678'\nlifecycle_stage: active\n")
    status, out = fsck(capsys, "--repair", str(store))
    text = "\n".join(out)
    assert 1 == status
    assert "experiment_id '42' -> " in text
    assert f"repaired {run_dir / 'artifacts'}: artifacts/ is missing" in text
    assert f"problem  {other / 'meta.yaml'}: experiment meta.yaml lacks name, artifact_location" in text
    assert run_id == client.get_run(run_id).info.run_id


def test_missing_store_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fsck on a path that is not a store prints one line saying so and exits with status 2."""
    status = cli_main(["fsck", str(tmp_path / "nowhere")])
    captured = capsys.readouterr()
    assert 2 == status
    assert (
        f"steplog fsck: error: no store at {tmp_path / 'nowhere'}: give the path of an mlruns directory\n"
        == captured.err
    )


def backdate(*paths: Path) -> None:
    """Make files look an hour old (older than fsck's grace for a live run's temp files)."""
    an_hour_ago = time.time() - 3600
    for path in paths:
        os.utime(path, (an_hour_ago, an_hour_ago), follow_symlinks=False)


def test_leftovers_of_an_interrupted_artifact_copy_are_found_and_removed(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A partial temp copy under artifacts/ and a .steplog-staging folder are findings; --repair removes only them."""
    _client, experiment_id, run_id = mlflow_store(store)
    run_dir = store / experiment_id / run_id
    (run_dir / "artifacts" / "ckpt").mkdir()
    kept = run_dir / "artifacts" / "ckpt" / "model.pt"
    kept.write_bytes(b"whole model")
    partial = run_dir / "artifacts" / "ckpt" / ".steplog-tmp-1a2b3c-model.pt"
    partial.write_bytes(b"half a mod")
    staging = run_dir / ".steplog-staging"
    (staging / "42").mkdir(parents=True)
    (staging / "42" / "weights.bin").write_bytes(b"\0" * 100)
    backdate(partial, staging / "42" / "weights.bin", staging / "42", staging)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the store's")
    linked = run_dir / "artifacts" / ".steplog-staging"
    linked.symlink_to(outside, target_is_directory=True)
    backdate(linked)

    status, out = fsck(capsys, str(store))
    assert 1 == status
    text = "\n".join(out)
    assert f"problem  {partial}: leftover temp file of an interrupted artifact copy (partial data); --repair" in text
    assert f"problem  {staging}: leftover staging folder of an interrupted artifact copy" in text
    assert f"problem  {linked}: leftover temp file of an interrupted artifact copy" in text
    assert out[-1].startswith(f"{store}: 3 problems, 0 repaired, 3 remaining")

    status, out = fsck(capsys, "--repair", str(store))
    assert (0, f"{store}: 3 problems, 3 repaired, 0 remaining") == (status, out[-1])
    assert not partial.exists()
    assert not staging.exists()
    assert not linked.is_symlink()
    assert "not the store's" == (outside / "keep.txt").read_text()  # the link went, never what it points to
    assert b"whole model" == kept.read_bytes()
    assert (0, [f"{store}: no problems found"]) == fsck(capsys, str(store))


def test_a_young_staging_folder_is_left_alone(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A staging folder written in the last minute may belong to a live run: reported, not removed."""
    _client, experiment_id, run_id = mlflow_store(store)
    staging = store / experiment_id / run_id / ".steplog-staging"
    staging.mkdir()
    (staging / "part").write_bytes(b"x")
    status, out = fsck(capsys, "--repair", str(store))
    assert 1 == status
    assert "s old: may belong to a live run, left alone)" in out[0]
    assert staging.is_dir()


@pytest.mark.parametrize("status", ["DONE", "7", "3.0"])
def test_an_unrepairable_status_says_what_to_do(store: Path, status: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A run status fsck cannot map is reported with the file to edit and the statuses MLflow accepts."""
    _client, experiment_id, run_id = mlflow_store(store)
    meta = store / experiment_id / run_id / "meta.yaml"
    meta.write_text(meta.read_text().replace("status: 3", f"status: {status}"))
    code, out = fsck(capsys, "--repair", str(store))
    assert 1 == code
    (line,) = [line for line in out if line.startswith("problem")]
    assert f"problem  {meta}: run status " in line
    assert f"edit {meta} and set `status:` to 1 (RUNNING), 2 (SCHEDULED), 3 (FINISHED), 4 (FAILED), 5 (KILLED)" in line
    assert "then run fsck again" in line


def test_an_empty_run_folder_left_by_a_killed_start_is_found_and_removed(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A start killed between the run folder's mkdir and its meta.yaml leaves empty folders: named, and removed.

    A run folder without meta.yaml that holds data is still the serious finding, never removed.
    """
    _client, experiment_id, _run_id = mlflow_store(store)
    empty = store / experiment_id / "0123456789abcdef0123456789abcdef"
    for name in ("metrics", "params", "tags", "artifacts"):
        (empty / name).mkdir(parents=True)
    broken = store / experiment_id / "fedcba9876543210fedcba9876543210"
    (broken / "metrics").mkdir(parents=True)
    (broken / "metrics" / "loss").write_text("1 0.5 0\n")

    status, out = fsck(capsys, str(store))
    text = "\n".join(out)
    assert 1 == status
    assert f"problem  {empty}: empty run folder without meta.yaml, left by a run start that was killed" in text
    assert f"problem  {broken / 'meta.yaml'}: run meta.yaml is missing" in text

    status, out = fsck(capsys, "--repair", str(store))
    assert not empty.exists()
    assert (broken / "metrics" / "loss").read_text() == "1 0.5 0\n"
    assert out[-1].startswith(f"{store}: 2 problems, 1 repaired, 1 remaining")
