"""Sink calls off the event loop, on daemon threads of steplog's own.

anyio's worker threads are not daemons: the interpreter waits for them at exit. A sink stuck
forever in a blocking call, or a worker orphaned when a signal handler raised while the worker
was starting, would then keep the process from ever exiting. steplog's sink calls run on daemon
threads instead (a thread start costs tens of µs, once per write of a sink).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ["in_daemon_thread"]

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a daemon thread of its own and await its result.

    anyio's worker threads are not daemons: a sink stuck forever in a plain method would keep the
    interpreter from exiting after ``close()`` gave up on it. Here the thread is a daemon, and a
    cancelled wait abandons the call (as ``abandon_on_cancel`` does). Used for sink calls only: a
    thread start costs tens of µs, once per write of a sink.
    """
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the awaiting task, raised there
            outcome.append((False, exc))
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except Exception:  # the loop ended while the call ran: nobody waits for it any more
            pass

    threading.Thread(target=target, name="steplog-sink-call", daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if ok:
        result: T = value
        return result
    raise value
