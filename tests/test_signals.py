"""SIGTERM, SIGINT, KeyboardInterrupt and exceptions: pending data written, the right status, the same exit.

Each scenario runs ``tests/_children/signals.py`` twice, with and without steplog, and sends the
same signal once the child says ``ready``: the exit status must be the same, and the steplog run
must hold every point logged before the signal, with its final status and an end time, as MLflow
reads it. The child uses ``flush_interval=60``, so nothing reaches the disk between the writer's
first write and the signal unless the signal handling writes it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).parent / "_children" / "signals.py"
STEPS = 50  # what the child logs before it says ready

pytestmark = pytest.mark.slow


def run_child(
    store: Path, hosting: str, handler: str, signum: int | None, *, steplog: bool = True, send_go: bool = False
) -> tuple[int, str]:
    """Run the child, signal it once ready (then optionally tell it to go on); return (exit status, stderr)."""
    args = [sys.executable, str(CHILD), str(store), hosting, handler]
    if not steplog:
        args.append("--no-steplog")
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = proc.stdout.readline()
        if line.startswith("ready") and signum is not None:
            proc.send_signal(signum)
        if send_go:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def read_run(store: Path) -> tuple[Any, list[int], list[int]]:
    """The one run in the store as MLflow reads it: (run, steps of 'loss', steps of 'acc/top1')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("signals")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    loss = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    acc = [m.step for m in client.get_metric_history(run.info.run_id, "acc/top1")]
    return run, loss, acc


def assert_ended_with_every_point(store: Path, status: str, steps: int) -> None:
    """MLflow reads the run with ``status``, an end time, and every step of both metrics."""
    run, loss, acc = read_run(store)
    assert status == run.info.status
    assert run.info.end_time is not None
    assert list(range(steps)) == loss
    assert list(range(steps)) == acc


T, INT = signal.SIGTERM, signal.SIGINT

# (hosting, user handler, signal, expected status, steps expected on disk, tell the child to go on)
SCENARIOS = [
    pytest.param("with", "default", T, "KILLED", STEPS, False, id="with-sigterm"),
    pytest.param("with", "default", INT, "KILLED", STEPS, False, id="with-sigint"),
    pytest.param("bare", "default", T, "KILLED", STEPS, False, id="bare-sigterm"),
    pytest.param("bare", "default", INT, "KILLED", STEPS, False, id="bare-sigint"),
    pytest.param("asyncio", "default", T, "KILLED", STEPS, False, id="asyncio-sigterm"),
    pytest.param("asyncio", "default", INT, "KILLED", STEPS, False, id="asyncio-sigint"),
    pytest.param("trio", "default", T, "KILLED", STEPS, False, id="trio-sigterm"),
    pytest.param("trio", "default", INT, "KILLED", STEPS, False, id="trio-sigint"),
    pytest.param("with", "exit42", T, "KILLED", STEPS, False, id="with-user-handler-exits"),
    pytest.param("bare", "exit42", T, "KILLED", STEPS, False, id="bare-user-handler-exits"),
    pytest.param("asyncio", "exit42", T, "KILLED", STEPS, False, id="asyncio-user-handler-exits"),
    pytest.param("with", "flag", T, "KILLED", STEPS + 1, False, id="with-user-handler-graceful"),
    pytest.param("bare", "flag", T, "KILLED", STEPS + 1, False, id="bare-user-handler-graceful"),
    pytest.param("with", "ignore", T, "FINISHED", STEPS + 1, True, id="with-sigterm-ignored"),
    pytest.param("bare", "ignore", INT, "FINISHED", STEPS + 1, True, id="bare-sigint-ignored"),
    pytest.param("asyncio", "ignore", T, "FINISHED", STEPS + 1, True, id="asyncio-sigterm-ignored"),
]


@pytest.mark.parametrize(("hosting", "handler", "signum", "status", "steps", "send_go"), SCENARIOS)
def test_signal_writes_pending_data_and_exits_as_without_steplog(
    tmp_path: Path, hosting: str, handler: str, signum: int, status: str, steps: int, send_go: bool
) -> None:
    """A signal leaves every logged point on disk, the right status with an end time, and the same exit status."""
    expected_rc, _ = run_child(tmp_path / "plain", hosting, handler, signum, steplog=False, send_go=send_go)
    store = tmp_path / "mlruns"
    rc, err = run_child(store, hosting, handler, signum, send_go=send_go)
    assert expected_rc == rc, err
    assert_ended_with_every_point(store, status, steps)


@pytest.mark.parametrize(
    ("hosting", "status", "expected_rc"),
    [
        pytest.param("interrupt", "KILLED", -signal.SIGINT, id="keyboardinterrupt"),
        pytest.param("error", "FAILED", 1, id="exception"),
    ],
)
def test_exception_in_with_flushes_and_sets_status(tmp_path: Path, hosting: str, status: str, expected_rc: int) -> None:
    """KeyboardInterrupt inside ``with`` ends the run KILLED, any other exception FAILED, both with data written."""
    store = tmp_path / "mlruns"
    rc, err = run_child(store, hosting, "default", None)
    assert expected_rc == rc, err
    assert_ended_with_every_point(store, status, STEPS)


CLOSING_CHILD = """
import os, select, signal, sys, time
import anyio
import steplog
from steplog import _hosting
from steplog.testing import MemorySink

store, where = sys.argv[1], sys.argv[2]

# Python writes a signal's number here the moment it lands, whichever thread the OS delivered it to
# (the main thread, where the handler runs, may be blocked in a lock wait that only its end interrupts)
landed, landed_w = os.pipe()
os.set_blocking(landed_w, False)
signal.set_wakeup_fd(landed_w)


def until_sigterm_lands():
    # the barrier: the parent's SIGTERM has landed (bounded, should it never come). In the main
    # thread, steplog's handler then runs at once, here: before the caller goes on
    select.select([landed], [], [], 30)


class GatedSink(MemorySink):
    async def write(self, batch):
        last = any(59 in column.steps for column in batch.metric_columns())
        if where == "writing" and last:  # only the close drains steps 50..59 (see below)
            print("closing", flush=True)
            await anyio.to_thread.run_sync(until_sigterm_lands)
        await super().write(batch)


if where == "before-writer":
    close = _hosting.ThreadHosting.close

    def gated_close(self, status, timeout):
        # close() has begun (the run is CLOSING) and has not handed its finish to the writer yet
        print("closing", flush=True)
        until_sigterm_lands()  # the handler runs in here, in the main thread
        close(self, status, timeout)

    _hosting.ThreadHosting.close = gated_close

if where == "holding-the-close-lock":
    from steplog._lifecycle import RunState
    from steplog._run import Run

    set_state = Run._set_state
    gated = []

    def gated_set_state(self, new):
        # close() holds the run's close lock and has not marked the run CLOSING yet
        if new is RunState.CLOSING and not gated:
            gated.append(True)  # once: the handler's own close passes straight through
            print("closing", flush=True)
            until_sigterm_lands()  # the handler runs in here and closes the run itself
        set_state(self, new)

    Run._set_state = gated_set_state

run = steplog.start_run("signals", tracking_uri=store, sinks=[GatedSink()], flush_interval=60)
for step in range(50):
    run.log_metrics({"loss": float(step), "acc/top1": 1.0}, step=step)
run.flush()  # written; and with flush_interval=60 the writer's next drain is the close's, not a timed one
for step in range(50, 60):
    run.log_metrics({"loss": float(step), "acc/top1": 1.0}, step=step)
run.close()  # every log call above has returned: all 60 steps are the close's to write
time.sleep(30)  # the signal ends the process before this
"""


@pytest.mark.parametrize(
    ("where", "status"),
    [
        # lands while the writer writes the close's last batch: the handler waits for that close, which
        # ends the run as it was asked (or, when the OS gave the signal to another thread than the main
        # one, whose lock wait only the close's end interrupts, runs after it)
        pytest.param("writing", "FINISHED", id="while-the-writer-writes"),
        # the close had not reached the writer: the handler runs the finish itself, as KILLED
        pytest.param("before-writer", "KILLED", id="before-the-close-reaches-the-writer"),
        # the signal lands inside close()'s own check of the state: the handler's close must not deadlock
        pytest.param("holding-the-close-lock", "KILLED", id="while-close-holds-its-lock"),
    ],
)
def test_sigterm_during_close_lets_the_close_finish(tmp_path: Path, where: str, status: str) -> None:
    """A SIGTERM that lands while close() runs waits for that close: every point logged before it is on disk."""
    store = tmp_path / "mlruns"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLOSING_CHILD, str(store), where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # the child says "closing" from inside close(), after its last log call returned
        assert "closing" == proc.stdout.readline().strip()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert -signal.SIGTERM == proc.returncode, err
    run, loss, acc = read_run(store)
    assert status == run.info.status
    assert run.info.end_time is not None
    assert list(range(60)) == loss
    assert list(range(60)) == acc


DRAIN_PARTS_CHILD = Path(__file__).parent / "_children" / "sigterm_between_drain_parts.py"


@pytest.mark.parametrize("yields", [1, 2, 3, 4, 5])
def test_sigterm_between_drain_parts_of_an_asyncio_hosted_writer_loses_nothing(tmp_path: Path, yields: int) -> None:
    """A big backlog drained in parts, SIGTERM while the loop runs between two parts: every point is on disk."""
    store = tmp_path / "mlruns"
    proc = subprocess.run(
        [sys.executable, str(DRAIN_PARTS_CHILD), str(store), str(yields)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    lines = {f.name: len(f.read_text().splitlines()) for f in store.glob("*/*/metrics/k*")}
    assert lines == {f"k{k}": 20_000 for k in range(4)}


INSIDE_TRIO_WRITER_CHILD = """
import os, signal, sys
import trio
import steplog
from steplog import _buffer, _writer

store, where = sys.argv[1], sys.argv[2]
owner, name = (_writer.Writer, "_make_work") if where == "handing-over" else (_buffer.Buffer, "drain_part")
original = getattr(owner, name)
fired = []


def ctrl_c_now(self, *args):
    # Ctrl-C lands while the writer task holds records that are in no queue yet (a part just drained
    # from the buffer, or a drain being handed to the sinks): trio runs its SIGINT handler at the
    # next check between bytecodes, in the writer's code
    result = original(self, *args) if where == "draining" else None
    if not fired:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
    return result if where == "draining" else original(self, *args)


setattr(owner, name, ctrl_c_now)


async def main():
    async with steplog.start_run("signals", tracking_uri=store, flush_interval=60.0, run_name="r") as run:
        for step in range(50):
            run.log_metric("loss", step / 10, step=step)
            run.log_metric("acc/top1", 1 - step / 100, step=step)
        await run.aflush()  # the writer drains now, in this loop: the Ctrl-C lands in its task
        await trio.sleep(30)


trio.run(main)
"""


@pytest.mark.parametrize("where", ["draining", "handing-over"])
def test_ctrl_c_inside_a_trio_writer_task_loses_nothing(tmp_path: Path, where: str) -> None:
    """trio raises KeyboardInterrupt in whatever unprotected code runs; in the writer's it would drop a drain."""
    store = tmp_path / "mlruns"
    proc = subprocess.run(
        [sys.executable, "-c", INSIDE_TRIO_WRITER_CHILD, str(store), where], capture_output=True, text=True, timeout=120
    )
    assert -signal.SIGINT == proc.returncode, proc.stderr
    assert_ended_with_every_point(store, "KILLED", STEPS)


STUCK_TRIO_SINK_CHILD = """
import os, signal, time
import trio
import steplog
from steplog.sinks import MlrunsSink


class StuckSink(MlrunsSink):
    async def write(self, batch):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the sink is stuck in sync code on the loop
        started = time.monotonic()
        while time.monotonic() - started < 30:  # a blocking call without a timeout, bounded for the test
            pass
        print("not interrupted", flush=True)
        await super().write(batch)


async def main():
    async with steplog.start_run("signals", sinks=[StuckSink(%r)], flush_interval=0.05, run_name="r") as run:
        run.log_metric("loss", 0.5, step=0)
        await trio.sleep(60)


trio.run(main)
"""


def test_ctrl_c_interrupts_a_trio_sink_stuck_in_sync_code(tmp_path: Path) -> None:
    """The writer's KI protection ends where a sink's own code begins: Ctrl-C stops a stuck sink, as in plain trio."""
    proc = subprocess.run(
        [sys.executable, "-c", STUCK_TRIO_SINK_CHILD % str(tmp_path / "mlruns")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "" == proc.stdout, proc.stderr
    assert -signal.SIGINT == proc.returncode, proc.stderr
