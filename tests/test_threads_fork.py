"""Threads and fork: many threads logging to one run lose nothing and keep per-key order; a forked child is refused.

The fork tests fork the pytest process itself (as a DataLoader worker forks a training script):
the child reports through a pipe and leaves with ``os._exit``, so it never runs pytest's teardown.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog import StepLogError, Store

THREADS = 8
PER_THREAD = 3000


def test_many_threads_keep_per_key_order_and_lose_nothing(store: Path) -> None:
    """Eight threads logging at once (own keys and one shared key, own steps) lose nothing and keep each order."""
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    with steplog.start_run("threads", tracking_uri=store, handle_signals=False, flush_interval=0.005) as run:

        def work(t: int) -> None:
            try:
                barrier.wait()
                for i in range(PER_THREAD):
                    run.log_metric(f"thread/{t}", float(i), step=i)
                    run.log_metric("shared", t * 1e6 + i, step=i)
                    if i % 500 == 0:
                        run.log_metrics({f"pair/{t}/a": float(i), f"pair/{t}/b": -float(i)}, step=i)
            except BaseException as exc:  # reported to the test below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert [] == errors
    reader = Store(store)
    for t in range(THREADS):
        history = reader.metric_history(run.run_id, f"thread/{t}")
        assert list(range(PER_THREAD)) == list(history.steps)
        assert [float(i) for i in range(PER_THREAD)] == list(history.values)
        assert [float(i) for i in range(0, PER_THREAD, 500)] == list(
            reader.metric_history(run.run_id, f"pair/{t}/a").values
        )
    shared = list(reader.metric_history(run.run_id, "shared").values)
    assert THREADS * PER_THREAD == len(shared)
    for t in range(THREADS):
        mine = [v - t * 1e6 for v in shared if t * 1e6 <= v < (t + 1) * 1e6]
        assert [float(i) for i in range(PER_THREAD)] == mine  # each thread's order, nothing lost or doubled
    stats = run.stats()
    expected = THREADS * (2 * PER_THREAD + 2 * (PER_THREAD // 500))
    assert (expected, expected, 0) == (stats.logged, stats.written, stats.queued)


def in_forked_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child and return what it reported (a JSON-able dict)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ warns about forking with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            report = body()
        except BaseException as exc:
            report = {"crashed": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert 0 == os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def refused(call: Callable[[], object]) -> str:
    """The StepLogError message ``call`` raises, or a note that it did not raise."""
    try:
        call()
    except StepLogError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "not refused"


def test_forked_child_is_refused_parent_unaffected_child_may_start_its_own_run(store: Path) -> None:
    """A forked child gets StepLogError from the parent's run; the parent's run stays whole; the child may log."""
    with steplog.start_run("fork", tracking_uri=store, handle_signals=False) as run:
        for step in range(100):
            run.log_metric("loss", float(step), step=step)

        def child() -> dict[str, Any]:
            report = {
                "log_metric": refused(lambda: run.log_metric("loss", 1.0, step=999)),
                "log_metric_new_key": refused(lambda: run.log_metric("from_child", 1.0)),
                "log_metrics": refused(lambda: run.log_metrics({"loss": 1.0})),
                "log_param": refused(lambda: run.log_param("child", 1)),
                "set_tag": refused(lambda: run.set_tag("child", 1)),
                "log_text": refused(lambda: run.log_text("x", "child.txt")),
                "flush": refused(run.flush),
            }
            with steplog.start_run("fork-child", tracking_uri=store, handle_signals=False) as own:
                own.log_metric("child_loss", 0.5, step=0)
            report["own_run"] = own.run_id
            return report

        report = in_forked_child(child)
        for step in range(100, 200):
            run.log_metric("loss", float(step), step=step)
    own_run = report.pop("own_run")
    for call, message in report.items():
        assert message.startswith("StepLogError: this run belongs to process"), (call, message)
        assert "a forked child" in message
        assert "start_run" in message
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    parent = client.get_run(run.run_id)
    assert "FINISHED" == parent.info.status
    assert {"loss": 199.0} == parent.data.metrics
    assert {} == parent.data.params
    assert list(range(200)) == [m.step for m in client.get_metric_history(run.run_id, "loss")]
    child_run = client.get_run(own_run)
    assert ("FINISHED", {"child_loss": 0.5}) == (child_run.info.status, child_run.data.metrics)


@pytest.mark.anyio
async def test_forked_child_of_an_async_run_is_refused(store: Path) -> None:
    """A child forked from inside ``async with`` is refused by the parent's run too, and the parent finishes."""
    async with steplog.start_run("fork", tracking_uri=store, handle_signals=False) as run:
        run.log_metric("loss", 1.0, step=0)
        report = in_forked_child(lambda: {"log_metric": refused(lambda: run.log_metric("loss", 2.0, step=1))})
        run.log_metric("loss", 3.0, step=2)
    assert report["log_metric"].startswith("StepLogError: this run belongs to process")
    assert [0, 2] == list(Store(store).metric_history(run.run_id, "loss").steps)
