"""Sink calls off the event loop, on daemon threads of steplog's own.

anyio's worker threads are not daemons: the interpreter waits for them at exit. A sink stuck
forever in a blocking call, or a worker orphaned when a signal handler raised while the worker
was starting, would then keep the process from ever exiting. steplog's sink calls run on daemon
threads instead.

The threads are kept and reused: a sink writes once per ``flush_interval`` (20 times a second
by default), and starting a thread for each write cost the training loop more than the write's
own system calls (the start handshake passes the interpreter lock back and forth several
times, and ``Thread.start()`` blocks the event loop until the new thread runs). An idle
thread ends after :data:`IDLE_EXIT` seconds; a thread stuck in a sink is simply never reused,
and the next call gets another one. The result goes back to the event loop without the thread
waiting for the loop (``call_soon_threadsafe`` / trio's ``run_sync_soon``).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ["dispose_in_daemon_thread", "in_daemon_thread"]

T = TypeVar("T")

IDLE_EXIT = 5.0
"""Seconds an idle worker thread waits for the next call before it ends."""

Outcome = tuple[bool, Any]
Job = tuple[Callable[[], Any], Callable[[Outcome], None]]

_pool_lock = threading.Lock()
_idle: list[_Worker] = []


class _Worker(threading.Thread):
    """A daemon thread running sink calls one after another; back in the idle pool after each."""

    def __init__(self) -> None:
        super().__init__(name="steplog-sink-call", daemon=True)
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            try:
                fn, finish = self.jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with _pool_lock:
                    if self in _idle:  # nobody took this thread meanwhile: end it
                        _idle.remove(self)
                        return
                continue  # taken just now: its job is on the way
            try:
                outcome: Outcome = (True, fn())
            except BaseException as exc:  # handed to the awaiting task, raised there
                outcome = (False, exc)
            del fn
            with _pool_lock:  # back in the pool before the caller hears of it: its next call reuses this thread
                _idle.append(self)
            finish(outcome)
            del finish, outcome


def _submit(job: Job) -> None:
    with _pool_lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
        worker.jobs.put(job)
        worker.start()
    else:
        worker.jobs.put(job)


def _forget_pool_after_fork() -> None:
    """A forked child has none of its parent's threads: start from an empty pool."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _call_soon_in(token: anyio.lowlevel.EventLoopToken, fn: Callable[[], object]) -> None:
    """Schedule ``fn`` in the loop of ``token`` from another thread, without waiting for it."""
    native = token.native_token
    try:
        if isinstance(native, asyncio.AbstractEventLoop):
            native.call_soon_threadsafe(fn)
        elif hasattr(native, "run_sync_soon"):  # trio's TrioToken
            native.run_sync_soon(fn)
        else:
            anyio.from_thread.run_sync(fn, token=token)
    except Exception:  # the loop ended while the call ran: nobody waits for it any more
        pass


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on one of steplog's daemon threads and await its result.

    anyio's worker threads are not daemons: a sink stuck forever in a plain method would keep the
    interpreter from exiting after ``close()`` gave up on it. Here the thread is a daemon, and a
    cancelled wait abandons the call (as ``abandon_on_cancel`` does). Used for sink calls only.
    """
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    box: list[Outcome] = []

    def finish(outcome: Outcome) -> None:
        box.append(outcome)
        _call_soon_in(token, done.set)

    _submit((fn, finish))
    await done.wait()
    ok, value = box[0]
    if ok:
        result: T = value
        return result
    raise value


_DISPOSE_PART = 4096
"""Items freed per C call when disposing: a thread switch can fall between two parts."""


def _ignore(_outcome: Outcome) -> None:
    return None


def dispose_in_daemon_thread(columns: list[list[Any]], then: Callable[[], object] | None = None) -> None:
    """Drop written records on a sink-call thread, emptying big lists a part at a time.

    ``columns`` is a list of the caller's own making, which it no longer uses. Dropping the last
    reference to a list of 300,000 items frees them in one C call that holds the interpreter lock
    throughout: in an event loop, a 0.3 ms stall. Here a list is emptied in parts, and only when
    nothing else holds it (a sink may keep what it was given: then it is just dropped, and lives
    on as long as the sink keeps it). Nothing waits for this; ``then`` is called when it is done.
    """
    refcount = getattr(sys, "getrefcount", None)

    def free() -> None:
        while columns:
            items = columns.pop()
            if refcount is not None and refcount(items) == 2:  # this name and refcount's argument: ours alone
                while items:
                    del items[-_DISPOSE_PART:]
            del items
        if then is not None:
            then()

    _submit((free, _ignore))
