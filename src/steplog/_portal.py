"""Hosting the writer on a background thread for sync callers (anyio's blocking portal).

:class:`ThreadHost` runs an event loop on a daemon thread with a
:class:`anyio.from_thread.BlockingPortal` in it; sync code calls coroutines in
that loop through the portal. The thread is a daemon so a stuck sink can never
keep the interpreter from exiting; ``close`` is bounded.

:func:`current_loop` names the running event loop (asyncio or trio), so a run can tell its
own loop from another. :func:`loop_scheduler` returns the cheapest non-blocking, thread-safe way to run
a callback in the current event loop (``call_soon_threadsafe`` on asyncio,
``run_sync_soon`` on trio): the buffer uses it to wake the writer at a step
boundary without a future or a round trip.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["ThreadHost", "current_loop", "loop_scheduler"]

T = TypeVar("T")


def current_loop() -> object | None:
    """The running event loop's identity (trio's token, or the asyncio loop), or None outside one."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token: object = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass  # not inside trio
        else:
            return token
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """A callable that schedules ``fn()`` in the running event loop from any thread, without waiting."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass  # not inside trio
        else:
            finished = trio.RunFinishedError

            def schedule_in_trio(fn: Callable[[], object]) -> object:
                try:
                    return token.run_sync_soon(fn)
                except finished:  # the run ended: nothing left to wake (as a closed asyncio loop)
                    return None

            return schedule_in_trio
    import asyncio

    loop = asyncio.get_running_loop()

    def schedule(fn: Callable[[], object]) -> object:
        try:
            return loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: nothing left to wake
            return None

    return schedule


class ThreadHost:
    """An event loop on a daemon thread, driven from sync code through a blocking portal."""

    def __init__(self, name: str = "steplog-writer") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._schedule: Callable[[Callable[[], object]], object] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            anyio.run(self._serve)
        except BaseException as exc:  # surfaced to the constructor when startup failed
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._schedule = loop_scheduler()
            self._ready.set()
            await portal.sleep_until_stopped()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def schedule(self) -> Callable[[Callable[[], object]], object]:
        assert self._schedule is not None
        return self._schedule

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        """Run ``await fn(*args)`` in the host loop and wait (at most ``timeout`` seconds) for its result."""
        assert self._portal is not None
        future: concurrent.futures.Future[T] = self._portal.start_task_soon(fn, *args)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> concurrent.futures.Future[Any]:
        """Start ``fn(*args)`` as a task in the host loop; return its future."""
        assert self._portal is not None
        return self._portal.start_task_soon(fn, *args)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the loop (cancelling what still runs) and join the thread, waiting at most ``timeout``."""
        portal = self._portal
        if portal is None or not self._thread.is_alive():
            return
        if threading.current_thread() is self._thread:
            return
        try:
            future = portal.start_task_soon(portal.stop, True)
            future.result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass
        self._thread.join(timeout)
