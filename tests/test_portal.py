"""The event-loop helpers of ``_portal.py``: naming the running loop, waking it from any thread, the thread host."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest

from _sinks import WAIT
from steplog import _portal
from steplog._portal import ThreadHost, current_loop, loop_scheduler


def _in_worker_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` on a plain thread (not the loop's) and wait for it."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------- current_loop


def test_current_loop_is_none_outside_an_event_loop() -> None:
    """Outside any event loop current_loop() returns None (it does not raise)."""
    assert current_loop() is None


@pytest.mark.anyio
async def test_current_loop_names_the_running_loop(anyio_backend: str) -> None:
    """Inside a loop current_loop() is the same object on every call: the asyncio loop, or trio's token."""
    loop = current_loop()
    assert loop is not None
    assert current_loop() is loop
    if anyio_backend == "trio":
        import trio

        assert loop is trio.lowlevel.current_trio_token()
    else:
        assert loop is asyncio.get_running_loop()


@pytest.mark.anyio
async def test_current_loop_is_none_on_another_thread_of_a_running_loop() -> None:
    """A worker thread of a running loop is not in that loop: current_loop() is None there."""
    seen = await anyio.to_thread.run_sync(current_loop)
    assert seen is None


def test_two_loops_have_different_identities() -> None:
    """Two event loops (one per thread) are told apart by current_loop()."""

    async def identity() -> object:
        return current_loop()

    first = anyio.run(identity)
    second = anyio.run(identity)
    assert first is not None
    assert second is not None
    assert first is not second


# ---------------------------------------------------------------------------- loop_scheduler


def test_loop_scheduler_needs_a_running_loop() -> None:
    """Outside an event loop loop_scheduler() raises RuntimeError (there is nothing to schedule into)."""
    with pytest.raises(RuntimeError):
        loop_scheduler()


@pytest.mark.anyio
async def test_loop_scheduler_runs_the_callback_in_the_loop_not_inline() -> None:
    """A callback scheduled from the loop's own thread runs at a later turn of that loop, not inside schedule()."""
    schedule = loop_scheduler()
    ran = anyio.Event()
    schedule(ran.set)
    assert not ran.is_set()  # nothing ran before this task yielded
    with anyio.fail_after(WAIT):
        await ran.wait()


@pytest.mark.anyio
async def test_loop_scheduler_wakes_the_loop_from_another_thread() -> None:
    """A callback scheduled from a plain thread runs on the loop's thread; schedule() returns without waiting for it."""
    schedule = loop_scheduler()
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    ran = anyio.Event()
    returned = threading.Event()

    def callback() -> None:
        ran_on.append(threading.get_ident())
        ran.set()

    def from_thread() -> None:
        schedule(callback)
        returned.set()

    _in_worker_thread(from_thread)  # the loop is blocked in join(): the callback cannot have run
    assert returned.is_set()
    assert ran_on == []
    with anyio.fail_after(WAIT):
        await ran.wait()
    assert ran_on == [loop_thread]


def test_an_asyncio_scheduler_of_a_closed_loop_does_nothing() -> None:
    """Once its asyncio loop has closed, the scheduler drops the callback and returns None instead of raising."""

    async def get() -> Callable[[Callable[[], object]], object]:
        return loop_scheduler()

    schedule = asyncio.run(get())
    calls: list[int] = []
    assert schedule(lambda: calls.append(1)) is None
    assert calls == []


def test_a_trio_scheduler_of_a_finished_run_does_nothing() -> None:
    """Once its trio run has returned, the scheduler drops the callback and returns None instead of raising."""
    import trio

    async def get() -> Callable[[Callable[[], object]], object]:
        return loop_scheduler()

    schedule = trio.run(get)
    calls: list[int] = []
    assert schedule(lambda: calls.append(1)) is None
    assert calls == []


# ---------------------------------------------------------------------------- ThreadHost


@pytest.fixture
def host() -> Iterator[ThreadHost]:
    """A started thread host, closed after the test."""
    started = ThreadHost(name="steplog-test-host")
    yield started
    started.close(timeout=WAIT)
    assert not started.thread.is_alive()


async def _where() -> int:
    return threading.get_ident()


def test_the_host_runs_a_daemon_thread_with_a_running_loop(host: ThreadHost) -> None:
    """After the constructor returns, the host's thread is a live daemon with the given name."""
    assert host.thread.is_alive()
    assert host.thread.daemon
    assert host.thread.name == "steplog-test-host"


def test_call_runs_the_coroutine_on_the_host_thread_and_returns_its_result(host: ThreadHost) -> None:
    """call(fn, *args) awaits fn(*args) in the host's loop (its thread) and returns the result."""

    async def add(a: int, b: int) -> tuple[int, int]:
        return a + b, threading.get_ident()

    total, thread = host.call(add, 2, 3)
    assert total == 5
    assert thread == host.thread.ident != threading.get_ident()


def test_call_raises_the_coroutines_exception(host: ThreadHost) -> None:
    """An exception raised by the coroutine is raised by call() in the calling thread."""

    async def fail() -> None:
        raise ValueError("injected")

    with pytest.raises(ValueError, match="injected"):
        host.call(fail)


def test_call_with_a_timeout_raises_timeout_error_and_cancels_the_task(host: ThreadHost) -> None:
    """call(..., timeout=t) gives up with TimeoutError and cancels the coroutine it started."""
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    with pytest.raises(TimeoutError):
        host.call(forever, timeout=0.05)
    assert cancelled.wait(WAIT)
    assert started.is_set()
    assert host.call(_where) == host.thread.ident  # the host still serves calls


def test_start_soon_runs_a_task_and_returns_its_future(host: ThreadHost) -> None:
    """start_soon(fn) returns at once with a future that completes with fn's result."""
    go = threading.Event()

    async def wait_for_go() -> str:
        await anyio.to_thread.run_sync(go.wait, WAIT)
        return "done"

    future = host.start_soon(wait_for_go)
    assert not future.done()
    go.set()
    assert future.result(WAIT) == "done"


def test_schedule_runs_a_callback_on_the_host_thread(host: ThreadHost) -> None:
    """host.schedule(fn) (what the buffer uses to wake the writer) runs fn on the host's thread."""
    ran_on: list[int] = []
    ran = threading.Event()

    def callback() -> None:
        ran_on.append(threading.get_ident())
        ran.set()

    host.schedule(callback)
    assert ran.wait(WAIT)
    assert ran_on == [host.thread.ident]


def test_calls_from_many_threads_are_all_served(host: ThreadHost) -> None:
    """Several threads calling at the same moment each get their own result from the host's loop."""
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, int] = {}

    async def echo(i: int) -> int:
        await anyio.lowlevel.checkpoint()
        return i

    def caller(i: int) -> None:
        barrier.wait(WAIT)
        results[i] = host.call(echo, i, timeout=WAIT)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert results == {i: i for i in range(n)}


def test_close_cancels_running_tasks_and_ends_the_thread() -> None:
    """close() cancels what still runs in the loop, stops it, and joins the host's thread; a second close is a no-op."""
    host = ThreadHost()
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    host.start_soon(forever)
    assert started.wait(WAIT)
    host.close(timeout=WAIT)
    assert cancelled.is_set()
    assert not host.thread.is_alive()
    host.close()


def test_close_from_the_hosts_own_thread_returns_instead_of_deadlocking(host: ThreadHost) -> None:
    """close() called inside the host's loop returns at once (it cannot join its own thread); the host still runs."""

    async def close_inside() -> None:
        host.close(timeout=WAIT)

    host.call(close_inside, timeout=WAIT)
    assert host.thread.is_alive()


def test_a_startup_failure_is_raised_by_the_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the host's loop fails while starting, ThreadHost() raises that error instead of hanging."""

    def broken() -> Callable[[Callable[[], object]], object]:
        raise RuntimeError("injected startup failure")

    monkeypatch.setattr(_portal, "loop_scheduler", broken)
    with pytest.raises(BaseException) as caught:
        ThreadHost()
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else (caught.value,)
    assert [str(e) for e in errors] == ["injected startup failure"]
