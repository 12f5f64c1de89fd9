"""Artifacts are stored as at the call, reach their final name whole; what can never be written is refused.

``log_artifact`` copies the file (or directory) into the run's staging folder at the call; the
writer hard-links that snapshot into ``artifacts/`` through a temp name and a rename. MLflow reads
everything back; the staging folder is invisible to it and gone once the run is closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import steplog
import steplog._artifacts
from steplog import InvalidValueError
from steplog._artifacts import STAGING

# A long flush interval keeps the writer asleep until flush(): what it stores is then decided by
# the call, not by a race with the writer (a barrier, not a sleep).
ASLEEP: dict[str, Any] = {"flush_interval": 60.0, "handle_signals": False}


def client_for(store: Path) -> Any:
    return MlflowClient(tracking_uri=store.as_uri())


def artifact_bytes(client: Any, run_id: str, path: str, tmp_path: Path) -> bytes:
    """The artifact's bytes as MLflow downloads them."""
    out = client.download_artifacts(run_id, path, dst_path=str(tmp_path / f"dl-{len(os.listdir(tmp_path))}"))
    return Path(out).read_bytes()


def test_file_is_stored_as_it_was_at_the_call(store: Path, tmp_path: Path) -> None:
    """A checkpoint re-saved (truncated in place, same inode) after log_artifact is stored as at the call."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"epoch-1" * 1000)
    with steplog.start_run("snap", tracking_uri=store, **ASLEEP) as run:
        run.log_artifact(ckpt)
        with open(ckpt, "r+b") as f:  # as torch.save does: same inode, truncated, rewritten
            f.truncate(0)
            f.write(b"epoch-2")
        run.flush()
    assert b"epoch-1" * 1000 == artifact_bytes(client_for(store), run.run_id, "model.ckpt", tmp_path)


def test_directory_is_stored_as_it_was_at_the_call(store: Path, tmp_path: Path) -> None:
    """A directory changed after log_artifact (a file rewritten, one added) is stored as at the call."""
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"A1")
    (folder / "sub" / "b.bin").write_bytes(b"B1")
    with steplog.start_run("snap", tracking_uri=store, **ASLEEP) as run:
        run.log_artifact(folder, artifact_path="checkpoints")
        (folder / "a.bin").write_bytes(b"A2")
        (folder / "late.bin").write_bytes(b"late")
    client = client_for(store)
    assert ["checkpoints/ckpt/a.bin", "checkpoints/ckpt/sub"] == [
        a.path for a in client.list_artifacts(run.run_id, "checkpoints/ckpt")
    ]
    assert b"A1" == artifact_bytes(client, run.run_id, "checkpoints/ckpt/a.bin", tmp_path)
    assert b"B1" == artifact_bytes(client, run.run_id, "checkpoints/ckpt/sub/b.bin", tmp_path)


def test_staging_is_invisible_to_mlflow_and_removed_at_close(store: Path, tmp_path: Path) -> None:
    """While a snapshot waits, MLflow lists the run and its artifacts normally; after close no staging is left."""
    src = tmp_path / "notes.txt"
    src.write_text("n")
    with steplog.start_run("snap", tracking_uri=store, **ASLEEP) as run:
        run.log_artifact(src)
        run_dir = store / run.experiment_id / run.run_id
        assert (run_dir / STAGING).is_dir()  # the snapshot is waiting there
        client = client_for(store)
        assert [] == client.list_artifacts(run.run_id)
        assert [run.run_id] == [r.info.run_id for r in client.search_runs([run.experiment_id])]
    assert not (run_dir / STAGING).exists()
    assert ["notes.txt"] == [a.path for a in client.list_artifacts(run.run_id)]


def test_log_artifact_of_the_project_folder_leaves_out_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``log_artifact(".")`` with ./mlruns inside copies the project without the store (it used to copy itself)."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "train.py").write_text("print('hi')")
    (project / "src" / "model.py").write_text("x = 1")
    monkeypatch.chdir(project)
    with steplog.start_run("proj", tracking_uri="mlruns", handle_signals=False) as run:
        run.log_artifact(".", artifact_path="code")
        run.flush(timeout=30)
    client = client_for(project / "mlruns")
    assert ["code/project/src", "code/project/train.py"] == [
        a.path for a in client.list_artifacts(run.run_id, "code/project")
    ]
    assert ["code/project/src/model.py"] == [a.path for a in client.list_artifacts(run.run_id, "code/project/src")]


def test_log_artifact_of_the_store_itself_is_refused(store: Path) -> None:
    """Logging the tracking store as an artifact of one of its runs is refused at the call, naming the reason."""
    with (
        steplog.start_run("proj", tracking_uri=store, handle_signals=False) as run,
        pytest.raises(InvalidValueError, match="is a tracking store"),
    ):
        run.log_artifact(store)
    assert [] == client_for(store).list_artifacts(run.run_id)


def test_file_then_folder_of_one_name_is_refused_at_the_second_call(store: Path, tmp_path: Path) -> None:
    """``a/b.txt`` then ``a`` (or the reverse, or via log_artifact) cannot both exist: the second call is refused."""
    src = tmp_path / "a"
    src.write_text("file named a")
    with steplog.start_run("clash", tracking_uri=store, handle_signals=False) as run:
        run.log_text("x", "a/b.txt")
        with pytest.raises(InvalidValueError, match="'a' is already logged as a folder"):
            run.log_text("y", "a")
        with pytest.raises(InvalidValueError, match="'a' is already logged as a folder"):
            run.log_artifact(src)
        run.log_dict({"k": 1}, "c.json")
        with pytest.raises(InvalidValueError, match=r"'c\.json' is already logged as a file"):
            run.log_text("z", "c.json/d.txt")
        run.log_text("x2", "a/b.txt")  # the same file again overwrites, as in MLflow
        run.log_metric("after", 1.0, step=0)  # the run goes on
    client = client_for(store)
    got = client.get_run(run.run_id)
    assert "FINISHED" == got.info.status
    assert {"after": 1.0} == got.data.metrics
    assert ["a", "c.json"] == [a.path for a in client.list_artifacts(run.run_id)]
    assert b"x2" == (store / run.experiment_id / run.run_id / "artifacts" / "a" / "b.txt").read_bytes()


def test_folder_artifact_clashing_with_a_file_is_refused(store: Path, tmp_path: Path) -> None:
    """A directory whose files would need a logged file to be a folder is refused whole, before anything is queued."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    with steplog.start_run("clash", tracking_uri=store, handle_signals=False) as run:
        run.log_text("plain", "cfg")
        with pytest.raises(InvalidValueError, match="'cfg' is already logged as a file"):
            run.log_artifact(folder)
        run_dir = store / run.experiment_id / run.run_id
        assert not (run_dir / STAGING).exists()  # the refused snapshot is gone at once
    assert ["cfg"] == [a.path for a in client_for(store).list_artifacts(run.run_id)]
    assert b"plain" == (run_dir / "artifacts" / "cfg").read_bytes()


def test_longest_names_are_written_and_longer_ones_refused(store: Path, tmp_path: Path) -> None:
    """A 255-byte artifact name is written (the temp name does not grow with it); a 256-byte part is refused."""
    longest = "n" * 251 + ".txt"
    src = tmp_path / ("f" * 255)
    src.write_text("file")
    with steplog.start_run("names", tracking_uri=store, handle_signals=False) as run:
        run.log_text("text", longest)
        run.log_dict({"a": 1}, f"d/{'j' * 250}.json")
        run.log_artifact(src, artifact_path="e" * 255)
        with pytest.raises(InvalidValueError, match="at most 255 bytes"):
            run.log_text("x", "é" * 128)  # 128 characters, 256 bytes of UTF-8
        with pytest.raises(InvalidValueError, match="at most 255 bytes"):
            run.log_artifact(src, artifact_path="dir/" + "z" * 256)
        run.flush(timeout=30)
    client = client_for(store)
    assert "FINISHED" == client.get_run(run.run_id).info.status
    assert sorted([longest, "d", "e" * 255]) == sorted(a.path for a in client.list_artifacts(run.run_id))
    assert b"text" == artifact_bytes(client, run.run_id, longest, tmp_path)
    assert b"file" == artifact_bytes(client, run.run_id, f"{'e' * 255}/{'f' * 255}", tmp_path)


CHILD = textwrap.dedent(
    """
    import os, shutil, sys, time
    from pathlib import Path
    import steplog

    store, source, ready = sys.argv[1:4]
    real_copyfile = shutil.copyfile

    def pausing_copyfile(src, dst, *, follow_symlinks=True):
        if "{staging}" in str(dst):
            return real_copyfile(src, dst)  # the snapshot at the call
        # the writer's copy: write half, tell the parent, then wait to be killed
        data = Path(src).read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        Path(ready).write_text(str(dst))
        time.sleep(600)

    shutil.copyfile = pausing_copyfile
    os.link = lambda *a, **k: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link"))
    run = steplog.start_run("crash", tracking_uri=store, handle_signals=False)
    print(run.experiment_id, run.run_id, flush=True)
    run.log_artifact(source)
    run.flush()
    """
).replace("{staging}", STAGING)


@pytest.mark.slow
def test_kill_mid_copy_leaves_no_truncated_artifact(store: Path, tmp_path: Path) -> None:
    """SIGKILL while the writer copies an artifact (paused half-way at a seam) leaves no file under its final name."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(1 << 20))
    ready = tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(store), str(source), str(ready)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        experiment_id, run_id = child.stdout.readline().split()
        deadline = time.monotonic() + 60
        while not ready.exists():  # the child writes it from inside the paused copy
            assert child.poll() is None, "the child exited before the copy"
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    half_written = Path(ready.read_text())
    assert half_written.exists()  # the kill did land mid-copy
    assert not half_written.is_relative_to(store / experiment_id / run_id / "artifacts")
    assert [] == client_for(store).list_artifacts(run_id)


@pytest.mark.anyio
async def test_artifact_logged_before_an_async_run_starts_is_a_snapshot_too(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before ``async with`` there is no run folder: the snapshot goes to a temp dir, is stored, then removed."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"first")
    run = steplog.start_run("early", tracking_uri=store, handle_signals=False)
    run.log_artifact(src)
    src.write_bytes(b"second")
    assert 1 == len(list(temp.iterdir()))  # the snapshot
    async with run:
        pass
    assert b"first" == (store / run.experiment_id / run.run_id / "artifacts" / "weights.bin").read_bytes()
    assert [] == list(temp.iterdir())


def test_artifact_path_longer_than_the_os_allows_is_refused(store: Path) -> None:
    """An artifact path whose names fit but whose whole path below the run folder is too long is refused."""
    deep = "/".join(["d" * 200] * 25)  # 5,024 bytes: more than PATH_MAX (4,096)
    with steplog.start_run("deep", tracking_uri=store, handle_signals=False) as run:
        with pytest.raises(InvalidValueError, match="longer than"):
            run.log_text("x", deep)
        run.log_text("ok", "/".join(["d" * 200] * 10))
    got = MlflowClient(tracking_uri=store.as_uri())
    assert ["d" * 200] == [a.path for a in got.list_artifacts(run.run_id)]
    assert "FINISHED" == got.get_run(run.run_id).info.status


def test_file_mode_is_kept_as_mlflow_keeps_it(store: Path, tmp_path: Path) -> None:
    """An executable script logged as an artifact stays executable (MLflow copies with shutil.copy2)."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    with steplog.start_run("mode", tracking_uri=store, handle_signals=False) as run:
        run.log_artifact(script)
    assert 0o755 == (store / run.experiment_id / run.run_id / "artifacts" / "run.sh").stat().st_mode & 0o777


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_dropping_a_snapshot_leaves_the_parents_copy(tmp_path: Path) -> None:
    """A snapshot record dropped in a forked child (a DataLoader worker) does not delete the parent's pending copy."""
    import gc

    src = tmp_path / "w.bin"
    src.write_bytes(b"w")
    record = steplog._artifacts.snapshot(src, "w.bin", staging=tmp_path / STAGING)
    staged = Path(str(record.source))
    pid = os.fork()
    if pid == 0:  # the child: drop the record, then leave without running the parent's exit handlers
        del record
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    assert b"w" == staged.read_bytes()
    del record
    gc.collect()
    assert not (tmp_path / STAGING).exists()  # the parent's own drop removes the copy and the empty folder
