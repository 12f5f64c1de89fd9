"""Sink calls on steplog's daemon threads (``_threads.py``): reused, never blocking the loop, never joined."""

from __future__ import annotations

import threading

import anyio
import pytest

from steplog._threads import in_daemon_thread

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
