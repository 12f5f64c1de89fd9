"""Run lifecycle (``_run.py``): one scenario table through the sync, async and no-context-manager faces.

The final status is read back with MLflow 3.17's own client, as a user would see it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from mlflow.tracking import MlflowClient

import steplog
from _sinks import WAIT, GateSink
from steplog import InvalidValueError, RunStateError, RunStatus
from steplog.testing import MemorySink
from steplog.typing import Batch, RunRequest


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How the code inside a run ends, and what the run's status must be afterwards."""

    name: str
    raises: type[BaseException] | None
    status: str


SCENARIOS = [
    Scenario("normal exit", None, "FINISHED"),
    Scenario("exception", ValueError, "FAILED"),
    Scenario("KeyboardInterrupt", KeyboardInterrupt, "KILLED"),
]


class FailingSink(MemorySink):
    """A sink whose every write fails with an OS error (a disk that cannot be written)."""

    async def write(self, batch: Batch) -> None:
        self.write_sync(batch)

    def write_sync(self, batch: Batch) -> None:
        raise OSError(errno.EIO, "disk on fire")


class DeniedSink(MemorySink):
    """A sink whose folder the user may not write: opening the run is refused by the OS."""

    async def open(self, request: RunRequest) -> steplog.RunInfo:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/mlruns")


def body(run: steplog.Run, scenario: Scenario) -> None:
    """What every face does inside the run: log a little, then end as the scenario says."""
    run.log_param("lr", 0.01)
    run.set_tag("face", "any")
    for step in range(50):
        run.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 50}, step=step)
    if scenario.raises is not None:
        raise scenario.raises("boom")


def ending(scenario: Scenario) -> contextlib.AbstractContextManager[object]:
    """Expect the scenario's exception to come out of the run (the run never swallows it)."""
    return pytest.raises(scenario.raises) if scenario.raises else contextlib.nullcontext()


def check_store(store: Path, run_id: str, status: str) -> None:
    """MLflow reads the run back with the status, an end time, and every point logged."""
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(run_id)
    assert status == run.info.status
    assert run.info.end_time is not None
    assert run.info.end_time >= run.info.start_time
    assert {"lr": "0.01"} == run.data.params
    assert list(range(50)) == [m.step for m in client.get_metric_history(run_id, "loss")]
    assert 50 == len(client.get_metric_history(run_id, "acc"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_sync_with(scenario: Scenario, store: Path) -> None:
    """``with start_run()``: FINISHED on normal exit, FAILED on an exception, KILLED on KeyboardInterrupt."""
    with ending(scenario), steplog.start_run("lifecycle", tracking_uri=store) as run:
        body(run, scenario)
    assert run.closed
    assert RunStatus[scenario.status] == run.info.status
    check_store(store, run.run_id, scenario.status)


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_async_with(scenario: Scenario, store: Path, anyio_backend: str) -> None:
    """``async with start_run()`` on asyncio and trio: the same statuses, everything written, even when the
    body never awaits (the writer must not be cancelled before it ran)."""
    with ending(scenario):
        async with steplog.start_run("lifecycle", tracking_uri=store) as run:
            body(run, scenario)
    assert run.closed
    assert RunStatus[scenario.status] == run.info.status
    check_store(store, run.run_id, scenario.status)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_without_context_manager_closed_explicitly(scenario: Scenario, store: Path) -> None:
    """``run = start_run()`` outside a loop is already writing; ``close(status)`` records the status given."""
    run = steplog.start_run("lifecycle", tracking_uri=store)
    run.log_metric("early", 1.0)
    run.flush()  # writing before any context manager: the writer is already running
    assert [1.0] == [m.value for m in MlflowClient(tracking_uri=store.as_uri()).get_metric_history(run.run_id, "early")]
    try:
        body(run, scenario)
    except BaseException:
        run.close(scenario.status)
    else:
        run.close()
    assert RunStatus[scenario.status] == run.info.status
    check_store(store, run.run_id, scenario.status)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_without_context_manager_closed_at_exit(scenario: Scenario, tmp_path: Path) -> None:
    """A run the user never closes is closed at interpreter exit: FINISHED, FAILED after an uncaught exception,
    KILLED after an uncaught KeyboardInterrupt, with everything written."""
    store = tmp_path / "mlruns"
    script = textwrap.dedent(
        f"""
        import steplog
        run = steplog.start_run("lifecycle", tracking_uri={str(store)!r})
        print(run.run_id, flush=True)
        run.log_param("lr", 0.01)
        for step in range(50):
            run.log_metrics({{"loss": 1.0 / (step + 1), "acc": step / 50}}, step=step)
        if {scenario.raises.__name__ if scenario.raises else None}:
            raise {scenario.raises.__name__ if scenario.raises else "SystemExit"}("boom")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert (scenario.raises is None) == (0 == result.returncode), result.stderr
    check_store(store, result.stdout.split()[0], scenario.status)


# --------------------------------------------------------------------------- barriers and closing


def test_close_is_idempotent(store: Path) -> None:
    """close() twice, or close() after the with block, is a no-op; the first status stays."""
    with steplog.start_run("idem", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
    end_time = run.info.end_time
    run.close()
    run.close("FAILED")
    assert RunStatus.FINISHED == run.info.status
    assert end_time == run.info.end_time
    assert "FINISHED" == MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id).info.status


@pytest.mark.anyio
async def test_aclose_is_idempotent(store: Path, anyio_backend: str) -> None:
    """aclose() after ``async with`` and close() after aclose() are no-ops."""
    async with steplog.start_run("idem", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
    await run.aclose("KILLED")
    run.close("FAILED")
    assert RunStatus.FINISHED == run.info.status


def test_flush_after_close_is_a_no_op(store: Path) -> None:
    """A barrier on a closed run returns at once: close wrote everything, and the barrier writes nothing more."""
    with steplog.start_run("closed", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
    before = run.stats()
    run.flush()
    assert (1, 0, before.flushes) == (run.stats().written, run.stats().queued, run.stats().flushes)
    assert [1.0] == steplog.Store(store).metric_history(run.run_id, "x").values


def test_flush_during_close_waits_for_the_close(store: Path) -> None:
    """flush() while close() is writing waits for the close and returns once the points are written (no WriteError)."""
    sink = GateSink()
    run = steplog.start_run("race", sinks=[sink], flush_interval=60.0)
    run.log_metric("x", 1.0)
    outcome: dict[str, object] = {}

    def flush() -> None:
        try:
            run.flush()
            outcome["written"] = sink.values("x")
        except Exception as exc:
            outcome["error"] = exc

    closer = threading.Thread(target=run.close)
    closer.start()
    assert sink.entered.wait(WAIT)  # the close is writing the point: the run is closing, the point in flight
    flusher = threading.Thread(target=flush)
    flusher.start()
    sink.gate.set()
    closer.join(WAIT)
    flusher.join(WAIT)
    assert {"written": [1.0]} == outcome


def test_a_barrier_after_a_failed_close_says_what_was_not_written(store: Path) -> None:
    """flush() after a close that could not write raises WriteError naming the sink's error, never ``None``."""
    sink = FailingSink()
    run = steplog.start_run("failed", sinks=[sink], close_timeout=0.5)
    run.log_metric("x", 1.0)
    with pytest.raises(steplog.WriteError):
        run.close()
    with pytest.raises(steplog.WriteError, match="disk on fire") as caught:
        run.flush()
    assert "None" not in str(caught.value)


@pytest.mark.parametrize("how", ["aclose in a second loop", "close outside any loop"])
def test_a_run_whose_event_loop_ended_is_refused_by_barriers_and_closed_in_full(store: Path, how: str) -> None:
    """After its loop ended unclosed, barriers raise RunStateError saying what to do; a close writes everything."""
    runs: list[steplog.Run] = []

    async def first() -> None:  # the loop ends without leaving the run
        run = await steplog.start_run("orphan", tracking_uri=store).astart()
        run.log_metric("x", 1.0, step=0)
        await run.aflush()
        runs.append(run)

    anyio.run(first, backend="asyncio")  # trio refuses a task group left open: only asyncio can get here
    (run,) = runs
    run.log_metric("x", 2.0, step=1)

    async def second() -> None:
        with pytest.raises(RunStateError, match=r"event loop it ran in ended.*run\.close\(\)"):
            await run.aflush()
        with pytest.raises(RunStateError, match="event loop it ran in ended"):
            run.flush()
        if how == "aclose in a second loop":
            await run.aclose()

    anyio.run(second, backend="asyncio")
    if how == "close outside any loop":
        run.close()
    assert "FINISHED" == MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id).info.status
    assert [1.0, 2.0] == steplog.Store(store).metric_history(run.run_id, "x").values


def test_a_closed_run_cannot_be_entered_again(store: Path) -> None:
    """Entering a closed run raises RunStateError saying to start a new run."""
    with steplog.start_run("again", tracking_uri=store) as run:
        pass
    with pytest.raises(RunStateError, match=r"closed.*start_run"), run:
        pass


@pytest.mark.anyio
async def test_blocking_calls_inside_the_runs_own_loop_are_refused(store: Path, anyio_backend: str) -> None:
    """flush() and close() from inside the event loop the writer runs in raise RunStateError naming the async call."""
    async with steplog.start_run("loop", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
        with pytest.raises(RunStateError, match=re.escape("await run.aflush()")):
            run.flush()
        with pytest.raises(RunStateError, match=re.escape("await run.aclose()")):
            run.close()
        run.log_metric("x", 2.0)  # the run is still open and writing
        await run.aflush()
    assert [1.0, 2.0] == steplog.Store(store).metric_history(run.run_id, "x").values


@pytest.mark.anyio
async def test_flush_from_another_thread_of_an_async_run(store: Path, anyio_backend: str) -> None:
    """A worker thread may use the blocking flush() of an async-hosted run (it waits for the loop's writer)."""
    import anyio.to_thread

    async with steplog.start_run("thread", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
        await anyio.to_thread.run_sync(run.flush)
        assert [1.0] == steplog.Store(store).metric_history(run.run_id, "x").values


@pytest.mark.anyio
async def test_close_from_another_thread_of_an_async_run(store: Path, anyio_backend: str) -> None:
    """close() from a worker thread ends an async run (all written, status kept) without corrupting the loop."""
    import anyio.to_thread

    async with steplog.start_run("thread", tracking_uri=store) as run:
        run.log_metric("x", 1.0)
        await anyio.to_thread.run_sync(run.close, "KILLED")
        assert run.closed
        with pytest.raises(RunStateError, match="closed"):
            run.log_metric("x", 2.0)
    manual = await steplog.start_run("thread", tracking_uri=store).astart()
    manual.log_metric("x", 3.0)
    await anyio.to_thread.run_sync(manual.close)
    await manual.aclose()  # the starting task leaves the run
    client = MlflowClient(tracking_uri=store.as_uri())
    assert "KILLED" == client.get_run(run.run_id).info.status
    assert [1.0] == [m.value for m in client.get_metric_history(run.run_id, "x")]
    assert "FINISHED" == client.get_run(manual.run_id).info.status
    assert [3.0] == [m.value for m in client.get_metric_history(manual.run_id, "x")]


@pytest.mark.anyio
async def test_records_logged_before_astart_are_written(store: Path, anyio_backend: str) -> None:
    """Inside a loop start_run() does not start the writer; records logged before it starts wait and are written."""
    run = steplog.start_run("early", tracking_uri=store)
    with pytest.raises(RunStateError, match="not started"):
        _ = run.run_id
    run.log_metric("x", 1.0, step=0)
    run.log_param("p", "early")
    with pytest.raises(RunStateError, match="not started"):
        await run.aflush()
    async with run:
        run.log_metric("x", 2.0, step=1)
    client = MlflowClient(tracking_uri=store.as_uri())
    assert [(0, 1.0), (1, 2.0)] == [(m.step, m.value) for m in client.get_metric_history(run.run_id, "x")]
    assert {"p": "early"} == client.get_run(run.run_id).data.params


@pytest.mark.anyio
async def test_sync_with_inside_a_running_loop(store: Path, anyio_backend: str) -> None:
    """A plain ``with`` inside async code (a notebook cell, say) hosts the writer on its own thread and works."""
    with steplog.start_run("sync in loop", tracking_uri=store) as run:
        run.log_metric("x", 1.0, step=0)
        run.flush()
        assert [1.0] == steplog.Store(store).metric_history(run.run_id, "x").values
        run.log_metric("x", 2.0, step=1)
    client = MlflowClient(tracking_uri=store.as_uri())
    assert "FINISHED" == client.get_run(run.run_id).info.status
    assert [1.0, 2.0] == [m.value for m in client.get_metric_history(run.run_id, "x")]


@pytest.mark.anyio
async def test_a_run_never_entered_is_written_at_close(store: Path, anyio_backend: str) -> None:
    """A run created inside an event loop (as in a notebook) and closed without being entered still writes
    what was logged: close() starts a writer thread, aclose() a writer task, instead of dropping it."""
    sync_run = steplog.start_run("never entered", tracking_uri=store)
    sync_run.log_metric("x", 1.0)
    sync_run.close()
    async_run = steplog.start_run("never entered", tracking_uri=store)
    async_run.log_metric("x", 2.0)
    await async_run.aclose("KILLED")
    client = MlflowClient(tracking_uri=store.as_uri())
    for run, value, status in [(sync_run, 1.0, "FINISHED"), (async_run, 2.0, "KILLED")]:
        assert status == client.get_run(run.run_id).info.status
        assert [value] == [m.value for m in client.get_metric_history(run.run_id, "x")]


@pytest.mark.anyio
async def test_astart_then_aclose_without_context_manager(store: Path, anyio_backend: str) -> None:
    """``await run.astart()`` … ``await run.aclose()`` is the async no-context-manager face."""
    run = await steplog.start_run("manual", tracking_uri=store).astart()
    assert run is await run.astart()  # starting twice returns the same running run
    run.log_metric("x", 1.0)
    await run.aclose("KILLED")
    assert "KILLED" == MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id).info.status


def test_close_status_is_checked(store: Path) -> None:
    """close() takes FINISHED, FAILED or KILLED (any case, or a RunStatus); anything else is refused."""
    run = steplog.start_run("status", tracking_uri=store)
    for bad in ("DONE", "RUNNING", RunStatus.SCHEDULED, 3):
        with pytest.raises(InvalidValueError, match="FINISHED, FAILED, KILLED"):
            run.close(bad)  # type: ignore[arg-type]
    run.close("failed")
    assert RunStatus.FAILED == run.info.status


# --------------------------------------------------------------------------- where runs go


def run_location(run: steplog.Run) -> Path:
    """The directory a finished local run was written to."""
    return Path(run.info.artifact_uri.removeprefix("file://")).parent


@pytest.mark.parametrize("form", ["str path", "Path", "file URI"])
def test_tracking_uri_argument(form: str, tmp_path: Path) -> None:
    """tracking_uri may be a directory (str or Path) or a file: URI."""
    root = tmp_path / "here"
    uri: Any = {"str path": str(root), "Path": root, "file URI": root.as_uri()}[form]
    with steplog.start_run("where", tracking_uri=uri) as run:
        pass
    assert root / run.experiment_id / run.run_id == run_location(run)
    assert root.as_uri() == run.info.tracking_uri


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STEPLOG_TRACKING_URI": "steplog-env", "MLFLOW_TRACKING_URI": "mlflow-env"}, "steplog-env"),
        ({"MLFLOW_TRACKING_URI": "mlflow-env"}, "mlflow-env"),
        ({}, "mlruns"),
    ],
    ids=["STEPLOG_TRACKING_URI first", "then MLFLOW_TRACKING_URI", "then ./mlruns"],
)
def test_tracking_uri_resolution(
    env: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an argument: STEPLOG_TRACKING_URI, then MLFLOW_TRACKING_URI, then ./mlruns (relative to the cwd)."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with steplog.start_run("where") as run:
        pass
    assert tmp_path / expected / run.experiment_id / run.run_id == run_location(run)
    assert [expected] == [p.name for p in tmp_path.iterdir()]


@pytest.mark.parametrize("uri", ["postgresql://u@h/db", "s3://bucket/mlruns", "mysql://h/db"])
def test_unsupported_tracking_uris_are_refused_at_start(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database or other non-file, non-http URI is refused at start with a message saying what is supported."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidValueError, match="is not supported: use a directory path, a file: URI, http"):
        steplog.start_run("nope", tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(InvalidValueError, match=re.escape(repr(uri))):
        steplog.start_run("nope")
    assert [] == list(tmp_path.iterdir())


def test_unknown_and_bad_options_are_refused() -> None:
    """start_run() refuses unknown options (TypeError) and bad option values (InvalidValueError) at once."""
    with pytest.raises(TypeError, match="flush_intervall"):
        steplog.start_run("opts", sinks=[MemorySink()], flush_intervall=1.0)
    bad: list[dict[str, Any]] = [{"flush_interval": 0}, {"max_buffer": -1}, {"on_full": "wait"}, {"durability": "disk"}]
    for options in bad:
        with pytest.raises(InvalidValueError):
            steplog.start_run("opts", sinks=[MemorySink()], **options)


# --------------------------------------------------------------------------- identity


def test_run_info_is_a_frozen_snapshot(store: Path) -> None:
    """run.info is a frozen dataclass; it reports the run's ids, name, times and final status."""
    with steplog.start_run("info", run_name="named", tracking_uri=store) as run:
        info = run.info
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.status = RunStatus.FAILED  # type: ignore[misc]
        assert (RunStatus.RUNNING, None) == (info.status, info.end_time)
    final = run.info
    assert (run.run_id, run.experiment_id, "info", "named") == (
        final.run_id,
        final.experiment_id,
        final.experiment_name,
        final.run_name,
    )
    assert RunStatus.FINISHED == final.status
    assert final.end_time is not None
    assert final.start_time <= final.end_time
    assert re.fullmatch(r"[0-9a-f]{32}", run.run_id)
    assert re.fullmatch(r"[1-9][0-9]{17}", run.experiment_id)
    assert store.as_uri() == run.tracking_uri


def test_run_name_is_in_meta_and_in_the_run_name_tag(store: Path) -> None:
    """The run name is written to meta.yaml and to the mlflow.runName tag; MLflow reads it back."""
    with steplog.start_run("names", run_name="baseline 1", tracking_uri=store) as run:
        pass
    meta = (store / run.experiment_id / run.run_id / "meta.yaml").read_text(encoding="utf-8")
    assert 'run_name: "baseline 1"\n' in meta
    mlflow_run = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    assert "baseline 1" == mlflow_run.info.run_name
    assert "baseline 1" == mlflow_run.data.tags["mlflow.runName"]


def test_a_run_name_is_generated_when_none_is_given(store: Path) -> None:
    """Without run_name, a name in MLflow's adjective-noun-number style is generated and stored in both places."""
    with steplog.start_run("names", tracking_uri=store) as run:
        pass
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{1,3}", run.info.run_name)
    mlflow_run = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    assert run.info.run_name == mlflow_run.info.run_name == mlflow_run.data.tags["mlflow.runName"]


@pytest.mark.parametrize("bad", ["", "x" * 251, 3])
def test_bad_run_names_are_refused(bad: object) -> None:
    """A run name must be a non-empty str of at most 250 characters (MLflow's SQL column limit)."""
    with pytest.raises(InvalidValueError, match="run_name"):
        steplog.start_run("names", run_name=bad, sinks=[MemorySink()])  # type: ignore[arg-type]


def test_system_and_user_tags(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's system tags (user, source name and type) are set, with the tags given to start_run()."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    with steplog.start_run("tags", tracking_uri=store, tags={"team": "vision", "n": 3}) as run:
        pass
    mlflow_run = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id)
    tags = mlflow_run.data.tags
    expected_source = os.path.abspath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0]
    assert getpass.getuser() == tags["mlflow.user"] == mlflow_run.info.user_id
    assert expected_source == tags["mlflow.source.name"]
    assert "LOCAL" == tags["mlflow.source.type"]
    assert ("vision", "3") == (tags["team"], tags["n"])


def test_start_run_tags_are_validated() -> None:
    """Tags given to start_run() follow the key rules, refused before anything is created."""
    with pytest.raises(steplog.InvalidKeyError, match=re.escape("tag key '../t'")):
        steplog.start_run("tags", tags={"../t": 1}, sinks=[MemorySink()])


def test_repr_names_the_run_and_its_state(store: Path) -> None:
    """repr(run) shows the run id, its state and where it writes."""
    run = steplog.start_run("repr", tracking_uri=store)
    text = repr(run)
    run.close()
    assert run.run_id in text
    assert "running" in text
    assert "closed" in repr(run)


def test_setting_the_run_name_tag_renames_the_run(store: Path) -> None:
    """Setting ``mlflow.runName`` renames the run in run.info, in meta.yaml and in the tag, as MLflow does."""
    with steplog.start_run("e", run_name="before", tracking_uri=store) as run:
        run.set_tag("mlflow.runName", "after")
        assert "after" == run.info.run_name
    read = steplog.Store(store).get_run(run.run_id)
    assert ("after", "after") == (read.run_name, read.tags["mlflow.runName"])


def test_none_params_and_tags_are_stored_as_none_text(store: Path) -> None:
    """A param or tag set to None is stored as ``'None'``, as MLflow stores ``str(value)``."""
    with steplog.start_run("none", tracking_uri=store, tags={"at_start": None}) as run:
        run.log_param("p", None)
        run.log_params({"q": None, "r": 1})
        run.set_tag("t", None)
    data = MlflowClient(tracking_uri=store.as_uri()).get_run(run.run_id).data
    assert {"p": "None", "q": "None", "r": "1"} == data.params
    assert ("None", "None") == (data.tags["t"], data.tags["at_start"])


def test_a_store_without_write_permission_says_how_to_fix_it(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a run where the user may not write is a StepLogError naming the path, the permission and the fix."""
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == store:  # what the OS answers a user without write permission on the parent folder
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(steplog.StepLogError) as caught:
        steplog.start_run("denied", tracking_uri=store)
    message = str(caught.value)
    assert f"permission denied writing {str(store)!r}" in message
    assert f"write and execute permission on {str(store.parent)!r}" in message
    assert "choose a tracking_uri" in message
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.anyio
async def test_a_sink_refusing_permission_at_start_is_explained_in_async_code(anyio_backend: str) -> None:
    """The same clear error when the run starts in an event loop (the loop host opens the run)."""
    run = steplog.start_run("denied", sinks=[DeniedSink()])
    with pytest.raises(steplog.StepLogError, match=r"permission denied writing '/data/mlruns'.*'/data'"):
        await run.astart()
