"""Disk full, I/O errors and stuck sinks: nothing torn, errors surfaced, data kept and retried, never a hang.

Faults are injected at two seams: the local sink's ``os.write`` (a proxy that fails, optionally
after writing part of the data, as a full disk does) and the :class:`~steplog.typing.Sink`
protocol (sinks that fail or block forever). A real, small tmpfs is used where the test may
mount one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import steplog
from steplog import FlushTimeoutError, Store, WriteError
from steplog.sinks import mlruns as mlruns_module
from steplog.testing import MemorySink
from steplog.typing import Batch


class FailingWrites:
    """Stands in for the sink's ``os`` module: ``write`` fails while ``failing`` is set.

    With ``partial``, a failing write first writes half its data, as a disk filling up does.
    """

    def __init__(self, code: int, *, partial: bool) -> None:
        self.code = code
        self.partial = partial
        self.failing = True
        self.failures = 0

    def write(self, fd: int, data: Any) -> int:
        if not self.failing:
            return os.write(fd, data)
        self.failures += 1
        if self.partial and len(data) > 1:
            os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def failing_writes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> FailingWrites:
    """Make the local sink's appends fail with the errno given by the test's parameter."""
    code, partial = request.param
    fake = FailingWrites(code, partial=partial)
    monkeypatch.setattr(mlruns_module, "os", fake)
    return fake


def metric_file(run: steplog.Run, store: Path, key: str) -> Path:
    return store / run.experiment_id / run.run_id / "metrics" / key


def assert_whole_lines(path: Path, steps: list[int]) -> None:
    """The file holds exactly one whole line per step in ``steps``, in order."""
    data = path.read_bytes()
    assert data.endswith(b"\n") or data == b""
    assert steps == [int(line.split(b" ")[2]) for line in data.splitlines()]


@pytest.mark.parametrize(
    "failing_writes",
    [
        pytest.param((errno.ENOSPC, True), id="ENOSPC-partial"),
        pytest.param((errno.EIO, False), id="EIO"),
        pytest.param((errno.EACCES, False), id="EACCES"),
    ],
    indirect=True,
)
def test_transient_write_error_surfaces_then_loses_nothing(store: Path, failing_writes: FailingWrites) -> None:
    """A failing append leaves no partial line, raises WriteError naming file and error at flush, and is retried."""
    with steplog.start_run("io", tracking_uri=store, handle_signals=False, flush_interval=0.01) as run:
        failing_writes.failing = False
        for step in range(10):
            run.log_metric("loss", step / 10, step=step)
        run.flush()
        failing_writes.failing = True
        for step in range(10, 20):
            run.log_metric("loss", step / 10, step=step)
        with pytest.raises(WriteError) as caught:
            run.flush()
        path = metric_file(run, store, "loss")
        message = str(caught.value)
        assert str(path) in message
        assert os.strerror(failing_writes.code) in message
        assert errno.errorcode[failing_writes.code] in message
        assert_whole_lines(path, list(range(10)))  # the half-written batch was cut back
        stats = run.stats()
        assert 10 == stats.queued
        assert stats.errors >= 1
        assert str(path) in str(stats.last_error)
        failing_writes.failing = False
        run.flush()  # the retry writes the kept records
        assert 0 == run.stats().queued
    assert failing_writes.failures >= 1
    assert_whole_lines(path, list(range(20)))
    history = Store(store).metric_history(run.run_id, "loss")
    assert [s / 10 for s in range(20)] == list(history.values)


def test_failed_first_write_of_a_new_key_leaves_no_file(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new key whose first write fails leaves neither an empty metric file nor a temp file, and is retried."""
    fake = FailingWrites(errno.ENOSPC, partial=True)
    monkeypatch.setattr(mlruns_module, "os", fake)
    with steplog.start_run("io", tracking_uri=store, handle_signals=False) as run:
        run.log_metric("acc/top1", 0.5, step=0)
        with pytest.raises(WriteError, match="ENOSPC"):
            run.flush()
        run_dir = store / run.experiment_id / run.run_id
        assert [] == [p.name for p in (run_dir / "metrics").rglob("*") if p.is_file()]
        assert [] == [p.name for p in run_dir.glob(".steplog-tmp-*")]
        fake.failing = False
    assert_whole_lines(run_dir / "metrics" / "acc" / "top1", [0])


def test_write_error_at_close_names_file_and_cause(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that stays full makes close() raise WriteError (file and OS error), bounded by its timeout."""
    fake = FailingWrites(errno.ENOSPC, partial=False)
    monkeypatch.setattr(mlruns_module, "os", fake)
    run = steplog.start_run("io", tracking_uri=store, handle_signals=False)
    run.log_metric("loss", 1.0, step=0)
    with pytest.raises(WriteError) as caught:
        run.close(timeout=0.5)
    assert "No space left on device" in str(caught.value)
    assert "'loss': 1" in str(caught.value)
    assert str(metric_file(run, store, "loss")) in str(caught.value)
    assert run.closed


# ---------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "steplog-test", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}): the real full-disk test needs root and mount")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the real full-disk test needs root")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=10, check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` completely with one file; return it."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match="No space left on device"):  # noqa: PT012 - write until the disk is full
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_real_full_disk_cuts_back_and_recovers(small_tmpfs: Path) -> None:
    """On a real full tmpfs: ENOSPC at flush, whole lines only, data kept; freeing space writes everything once."""
    store = small_tmpfs / "mlruns"
    with steplog.start_run("disk", tracking_uri=store, handle_signals=False, flush_interval=0.01) as run:
        for step in range(100):
            run.log_metrics({"loss": step / 7, "acc": step / 9}, step=step)
        run.flush()
        filler = fill(small_tmpfs)
        for step in range(100, 3000):  # ~100 KB of lines: cannot fit in the crumbs left
            run.log_metrics({"loss": step / 7, "acc": step / 9}, step=step)
        with pytest.raises(WriteError) as caught:
            run.flush()
        assert errno.ENOSPC == caught.value.errno
        assert "No space left on device" in str(caught.value)
        for key in ("loss", "acc"):
            data = metric_file(run, store, key).read_bytes()
            assert data.endswith(b"\n")
            steps = [int(line.split(b" ")[2]) for line in data.splitlines()]
            assert list(range(len(steps))) == steps  # a clean prefix, whatever fit
        assert run.stats().queued > 0
        filler.unlink()
        run.flush()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    for key, div in (("loss", 7), ("acc", 9)):
        history = client.get_metric_history(run.run_id, key)
        assert [(s, s / div) for s in range(3000)] == [(m.step, m.value) for m in history]
    assert "FINISHED" == client.get_run(run.run_id).info.status


# ---------------------------------------------------------------------------- stuck and failing sinks


class StuckSink(MemorySink):
    """A sink whose writes never return: ``async`` ones await forever, ``blocking`` ones block the loop."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.release = threading.Event()

    async def write(self, batch: Batch) -> None:
        if self.mode == "async":
            await anyio.sleep_forever()
        self.release.wait()  # a sync call inside async def: blocks the writer's whole event loop

    def write_sync(self, batch: Batch) -> None:
        self.release.wait()


@pytest.mark.parametrize("mode", ["async", "blocking"])
def test_close_with_stuck_sink_is_bounded_and_names_the_unwritten(mode: str) -> None:
    """flush(timeout) and close(timeout) with a sink stuck forever raise FlushTimeoutError naming what is unwritten."""
    sink = StuckSink(mode)
    run = steplog.start_run("stuck", sinks=[sink], handle_signals=False)
    try:
        for step in range(100):
            run.log_metrics({"loss": 1.0 * step, "acc": 0.5}, step=step)
        with pytest.raises(FlushTimeoutError) as flushed:
            run.flush(timeout=0.2)
        assert "200 metric points ('loss': 100, 'acc': 100)" in str(flushed.value)
        with pytest.raises(FlushTimeoutError) as closed:
            run.close(timeout=0.3)
        assert "close() timed out after 0.3 s" in str(closed.value)
        assert "'loss': 100" in str(closed.value)
        assert run.closed
    finally:
        sink.release.set()


@pytest.mark.anyio
async def test_async_close_with_stuck_sink_is_bounded() -> None:
    """``async with`` over a stuck sink: aflush/aclose time out naming what is unwritten instead of hanging."""
    sink = StuckSink("async")
    run = steplog.start_run("stuck", sinks=[sink], handle_signals=False, close_timeout=0.3)
    try:
        with pytest.raises(FlushTimeoutError) as caught:  # noqa: PT012 - the error comes from leaving the block
            async with run:
                run.log_metric("loss", 1.0, step=0)
                with pytest.raises(FlushTimeoutError, match="'loss': 1"):
                    await run.aflush(timeout=0.2)
        assert "close() timed out after 0.3 s with 1 metric points ('loss': 1)" in str(caught.value)
    finally:
        sink.release.set()  # the emergency write_sync close handed it is waiting: let it end


class FlakySink(MemorySink):
    """A sink that fails its first ``failures`` writes, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def write(self, batch: Batch) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "injected I/O error")
        self.write_sync(batch)


@pytest.mark.anyio
async def test_flaky_sink_is_retried_in_order_async() -> None:
    """A sink failing a few writes gets every record exactly once, in order, through retries (async hosting)."""
    sink = FlakySink(3)
    async with steplog.start_run("flaky", sinks=[sink], handle_signals=False, flush_interval=0.001) as run:
        for step in range(50):
            run.log_metric("loss", float(step), step=step)
            if step % 10 == 9:
                with contextlib.suppress(WriteError):  # the first barriers meet the injected failures
                    await run.aflush()
    assert list(range(50)) == sink.steps("loss")
    stats = run.stats()
    assert (3, 50, 0) == (stats.errors, stats.written, stats.queued)
    assert stats.retries >= 1
    assert "injected I/O error" in str(stats.last_error)


STUCK_SINK_CODE = """
import asyncio, threading, steplog
from steplog.testing import MemorySink

class Stuck(MemorySink):
    async def write(self, batch):
        threading.Event().wait()  # blocks the writer's loop for good
    def write_sync(self, batch):
        threading.Event().wait()
"""

STUCK_AT_EXIT = {
    "thread": STUCK_SINK_CODE
    + """
run = steplog.start_run("stuck", sinks=[Stuck()], close_timeout=0.5)
for step in range(7):
    run.log_metric("loss", 1.0, step=step)
print("exiting", flush=True)
""",
    "asyncio": STUCK_SINK_CODE
    + """
async def main():
    run = steplog.start_run("stuck", sinks=[Stuck()], close_timeout=0.5)
    await run.astart()
    for step in range(7):
        run.log_metric("loss", 1.0, step=step)
    print("exiting", flush=True)

asyncio.run(main())
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("hosting", ["thread", "asyncio"])
def test_atexit_with_stuck_sink_does_not_hang(hosting: str) -> None:
    """The atexit hook gives up after close_timeout with a stuck sink, says what was not written, and exits 0."""
    result = subprocess.run([sys.executable, "-c", STUCK_AT_EXIT[hosting]], capture_output=True, text=True, timeout=60)
    assert 0 == result.returncode, result.stderr
    assert "exiting" in result.stdout
    assert "'loss': 7" in result.stderr


STUCK_CHILD = """
import sys
import anyio
import steplog
from steplog.testing import MemorySink


class Stuck(MemorySink):
    def write(self, batch):  # a plain method: the writer runs it off the event loop
        import threading
        threading.Event().wait()  # never returns

    write_sync = write


async def main():
    run = steplog.start_run("stuck", sinks=[Stuck()], handle_signals=False, close_timeout=0.3)
    try:
        async with run:
            run.log_metric("loss", 1.0, step=0)
    except steplog.FlushTimeoutError:
        print("gave up", flush=True)


anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_sink_stuck_forever_never_keeps_the_process_from_exiting(backend: str, tmp_path: Path) -> None:
    """close() gives up on a sink whose write never returns, and the interpreter still exits (its call runs on a
    daemon thread: anyio's worker threads would be waited for at exit, forever)."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_CHILD)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, timeout=60)
    assert 0 == done.returncode, done.stderr
    assert "gave up" in done.stdout
