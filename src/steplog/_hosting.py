"""Where a run's writer runs, decided once when the run starts.

* :class:`ThreadHosting` (sync code: ``with``, or ``start_run()`` outside an event loop):
  the writer runs on a daemon thread with its own event loop, driven through anyio's
  blocking portal (:class:`~steplog._portal.ThreadHost`).
* :class:`LoopHosting` (``async with`` / ``await run.astart()``): the writer is a task in
  the caller's asyncio or trio loop; file I/O goes to worker threads so that loop never blocks.

Both offer the same small interface (:class:`Host`): ``flush``/``aflush`` (barriers) and
``close``/``aclose`` (run the run's finish in the writer's loop, then stop hosting), so
:class:`~steplog.Run` never asks which thread or loop it is called from. A refused
permission when the run is created is translated here, at the one place a run opens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from ._errors import RunStateError, StepLogError, WriteError
from ._portal import ThreadHost, current_loop, loop_scheduler
from ._records import RunInfo, RunStatus

if TYPE_CHECKING:
    from ._buffer import Buffer
    from ._writer import Writer
    from .typing import RunRequest

__all__ = [
    "Finish",
    "FinishSync",
    "Host",
    "LoopHosting",
    "Opener",
    "ThreadHosting",
    "attach_writer",
    "bounded",
    "check_usable",
    "now_ms",
    "open_run",
    "raise_if_unwritten",
    "unwritten_error",
    "writer_last_error",
    "writer_lost",
    "writer_pending",
]

T = TypeVar("T")

Finish = Callable[[RunStatus, float], Coroutine[Any, Any, None]]
"""The run's close path (drain, write, record the end), awaited in the writer's loop."""
FinishSync = Callable[[RunStatus, float], None]
"""The run's close path when no event loop can run it (the writer's loop is gone or interrupted)."""
Opener = Callable[["Writer", "RunRequest"], Coroutine[Any, Any, RunInfo]]
"""Opens the run in every sink (:func:`open_run`, or a resume that reads the run first)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------- the seam to buffer and writer
# Every call Run and the hosts make into the buffer's and the writer's wiring goes through these
# few functions, so the buffer-writer contract changes in one place.


def attach_writer(
    buffer: Buffer, writer: Writer, schedule: Callable[[Callable[[], object]], object], loop_thread: int | None
) -> None:
    """Wire the buffer to a started writer: how to wake it, whether it lives, which thread runs its loop."""
    wake = writer.wake

    def wake_writer() -> None:
        schedule(wake)

    buffer.attach_writer(
        wake=wake_writer,
        alive=lambda: writer.alive or not writer.started,
        loop_thread=loop_thread,
    )


def check_usable(buffer: Buffer) -> None:
    """Raise the buffer's own error when it refuses calls (closed, or a forked child)."""
    buffer.check_usable()


def writer_last_error(writer: Writer) -> BaseException | None:
    return writer.last_error


def writer_pending(writer: Writer) -> bool:
    """True while records are not acknowledged by every sink."""
    return writer.pending


def raise_if_unwritten(writer: Writer) -> None:
    writer.raise_if_unwritten()


def writer_lost(writer: Writer) -> int:
    """Records a sink refused for good (such a run does not end FINISHED)."""
    return writer.lost


# ---------------------------------------------------------------------------- opening


async def open_run(writer: Writer, request: RunRequest) -> RunInfo:
    """Create the run in every sink; a refused permission becomes a StepLogError saying how to fix it."""
    try:
        return await writer.open(request)
    except OSError as exc:
        denied = _denied(exc)
        if denied is None:
            raise
        raise _permission_error(denied) from exc


def _denied(exc: BaseException) -> OSError | None:
    """The permission error behind ``exc`` (a sink may wrap it in a WriteError), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PermissionError) or (
            isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        ):
            return seen
        seen = seen.__cause__
    return None


def _permission_error(exc: OSError) -> StepLogError:
    path = os.fsdecode(exc.filename) if exc.filename is not None else None
    if exc.errno == errno.EROFS:
        why = f"{path!r} is on a read-only file system" if path else "the file system is read-only"
        fix = "choose a tracking_uri on a writable disk"
    else:
        folder = repr(os.path.dirname(os.path.abspath(path))) if path else "the store's folder"
        who = _user()
        why = f"permission denied writing {path!r}" if path else "permission denied"
        fix = (
            f"give {who} write and execute permission on {folder} (e.g. `chmod u+wx` as its owner), "
            "or choose a tracking_uri (or STEPLOG_TRACKING_URI) in a folder you can write to"
        )
    return StepLogError(f"steplog cannot create the run: {why}; {fix}")


def _user() -> str:
    try:
        import getpass

        return f"the user {getpass.getuser()!r}"
    except Exception:  # no user name (a container with an unknown uid): say it plainly
        return "this process's user"


# ---------------------------------------------------------------------------- the hosts


class Host(Protocol):
    """Where the writer runs; what :class:`~steplog.Run` delegates its barriers and its close to."""

    def check_blocking(self, what: str, instead: str) -> None:
        """Raise RunStateError when a blocking call would block the writer's own event loop."""

    def flush(self, timeout: float | None) -> None:
        """Block until everything logged before the call is written."""

    async def aflush(self, timeout: float | None) -> None:
        """Wait, without blocking the caller's event loop, until everything logged before is written."""

    def close(self, status: RunStatus, timeout: float) -> None:
        """Run the finish in the writer's loop, then stop hosting (bounded by ``timeout``)."""

    async def aclose(self, status: RunStatus, timeout: float) -> None:
        """Like :meth:`close`, awaited."""

    async def aleave(self) -> None:
        """After a close from another thread: let the task that started the run leave what it entered."""

    def interrupt_soon(self) -> None:
        """From a signal handler: have the writer's loop call ``Writer.interrupt()`` (a close is under way)."""


class ThreadHosting:
    """The writer on a daemon thread with its own event loop (sync code)."""

    def __init__(self, host: ThreadHost, writer: Writer, finish: Finish) -> None:
        self._host = host
        self._writer = writer
        self._finish = finish

    @classmethod
    def start(
        cls, writer: Writer, buffer: Buffer, request: RunRequest, finish: Finish, opener: Opener = open_run
    ) -> tuple[ThreadHosting, RunInfo]:
        """Start the thread, open the run in every sink, start the writer; the run's identity."""
        host = ThreadHost()
        try:
            attach_writer(buffer, writer, host.schedule, loop_thread=None)  # no caller runs on the writer's thread
            info = host.call(opener, writer, request)
        except BaseException:
            host.close()
            raise
        host.start_soon(writer.run)
        return cls(host, writer, finish), info

    def check_blocking(self, what: str, instead: str) -> None:
        return None  # the writer's loop has a thread of its own: a caller never blocks it

    def flush(self, timeout: float | None) -> None:
        host, barrier = self._host, self._writer.barrier
        try:
            if timeout is None:
                host.call(barrier)
            else:
                bounded(lambda: host.call(barrier, timeout=timeout), timeout + 1.0)
        except TimeoutError:
            raise self._writer.timeout_error("flush()", timeout) from None

    async def aflush(self, timeout: float | None) -> None:
        await anyio.to_thread.run_sync(self.flush, timeout)

    def close(self, status: RunStatus, timeout: float) -> None:
        host = self._host
        stuck = False
        try:
            bounded(lambda: host.call(self._finish, status, timeout, timeout=timeout + 5.0), timeout + 2.0)
        except TimeoutError:
            stuck = True
            raise self._writer.timeout_error("close()", timeout) from None
        finally:
            try:
                bounded(lambda: host.close(timeout=2.0), 0.2 if stuck else 3.0)
            except TimeoutError:
                pass  # the loop is stuck in a sink: its daemon thread is abandoned, never joined

    async def aclose(self, status: RunStatus, timeout: float) -> None:
        await anyio.to_thread.run_sync(self.close, status, timeout)

    async def aleave(self) -> None:
        return None

    def interrupt_soon(self) -> None:
        self._host.schedule(self._writer.interrupt)

    def finish_interrupted(self, status: RunStatus, timeout: float) -> None:
        """Run the finish from a signal handler that interrupted a close before it reached the writer."""
        self._host.call(self._finish, status, timeout, timeout=timeout + 5.0)


class LoopHosting:
    """The writer as a task in the caller's event loop (asyncio or trio)."""

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        task_group: anyio.abc.TaskGroup,
        writer: Writer,
        finish: Finish,
        finish_sync: FinishSync,
    ) -> None:
        self._stack = stack
        self._task_group = task_group
        self._writer = writer
        self._finish = finish
        self._finish_sync = finish_sync
        self._token = anyio.lowlevel.current_token()
        self._loop = current_loop()
        self._loop_thread = threading.get_ident()
        self._schedule = loop_scheduler()
        self._left_open = False  # set by a close from another thread (see aleave)

    @classmethod
    async def start(
        cls,
        writer: Writer,
        buffer: Buffer,
        request: RunRequest,
        finish: Finish,
        finish_sync: FinishSync,
        opener: Opener = open_run,
    ) -> tuple[LoopHosting, RunInfo]:
        """Open the run in every sink and start the writer in the current loop; the run's identity."""
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            task_group = await stack.enter_async_context(anyio.create_task_group())
            attach_writer(buffer, writer, loop_scheduler(), loop_thread=threading.get_ident())
            info = await opener(writer, request)
        except BaseException:
            await stack.aclose()
            raise
        hosting = cls(stack, task_group, writer, finish, finish_sync)
        await task_group.start(writer.run)  # running before we return (see Writer.run)
        return hosting, info

    def _check_writer(self, what: str) -> None:
        if not self._writer.alive:
            raise RunStateError(
                f"{what}: this run's writer is not running: the event loop it ran in ended without closing "
                "the run (leave `async with run` or `await run.aclose()` in that loop). Nothing more is "
                "written through it: call run.close() or `await run.aclose()` to write what is left and end the run"
            )

    def check_blocking(self, what: str, instead: str) -> None:
        if self._loop_thread == threading.get_ident() and self._writer.alive:
            raise RunStateError(f"{what} would block the event loop that this run's writer runs in: use `{instead}`")

    def flush(self, timeout: float | None) -> None:
        self.check_blocking("flush()", "await run.aflush()")
        self._check_writer("flush()")
        anyio.from_thread.run(self._abarrier, timeout, token=self._token)

    async def aflush(self, timeout: float | None) -> None:
        self._check_writer("aflush()")
        if current_loop() is self._loop:
            await self._abarrier(timeout)
        else:  # another thread's loop: wait in a worker thread for the run's own loop
            await anyio.to_thread.run_sync(self.flush, timeout)

    async def _abarrier(self, timeout: float | None) -> None:
        with anyio.move_on_after(timeout) as scope:
            await self._writer.barrier()
        if scope.cancelled_caught:
            raise self._writer.timeout_error("flush()", timeout)

    def close(self, status: RunStatus, timeout: float) -> None:
        """From a thread other than the loop's: finish in the writer's loop, or without it if the loop is gone.

        The writer's task group stays open: exiting it from any task but the one that entered it
        corrupts asyncio's and trio's cancel scopes. That task's ``aclose()`` (or the end of its
        ``async with``) exits it (:meth:`aleave`).
        """
        if not self._writer.alive:
            self._finish_sync(status, timeout)
            return
        self._left_open = True
        anyio.from_thread.run(self._finish, status, timeout, token=self._token)

    async def aclose(self, status: RunStatus, timeout: float) -> None:
        if current_loop() is not self._loop:
            # another loop: the run's own loop runs in another thread, or ended (its writer with it)
            await anyio.to_thread.run_sync(self.close, status, timeout)
            return
        finished = False
        try:
            if self._writer.alive:
                await self._finish(status, timeout)
            else:  # the writer task ended (its loop is shutting down, or it failed): write without it
                self._finish_sync(status, timeout)
            finished = True
        except StepLogError:
            finished = True  # the close ran and reports what it could not write
            raise
        finally:
            self._task_group.cancel_scope.cancel()
            try:
                await _interrupts_as_the_caller_would_see_them(self._stack.aclose())
            finally:
                if not finished:
                    # cancelled or interrupted mid-close (e.g. trio delivering KeyboardInterrupt into
                    # the writer task): write what is left and the end through the sync path, bounded
                    self._finish_sync(status, timeout)

    def interrupt_soon(self) -> None:
        self._schedule(self._writer.interrupt)

    async def aleave(self) -> None:
        if self._left_open and current_loop() is self._loop:
            self._left_open = False
            await self._stack.aclose()


def bounded(fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn()`` on a daemon thread and wait at most ``timeout`` seconds for it (TimeoutError after).

    The blocking portal's calls wait for the writer's event loop to pick them up, so a
    sink that blocks that loop (a sync call inside ``async def write``) would hang the
    caller forever; a barrier with a timeout and ``close()`` must stay bounded anyway.
    """
    box: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            box.set_result(fn())
        except BaseException as exc:  # handed to the caller, whatever it is
            box.set_exception(exc)

    threading.Thread(target=target, name="steplog-call", daemon=True).start()
    try:
        return box.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError from None


def unwritten_error(writer: Writer) -> WriteError | None:
    """What a closed run left unwritten, as the error a barrier raises (None when everything is written)."""
    if not writer_pending(writer):
        return None
    cause = writer_last_error(writer)
    if cause is not None:
        try:
            raise_if_unwritten(writer)
        except WriteError as exc:
            return exc
    return WriteError(f"the run closed with {writer.unwritten_summary()} not written (close() gave up)")


async def _interrupts_as_the_caller_would_see_them(closing: Awaitable[None]) -> None:
    """Await the writer's task group closing; a Ctrl-C that trio delivered into a writer task comes out
    as the bare KeyboardInterrupt it would have been in the caller's own task (an exception group of
    KeyboardInterrupts alone would end the process with status 1, not as SIGINT does)."""
    try:
        await closing
    except BaseExceptionGroup as group:
        interrupts, rest = group.split(KeyboardInterrupt)
        if interrupts is not None and rest is None:
            raise KeyboardInterrupt from group
        raise
