"""Sink calls on steplog's daemon threads (``_threads.py``): reused, never blocking the loop, never joined."""

from __future__ import annotations

import threading
from typing import SupportsIndex

import anyio
import pytest

from steplog._threads import dispose_in_daemon_thread, in_daemon_thread

pytestmark = pytest.mark.anyio


async def test_calls_run_on_a_daemon_thread_that_is_reused() -> None:
    """Consecutive calls run off the loop's thread, on a daemon thread, the same one each time."""
    seen: list[threading.Thread] = []
    for _ in range(5):
        seen.append(await in_daemon_thread(threading.current_thread))
    assert all(t is not threading.current_thread() for t in seen)
    assert all(t.daemon for t in seen)
    assert len(set(seen)) == 1  # one idle worker, reused (starting a thread per write cost the training loop)


async def test_a_call_stuck_in_a_sink_does_not_hold_up_the_next() -> None:
    """A call that never returns keeps its thread; the next call gets another one and completes."""
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> str:
        entered.set()
        release.wait(10)
        return "late"

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_daemon_thread, stuck)
        await anyio.to_thread.run_sync(entered.wait, 10)
        assert await in_daemon_thread(lambda: 42) == 42
        tg.cancel_scope.cancel()  # the stuck call is abandoned (the wait is cancelled)
    release.set()


async def test_an_exception_reaches_the_awaiting_task() -> None:
    """What the call raises is raised in the task that awaited it."""

    def fail() -> None:
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        await in_daemon_thread(fail)
    assert await in_daemon_thread(lambda: "after") == "after"  # the thread is back in the pool


class _CountingList(list[float]):
    """A list that counts slice deletions (how dispose_in_daemon_thread empties it)."""

    def __init__(self, items: list[float], deletions: list[object]) -> None:
        super().__init__(items)
        self.deletions = deletions

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        self.deletions.append(index)
        super().__delitem__(index)


def test_written_records_are_freed_off_the_loop_in_parts() -> None:
    """A list nobody else holds is emptied on a pool thread, a part at a time (never one long C call)."""
    deletions: list[object] = []
    done = threading.Event()
    dispose_in_daemon_thread([_CountingList([1.0] * 10_000, deletions)], then=done.set)
    assert done.wait(10)
    assert len(deletions) >= 2


def test_records_a_sink_still_holds_are_left_as_they_are() -> None:
    """A list someone else still references (a sink that kept its batch) is only dropped, never emptied."""
    deletions: list[object] = []
    kept = _CountingList([2.0] * 10, deletions)
    done = threading.Event()
    dispose_in_daemon_thread([kept], then=done.set)
    assert done.wait(10)
    assert kept == [2.0] * 10
    assert deletions == []
