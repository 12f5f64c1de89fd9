"""SIGKILL at random moments: every metric file is a clean prefix of what was logged, acknowledged data is there.

A fork server (``tests/_children/zygote.py``) imports steplog once and forks a fresh child per
round, so many kills fit in a few seconds. Each child starts a run and logs step after step
(values computed from key, step and position, so every line can be checked), calls ``flush()``
every few steps and appends the step to an ack file once the flush returned. The parent kills
it with SIGKILL at a random moment (during start-up, mid-write, mid-flush, ...) and checks every
metric file: whole lines, no gap, no reordering, no duplicate, and every acknowledged step there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steplog import Store
from steplog._cli.fsck import check_store as fsck_store
from steplog._layout import encode_metric_lines
from steplog.sinks.mlruns import _align_lines as align_lines

ZYGOTE = Path(__file__).parent / "_children" / "zygote.py"
KILLS = 24

pytestmark = pytest.mark.slow


def expected_value(key_index: int, step: int, i: int) -> float:
    """The value the child logs (mirrors ``zygote.value``)."""
    return step * 1000.0 + key_index + i / 64


@pytest.fixture
def zygote() -> Iterator[subprocess.Popen[str]]:
    """The fork server, stopped (and its children reaped) at the end of the test."""
    proc = subprocess.Popen(
        [sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        assert proc.stdout is not None
        proc.stdout.close()


def key_names(keys: int) -> list[str]:
    """The child's metric keys (mirrors ``zygote.child``)."""
    return [f"k{i}" if i % 2 else f"group/k{i}" for i in range(keys)]


def check_store(store: Path, keys: int, per_step: int, acked: int) -> int:
    """Check every metric file of the store's run; return the number of points found."""
    run_dirs = [p.parent for p in store.glob("*/*/meta.yaml") if p.parent.parent.name != ".trash"]
    run_dirs = [d for d in run_dirs if (d / "metrics").is_dir()]
    if not run_dirs:
        assert acked < 0, "a flush was acknowledged but the run directory is missing"
        return 0
    (run_dir,) = run_dirs
    points = 0
    for index, name in enumerate(key_names(keys)):
        path = run_dir / "metrics" / name
        if not path.exists():
            assert acked < 0, f"{name}: acknowledged steps up to {acked} but the file is missing"
            continue
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{name}: torn last line {data[-60:]!r}"
        lines = data.decode("ascii").split("\n")[:-1]
        assert lines, f"{name}: empty metric file"
        for n, padded in enumerate(lines):
            line = padded.rstrip(" ")  # lines may be padded to a page boundary; MLflow strips them
            fields = line.split(" ")
            assert 3 == len(fields), f"{name} line {n}: {line!r}"
            step, i = divmod(n, per_step)
            assert str(step) == fields[2], f"{name} line {n}: gap, reordering or duplicate: {line!r}"
            assert expected_value(index, step, i) == float(fields[1]), f"{name} line {n}: {line!r}"
        complete_steps = len(lines) // per_step
        # a flush that returned covers every point of the acknowledged steps
        assert complete_steps >= acked + 1, f"{name}: {complete_steps} steps on disk, {acked + 1} acknowledged"
        points += len(lines)
    return points


def last_ack(ackfile: Path) -> int:
    """The last step the child acknowledged (-1 when none)."""
    if not ackfile.exists():
        return -1
    steps = [int(x) for x in ackfile.read_text().split() if x.isdigit()]
    return steps[-1] if steps else -1


def wait_for_ack(ackfile: Path, step: int = 0) -> None:
    """Wait (bounded) until the child acknowledged a flush of ``step`` or later."""
    deadline = time.monotonic() + 30
    while last_ack(ackfile) < step and time.monotonic() < deadline:
        time.sleep(0.005)


def test_sigkill_leaves_clean_prefixes_with_every_acknowledged_point(
    tmp_path: Path, zygote: subprocess.Popen[str]
) -> None:
    """After SIGKILL at random moments, each metric file is a clean, gap-free prefix holding every flushed point."""
    rng = random.Random(int(os.environ.get("STEPLOG_CRASH_SEED", "0")) or None)
    assert zygote.stdin is not None
    assert zygote.stdout is not None
    total_points = 0
    acked_rounds = 0
    # (keys, points per key per step, flush every n steps, flush_interval): small and large writes
    shapes = [(4, 1, 1, 0.001), (2, 400, 5, 0.01), (20, 5, 50, 0.05), (1, 2000, 3, 0.002)]
    for round_ in range(KILLS):
        keys, per_step, flush_every, interval = shapes[round_ % len(shapes)]
        store, ackfile = tmp_path / f"s{round_}", tmp_path / f"ack{round_}"
        zygote.stdin.write(f"{store} {ackfile} {keys} {per_step} {flush_every} {interval}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline().split()[1])
        # kill at a random moment: every fourth round during start-up, the others while logging and
        # flushing (after the first acknowledged flush: the child's progress, not the writer, is awaited)
        if round_ % 4:
            wait_for_ack(ackfile)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        _, reaped, status = zygote.stdout.readline().split()
        assert (str(pid), -signal.SIGKILL) == (reaped, -os.WTERMSIG(int(status)))
        acked = last_ack(ackfile)
        acked_rounds += acked >= 0
        total_points += check_store(store, keys, per_step, acked)
        # fsck agrees: at most a temp file cut before its rename, and only in the run folder itself (never in
        # metrics/, params/ or tags/, where MLflow would read it as an entry); and the killed run's writer is dead
        problems = [
            f.problem
            for f in fsck_store(store)
            if not (f.problem.startswith("stray steplog temp file") and (f.path.parent / "meta.yaml").exists())
            and "its writer is dead" not in f.problem
            and not f.problem.startswith("empty run folder without meta.yaml")  # killed between mkdir and meta
        ]
        assert [] == problems
    # the kills hit running runs, not only start-ups
    assert acked_rounds >= KILLS * 3 // 4
    assert total_points > 0


def test_killed_run_reads_back_in_mlflow_and_store(tmp_path: Path, zygote: subprocess.Popen[str]) -> None:
    """A run killed mid-logging stays readable by MLflow and steplog.Store, status RUNNING, acknowledged data there."""
    from mlflow.tracking import MlflowClient

    assert zygote.stdin is not None
    assert zygote.stdout is not None
    store, ackfile = tmp_path / "mlruns", tmp_path / "ack"
    zygote.stdin.write(f"{store} {ackfile} 3 10 2 0.005\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline().split()[1])
    wait_for_ack(ackfile, 20)
    os.kill(pid, signal.SIGKILL)
    zygote.stdout.readline()
    acked = last_ack(ackfile)
    assert acked >= 20
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("crash")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert "RUNNING" == run.info.status
    history = client.get_metric_history(run.info.run_id, "k1")
    assert [s for s in range(len(history) // 10) for _ in range(10)] == [m.step for m in history][
        : len(history) // 10 * 10
    ]
    assert len(history) >= (acked + 1) * 10
    ours = Store(store).metric_history(run.info.run_id, "group/k0")
    assert len(ours) >= (acked + 1) * 10


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=2**63 - 1),
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(min_value=-(2**63), max_value=2**63 - 1),
            ),
            min_size=1,
            max_size=300,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_appends_end_a_line_at_every_page_boundary(batches: list[list[tuple[int, float, int]]]) -> None:
    """Appended batches put a line end at every 4 KiB file offset, so a kernel cut there leaves whole lines.

    SIGKILL can stop a write() at any page (folio) boundary it crosses; the sink pads lines with
    trailing spaces (which MLflow strips) so that every such boundary falls between two lines.
    """
    written = b""
    expected: list[bytes] = []
    for batch in batches:
        lines = encode_metric_lines([x for point in batch for x in point])
        expected += lines.splitlines()
        written += align_lines(lines, len(written))
    assert expected == [line.rstrip(b" ") for line in written.splitlines()]
    for boundary in range(4096, len(written), 4096):
        assert b"\n" == written[boundary - 1 : boundary]
