"""The hot path's semantics (``_buffer.py``), observed through a run writing to ``steplog.testing.MemorySink``."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import steplog
from steplog import InvalidKeyError, InvalidValueError, ParamChangedError, RunStateError, StepLogError
from steplog._layout import parse_metric_lines
from steplog.testing import MemorySink


def memory_run(**options: object) -> tuple[steplog.Run, MemorySink]:
    """A sync run writing only to a fresh MemorySink."""
    sink = MemorySink()
    return steplog.start_run("buffer", sinks=[sink], **options), sink  # type: ignore[arg-type]


def points(sink: MemorySink, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every point the sink received for ``key``, in order."""
    return [(p.step, p.value) for p in sink.metrics.get(key, [])]


# --------------------------------------------------------------------------- order and steps


def test_per_key_order_is_logged_order() -> None:
    """Each key's points reach the sink in the order they were logged, across flushes and interleaved keys."""
    run, sink = memory_run()
    with run:
        for i in range(3000):
            run.log_metric("a", float(i), step=i // 7)
            if i % 3 == 0:
                run.log_metric("b", -float(i), step=i // 7)
            if i % 1000 == 0:
                run.flush()
    assert [(i // 7, float(i)) for i in range(3000)] == points(sink, "a")
    assert [(i // 7, -float(i)) for i in range(0, 3000, 3)] == points(sink, "b")


def test_step_none_means_the_current_step() -> None:
    """step=None is the last step given (0 at first); log_metrics follows the same rule; going back is allowed."""
    run, sink = memory_run()
    with run:
        run.log_metric("x", 1.0)
        run.log_metric("x", 2.0, step=5)
        run.log_metric("x", 3.0)
        run.log_metrics({"x": 4.0, "y": 4.5})
        run.log_metric("x", 5.0, step=2)
        run.log_metric("x", 6.0)
        run.log_metrics({"x": 7.0}, step=9)
        run.log_metric("y", 8.0)
    assert [(0, 1.0), (5, 2.0), (5, 3.0), (5, 4.0), (2, 5.0), (2, 6.0), (9, 7.0)] == points(sink, "x")
    assert [(5, 4.5), (9, 8.0)] == points(sink, "y")


def test_steps_and_values_are_stored_as_python_numbers() -> None:
    """numpy steps become int and numpy/int values become float before they reach a sink."""
    run, sink = memory_run()
    with run:
        run.log_metric("x", np.float32(0.5), step=np.int64(3))
        run.log_metric("x", 7, step=np.int32(4))
        run.log_metrics({"x": np.float64(0.25)}, step=np.uint16(5))
    got = sink.metrics["x"]
    assert [(3, 0.5), (4, 7.0), (5, 0.25)] == [(p.step, p.value) for p in got]
    assert [int] * 3 == [type(p.step) for p in got]
    assert [float] * 3 == [type(p.value) for p in got]


def test_timestamps_default_to_the_time_of_the_call_or_are_kept() -> None:
    """Default timestamps are integer ms taken around the call; an explicit timestamp is kept as given."""
    before = time.time_ns() // 1_000_000
    run, sink = memory_run()
    with run:
        run.log_metric("x", 1.0, step=1)
        run.log_metric("x", 2.0, step=2, timestamp=1_600_000_000_123)
        run.log_metrics({"y": 3.0}, step=3, timestamp=np.int64(1_600_000_000_456))
        run.log_metric("x", 4.0, step=4)
        after = time.time_ns() // 1_000_000
    stamps = [p.timestamp for p in sink.metrics["x"]]
    assert before <= stamps[0] <= after
    assert 1_600_000_000_123 == stamps[1]
    assert before <= stamps[2] <= after
    assert [1_600_000_000_456] == [p.timestamp for p in sink.metrics["y"]]
    assert {int} == {type(p.timestamp) for p in sink.metrics["x"] + sink.metrics["y"]}


def test_threads_logging_at_once_lose_and_tear_nothing() -> None:
    """Several threads logging to shared and own keys at once: every point arrives whole, per-thread order kept."""
    run, sink = memory_run()
    n, threads = 5000, 4

    def work(t: int) -> None:
        for i in range(n):
            run.log_metric(f"own/{t}", float(i))
            run.log_metric("shared", float(t * n + i))

    with run:
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    for t in range(threads):
        assert [float(i) for i in range(n)] == sink.values(f"own/{t}")
        mine = [v for v in sink.values("shared") if t * n <= v < (t + 1) * n]
        assert [float(t * n + i) for i in range(n)] == mine
    assert threads * n == len(sink.values("shared"))


# --------------------------------------------------------------------------- all or nothing


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"a": 1.0, "b": "oops", "c": 3.0}, InvalidValueError),
        ({"a": 1.0, "b": None, "c": 3.0}, InvalidValueError),
        ({"a": 1.0, "b//x": 2.0, "c": 3.0}, InvalidKeyError),
        ({"a": 1.0, 7: 2.0, "c": 3.0}, InvalidKeyError),
        ({"a": 1.0, "b": np.array([1.0, 2.0])}, InvalidValueError),
    ],
    ids=["str value", "None value", "bad key", "non-str key", "array value"],
)
def test_log_metrics_is_all_or_nothing(bad: dict[object, object], error: type[Exception]) -> None:
    """A bad item anywhere in log_metrics raises and nothing from that call is queued, known keys included."""
    run, sink = memory_run()
    with run:
        run.log_metrics({"a": 0.5, "c": 0.5}, step=1)  # known keys: the fast path is in play
        with pytest.raises(error):
            run.log_metrics(bad, step=2)  # type: ignore[arg-type]
        with pytest.raises(InvalidValueError):
            run.log_metrics({"a": 9.0, "c": 9.0}, step=2.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidValueError):
            run.log_metrics({"a": 9.0, "c": 9.0}, step=3, timestamp=1.5)  # type: ignore[arg-type]
        run.log_metrics({"a": 1.5, "c": 1.5})
    assert [(1, 0.5), (1, 1.5)] == points(sink, "a")
    assert [(1, 0.5), (1, 1.5)] == points(sink, "c")
    assert set() == set(sink.metrics) - {"a", "c"}


def test_log_metrics_refuses_a_non_mapping() -> None:
    """log_metrics takes a mapping; a list of pairs is refused with a message saying so."""
    run, _sink = memory_run()
    with run, pytest.raises(InvalidKeyError, match="mapping"):
        run.log_metrics([("a", 1.0)])  # type: ignore[arg-type]


def test_a_rejected_step_does_not_change_the_current_step() -> None:
    """After a refused call the current step is what it was before."""
    run, sink = memory_run()
    with run:
        run.log_metric("x", 1.0, step=4)
        with pytest.raises(InvalidValueError):
            run.log_metrics({"x": "bad"}, step=10)
        run.log_metric("x", 2.0)
    assert [(4, 1.0), (4, 2.0)] == points(sink, "x")


# --------------------------------------------------------------------------- file/folder clash


@pytest.mark.parametrize(("first", "second"), [("a", "a/b"), ("a/b", "a"), ("a/b/c", "a/b"), ("a", "a/b/c")])
@pytest.mark.parametrize("kind", ["metric", "param", "tag"])
def test_a_key_cannot_be_both_file_and_folder(kind: str, first: str, second: str) -> None:
    """`a` then `a/b` (or the reverse) is refused at the call for metrics, params and tags, naming both keys."""
    run, sink = memory_run()
    log: Callable[[str], None] = {
        "metric": lambda key: run.log_metric(key, 1.0),
        "param": lambda key: run.log_param(key, 1),
        "tag": lambda key: run.set_tag(key, 1),
    }[kind]
    with run:
        log(first)
        with pytest.raises(InvalidKeyError, match=f"{kind} key '{second}' is not allowed") as caught:
            log(second)
        assert repr(min(first, second, key=len)) in str(caught.value)
        log("a-sibling/b")  # unrelated keys still work
    written: dict[str, Any] = {"metric": sink.metrics, "param": sink.params, "tag": sink.tags}[kind]  # type: ignore[assignment]  # three dicts of different value types
    assert {first, "a-sibling/b"} <= set(written)
    assert second not in written


@pytest.mark.parametrize("kind", ["metric", "param", "tag"])
def test_a_clash_within_one_call_is_refused(kind: str, tmp_path: Path) -> None:
    """`{"a": .., "a/b": ..}` in one call is refused and nothing of it is written (it would wedge the writer)."""
    with steplog.start_run("clash", tracking_uri=tmp_path / "mlruns") as run:
        calls: dict[str, Callable[[dict[str, Any]], None]] = {
            "metric": run.log_metrics,
            "param": run.log_params,
            "tag": run.set_tags,
        }
        call = calls[kind]
        with pytest.raises(InvalidKeyError, match="both a file and a folder"):
            call({"a": 1.0, "a/b": 2.0})
        call({"ok": 1.0})
        run.flush()
    assert 0 == run.stats().errors


def test_metric_params_and_tags_are_separate_namespaces() -> None:
    """A metric `a` does not stop a param or tag `a/b` (they live in different folders)."""
    run, sink = memory_run()
    with run:
        run.log_metric("a", 1.0)
        run.log_param("a/b", 1)
        run.set_tag("a/b", 2)
    assert ["a"] == list(sink.metrics)
    assert {"a/b": "1"} == sink.params
    assert "2" == sink.tags["a/b"]


# --------------------------------------------------------------------------- params and tags


def test_params_are_immutable() -> None:
    """Logging a param again with another value raises ParamChangedError; the same text again is a no-op."""
    run, sink = memory_run()
    with run:
        run.log_params({"lr": 0.001, "layers": 3})
        run.log_param("lr", 1e-3)  # str() is the same: no-op
        run.log_param("layers", "3")
        with pytest.raises(ParamChangedError, match=re.escape("param 'lr' is already logged as '0.001'")) as caught:
            run.log_param("lr", 0.01)
        assert isinstance(caught.value, InvalidValueError)
        with pytest.raises(ParamChangedError):
            run.log_params({"new": 1, "layers": 4})  # all or nothing: 'new' is not logged either
        run.log_param("new", 2)  # 'new' was never logged, so 2 is its first value
    assert {"lr": "0.001", "layers": "3", "new": "2"} == sink.params


def test_tags_are_overwritten() -> None:
    """A tag set again takes the new value; values are stored as str()."""
    run, sink = memory_run()
    with run:
        run.set_tag("phase", "warmup")
        run.set_tags({"phase": "train", "n": 3, "none": None})
    assert "train" == sink.tags["phase"]
    assert "3" == sink.tags["n"]
    assert "None" == sink.tags["none"]  # str(None), as MLflow stores it


# --------------------------------------------------------------------------- identical points


def test_different_values_at_one_step_are_all_kept() -> None:
    """Several values of one key at one step (and one timestamp) all reach the sink, in order."""
    run, sink = memory_run()
    with run:
        for value in [1.0, 2.0, 1.5, -0.0, 0.0, float("inf")]:
            run.log_metric("x", value, step=3, timestamp=1_700_000_000_000)
    assert [1.0, 2.0, 1.5, -0.0, 0.0, float("inf")] == sink.values("x")


def test_identical_points_are_written_once_to_the_store(tmp_path: Path) -> None:
    """Identical points (same key, step, timestamp, value) land once in the metric file, even across flushes."""
    with steplog.start_run("dupes", tracking_uri=tmp_path / "mlruns") as run:
        for value in [1.0, 1.0, 2.0, 1.0, float("nan"), float("nan")]:
            run.log_metric("x", value, step=1, timestamp=1_700_000_000_000)
        run.flush()
        run.log_metric("x", 2.0, step=1, timestamp=1_700_000_000_000)  # identical to one already written
        run.log_metric("x", 2.0, step=1, timestamp=1_700_000_000_001)  # another timestamp: kept
        run.log_metric("x", 2.0, step=2, timestamp=1_700_000_000_001)  # another step: kept
    data = (tmp_path / "mlruns" / run.experiment_id / run.run_id / "metrics" / "x").read_bytes()
    steps, values, stamps, bad = parse_metric_lines(data)
    assert ["1.0", "2.0", "nan", "2.0", "2.0"] == [repr(v) for v in values]
    assert [1, 1, 1, 1, 2] == steps
    assert [1_700_000_000_000] * 3 + [1_700_000_000_001] * 2 == stamps
    assert 0 == bad


@pytest.mark.parametrize(
    ("first", "second"),
    [(-0.0, 0.0), (0.0, -0.0), (float("inf"), 1.7976931348623157e308), (-1.7976931348623157e308, float("-inf"))],
    ids=["-0.0 then 0.0", "0.0 then -0.0", "inf then max", "-max then -inf"],
)
def test_points_sql_cannot_tell_apart_are_written_once(first: float, second: float, tmp_path: Path) -> None:
    """Values MLflow's SQL store merges (-0.0 and 0.0; ±inf and ±max) at one step and timestamp are written once,
    so migrate-filestore's UNIQUE constraint accepts the store; the first spelling is kept."""
    with steplog.start_run("sql-same", tracking_uri=tmp_path / "mlruns") as run:
        run.log_metric("x", first, step=1, timestamp=1_700_000_000_000)
        run.log_metric("x", second, step=1, timestamp=1_700_000_000_000)
        run.log_metric("x", second, step=2, timestamp=1_700_000_000_000)  # another step: kept
    data = (tmp_path / "mlruns" / run.experiment_id / run.run_id / "metrics" / "x").read_bytes()
    steps, values, _stamps, _bad = parse_metric_lines(data)
    assert [1, 2] == steps
    assert [repr(first), repr(second)] == [repr(v) for v in values]


# --------------------------------------------------------------------------- stats and state


def test_stats_count_what_was_logged_and_written() -> None:
    """stats() counts logged, queued and written points; logged == written + queued + dropped."""
    run, _sink = memory_run(flush_interval=30.0)
    with run:
        run.flush()
        for i in range(100):
            run.log_metric("x", float(i))  # one step: no boundary, and the writer waits 30 s
        before = run.stats()
        run.flush()
        after = run.stats()
    assert (100, 100) == (before.logged, before.queued + before.written)
    assert (100, 100, 0, 0) == (after.logged, after.written, after.queued, after.dropped)
    assert after.flushes >= 1
    assert 0 == after.errors
    assert after.last_error is None
    final = run.stats()
    assert final.logged == final.written + final.queued + final.dropped


@pytest.mark.parametrize(
    "call",
    [
        lambda run: run.log_metric("x", 1.0),
        lambda run: run.log_metric("new", 1.0),
        lambda run: run.log_metrics({"x": 1.0}),
        lambda run: run.log_metric("x", 1.0, step=99),
        lambda run: run.log_param("p", 1),
        lambda run: run.set_tag("t", 1),
        lambda run: run.log_text("hi", "a.txt"),
    ],
    ids=["log_metric", "new key", "log_metrics", "new step", "log_param", "set_tag", "log_text"],
)
def test_logging_after_close_raises_run_state_error(call: object) -> None:
    """Every log call on a closed run raises RunStateError saying the run is closed and what to do."""
    run, sink = memory_run()
    with run:
        run.log_metric("x", 0.5)
    with pytest.raises(RunStateError, match=r"closed.*start a new run"):
        call(run)  # type: ignore[operator]
    assert [0.5] == sink.values("x")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_cannot_log_through_its_parents_run() -> None:
    """A forked child that logs through its parent's run gets a StepLogError naming both processes."""
    run, sink = memory_run()
    with run:
        run.log_metric("x", 1.0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what happened through the pipe, never return into pytest
            try:
                try:
                    run.log_metric("x", 2.0)
                    message = b"no error"
                except StepLogError as exc:
                    message = b"StepLogError: " + str(exc).encode()
                os.write(write_end, message)
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            text = pipe.read().decode()
        os.waitpid(pid, 0)
        run.log_metric("x", 3.0)  # the parent goes on
    assert text.startswith("StepLogError: this run belongs to process")
    assert str(os.getpid()) in text
    assert [1.0, 3.0] == sink.values("x")


# --------------------------------------------------------------------------- calls in flight at close


class _SlowFloat(float):
    """A value whose conversion blocks until released: its log call stays inside the buffer meanwhile."""

    entered: threading.Event
    release: threading.Event

    def __new__(cls, entered: threading.Event, release: threading.Event) -> _SlowFloat:
        return super().__new__(cls, 0.0)

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered = entered
        self.release = release

    def __float__(self) -> float:
        self.entered.set()
        self.release.wait(10)
        return 1.5


def test_a_call_inside_the_buffer_is_seen_in_flight_from_another_thread() -> None:
    """calls_in_flight() sees another thread's log call that has not returned, and not one that has."""
    from steplog._buffer import Buffer

    run, sink = memory_run()
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def log() -> None:
        try:
            run.log_metric("slow", _SlowFloat(entered, release), step=1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with run:
        assert not Buffer.calls_in_flight()
        thread = threading.Thread(target=log)
        thread.start()
        assert entered.wait(10)
        assert Buffer.calls_in_flight()
        release.set()
        thread.join(10)
        assert not Buffer.calls_in_flight()
    assert not errors
    assert points(sink, "slow") == [(1, 1.5)]


def test_close_does_not_sleep_when_no_call_is_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last drain waits only for calls in flight: none here, so close() asks for no sleep of 1 ms or more."""
    import anyio

    requested: list[float] = []
    real_sleep = anyio.sleep

    async def spy(delay: float) -> None:
        requested.append(delay)
        await real_sleep(delay)

    run, sink = memory_run()
    with run:
        run.log_metric("a", 1.0, step=0)
        monkeypatch.setattr(anyio, "sleep", spy)  # the writer calls anyio.sleep
    assert [d for d in requested if d >= 0.001] == []
    assert points(sink, "a") == [(0, 1.0)]


def test_a_log_metrics_call_partly_queued_when_the_run_closes_is_queued_whole() -> None:
    """All or nothing: once a call's first keys are in, a close beginning meanwhile lets the rest in too.

    The fast path queued "a", then found "b"'s column past its share just as close() sealed the
    buffer (``_cap`` -1): the rest of the call must be queued (the writer's last drain waits for
    calls in flight), not refused with RunStateError after "a" went in.
    """
    from steplog._buffer import Buffer

    buffer = Buffer()
    buffer.log_metrics({"a": 0.0, "b": 0.0}, step=0)
    buffer.seal("the run is closing")
    buffer._cols["a"] += (1, 1.0, 1)  # what the fast path queued before it met "b"
    buffer._log_metrics_rest({"a": 1.0, "b": 2.0}, "b", 1, 1)
    assert buffer._cols["b"][3:] == [1, 2.0, 1]
    with pytest.raises(RunStateError):  # a new call is refused as before
        buffer.log_metrics({"a": 3.0, "b": 3.0}, step=2)
