"""Crash safety of the SQLite destination: SIGKILL at random moments, SIGTERM ending the run KILLED.

A child process logs step after step into ``sqlite:///...`` and records each step whose
``flush()`` returned in an ack file; the parent kills it with SIGKILL at a random moment. The
database must then pass ``PRAGMA integrity_check``, MLflow must read it, and each key's history
must be a gapless prefix of what was logged that holds every acknowledged step.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KEYS = ["loss", "acc/top1", "lr"]
KILLS = 6
CHILD = """
import os, sys
import steplog
db, acks = sys.argv[1], sys.argv[2]
fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
with steplog.start_run("crash", tracking_uri=f"sqlite:///{db}", flush_interval=0.01) as run:
    os.write(fd, b"start\\n")
    step = 0
    while True:
        run.log_metrics({"loss": step * 1.0, "acc/top1": step / 2, "lr": -step * 1.0}, step=step)
        if step % 50 == 49:
            run.flush()
            os.write(fd, b"%d\\n" % step)
        step += 1
"""
SIGNALS_CHILD = Path(__file__).parent / "_children" / "signals.py"


def acked_step(acks: Path) -> int:
    """The last step whose flush returned before the kill (-1 if none)."""
    lines = acks.read_text().split() if acks.exists() else []
    numbers = [int(x) for x in lines if x.isdigit()]
    return numbers[-1] if numbers else -1


def test_sigkill_at_random_moments_leaves_a_sound_database(tmp_path: Path) -> None:
    """After SIGKILL: integrity_check ok, MLflow reads the run, every key a gapless prefix with all acked steps."""
    from mlflow.tracking import MlflowClient

    rng = random.Random(1234)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    checked = 0
    for round_ in range(KILLS):
        db = tmp_path / f"crash{round_}.db"
        acks = tmp_path / f"acks{round_}"
        proc = subprocess.Popen([sys.executable, str(script), str(db), str(acks)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        # kill at a random moment: before the run exists in some rounds, mid-logging in most
        wait_for_start = round_ % 3 != 0
        while wait_for_start and not (acks.exists() and acks.read_text()) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=30)
        assert -signal.SIGKILL == proc.returncode, err
        acked = acked_step(acks)
        if not db.exists():
            assert acked < 0
            continue
        con = sqlite3.connect(db)
        assert [("ok",)] == con.execute("PRAGMA integrity_check").fetchall()
        con.close()
        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("crash")
        if experiment is None:
            assert acked < 0
            continue
        runs = client.search_runs([experiment.experiment_id])
        if not runs:
            assert acked < 0
            continue
        (run,) = runs
        assert "RUNNING" == run.info.status  # killed: nobody ended it
        lengths = []
        for key in KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            steps = sorted(m.step for m in history)
            assert list(range(len(steps))) == steps, f"{key}: not a gapless prefix"
            assert len(steps) > acked, f"{key}: acknowledged step {acked} missing"
            lengths.append(len(steps))
        assert max(lengths) - min(lengths) <= 1  # a drain may cut a step between keys, never more
        checked += acked >= 0
    assert checked >= KILLS // 2  # most rounds were killed mid-run with acknowledged data


def test_sigterm_ends_the_run_killed_with_everything_written(tmp_path: Path) -> None:
    """SIGTERM during a run: the points logged before it are written and the run ends KILLED."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "term.db"
    proc = subprocess.Popen(
        [sys.executable, str(SIGNALS_CHILD), f"sqlite:///{db}", "with", "default"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert -signal.SIGTERM == proc.returncode, err
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("signals")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert "KILLED" == run.info.status
    assert run.info.end_time is not None
    assert list(range(50)) == [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
