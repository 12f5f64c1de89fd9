"""Dead runs: a writer killed without closing is told apart from a live one, and repaired to KILLED.

A real subprocess run is SIGKILLed; readers (``Store.alive``, ``steplog runs``/``show``,
``steplog tail --follow``, ``steplog fsck``) must say so within a bounded time, and
``steplog fsck --repair`` ends it KILLED at its last write. MLflow's reader reads the run
throughout (it ignores the heartbeat file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import steplog
from steplog._cli import main as cli_main
from steplog._heartbeat import FILE, liveness, read_heartbeat

CHILD = Path(__file__).parent / "_children" / "long_job.py"
DEAD_WITHIN = 10.0  # seconds: the same host notices at once (the pid is gone); the bound leaves room for load


def child_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "STEPLOG_RUN_ID", "MLFLOW_RUN_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_a_killed_writer_is_reported_dead_and_repaired_to_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Live: alive is True; after SIGKILL: dead within a bound, shown by the CLI, and fsck --repair ends it KILLED."""
    import mlflow

    store = tmp_path / "mlruns"
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(store), "jobs", "hang", "0", "9", "-"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.communicate()[1]
        run_id = line.split()[1]
        reader = steplog.Store(store)
        assert reader.alive(run_id) is True
        run_dir = reader.get_run(run_id).path
        beat = read_heartbeat(run_dir)
        assert beat is not None
        assert beat["pid"] == proc.pid
        assert mlflow.MlflowClient(str(store)).get_run(run_id).info.status == "RUNNING"  # the heartbeat is ignored
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    deadline = time.monotonic() + DEAD_WITHIN
    while reader.alive(run_id) is not False:
        assert time.monotonic() < deadline, "the dead writer was not noticed in time"
        time.sleep(0.05)
    last_beat = read_heartbeat(run_dir)
    assert last_beat is not None
    capsys.readouterr()
    assert cli_main(["runs", "--uri", str(store)]) == 0
    assert "RUNNING (dead)" in capsys.readouterr().out
    assert cli_main(["tail", run_id, "--uri", str(store), "--follow", "--plain", "--interval", "0.05"]) == 0
    assert "ended: RUNNING (dead)" in capsys.readouterr().out  # --follow stops instead of waiting forever
    assert cli_main(["fsck", str(store)]) == 1
    assert "writer is dead" in capsys.readouterr().out
    assert cli_main(["fsck", "--repair", str(store)]) == 0
    run = mlflow.MlflowClient(str(store)).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.info.end_time >= int(last_beat["time_ms"])  # type: ignore[call-overload]
    assert run.info.end_time <= int(time.time() * 1000)
    assert reader.alive(run_id) is None
    assert [m.step for m in mlflow.MlflowClient(str(store)).get_metric_history(run_id, "x")] == list(range(10))


def test_a_closed_run_leaves_no_heartbeat(tmp_path: Path) -> None:
    """A run that ends normally removes its heartbeat: it is neither alive nor dead, just FINISHED."""
    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store) as run:
        run_dir = steplog.Store(store).get_run(run.run_id).path
        assert (run_dir / FILE).is_file()
        assert steplog.Store(store).alive(run.run_id) is True
    assert not (run_dir / FILE).exists()
    assert liveness(run_dir) is None


def test_a_stale_heartbeat_from_another_host_means_dead(tmp_path: Path) -> None:
    """A heartbeat from another machine is judged by its age alone."""
    import json

    from steplog._layout import META, dump_meta, parse_meta

    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store) as run:
        pass
    run_dir = steplog.Store(store).get_run(run.run_id).path
    meta = parse_meta((run_dir / META).read_text())
    (run_dir / META).write_text(dump_meta({**meta, "status": 1, "end_time": None}))  # as a writer left it
    now = int(time.time() * 1000)
    (run_dir / FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time_ms": now}))
    assert liveness(run_dir, now_ms=now + 5_000) is True
    assert liveness(run_dir, now_ms=now + 60_000) is False
