"""The one background loop: wait for a trigger, drain, hand batches to sinks, retry, record errors.

The writer is a single anyio task. It sleeps until a step boundary wakes it (at
most one wake-up per sleep) or ``flush_interval`` passes, keeps at least
``flush_interval`` between two writes unless a barrier or close is waiting, then
drains the buffer and gives every sink the same batch. A batch a sink could not
finish stays in the writer, in order, and is retried with capped backoff before
anything newer is drained for that sink; meanwhile the buffer fills up to
``max_buffer`` and ``on_full`` applies. Errors are kept, counted, logged, and
raised as :class:`~steplog.WriteError` at the next barrier or close that finds
data unwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import FlushTimeoutError, WriteError
from ._records import ArtifactRecord, RunInfo, RunStatus, Stats
from .typing import Batch, RunRequest, Sink

if TYPE_CHECKING:
    from ._buffer import Buffer, Event
    from ._tensors import DeviceValues

__all__ = ["Writer"]

log = logging.getLogger("steplog")

_MAX_BACKOFF = 5.0


@dataclasses.dataclass(slots=True)
class _Work:
    """One drained slice: a batch per sink (None once that sink finished it)."""

    batches: list[Batch | None]
    points: int
    params: int
    oldest_ms: int

    def finished(self) -> bool:
        return all(b is None for b in self.batches)


_SWITCH_INTERVAL = 0.0005
_switching_lock = threading.Lock()
_switching_users = 0
_switching_saved = 0.0


@contextlib.contextmanager
def _eager_switching() -> Iterator[None]:
    """Shorten the interpreter's thread switch interval while a write cycle runs.

    Each ``os.write`` lets the training loop take the interpreter lock back, and the writer
    then waits a whole switch interval (5 ms by default) for it again: with 20 metric files
    a cycle took over 100 ms and the flush deadline slipped. While any run writes, the
    interval is at most 0.5 ms; the number of switches stays the same (one per system call),
    only the waits get shorter. The user's own setting is restored after the last writer's
    cycle, unless the user changed it meanwhile.
    """
    global _switching_users, _switching_saved
    with _switching_lock:
        if _switching_users == 0:
            _switching_saved = sys.getswitchinterval()
            if _switching_saved > _SWITCH_INTERVAL:
                sys.setswitchinterval(_SWITCH_INTERVAL)
        _switching_users += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching_users -= 1
            # restored unless the user changed it meanwhile
            restore = _switching_saved > _SWITCH_INTERVAL and abs(sys.getswitchinterval() - _SWITCH_INTERVAL) < 1e-9
            if _switching_users == 0 and restore:
                sys.setswitchinterval(_switching_saved)


class Writer:
    """Moves records from a :class:`~steplog._buffer.Buffer` to sinks; runs as one anyio task."""

    def __init__(self, buffer: Buffer, sinks: Sequence[Sink], *, flush_interval: float) -> None:
        self._buffer = buffer
        self._sinks = list(sinks)
        self._interval = flush_interval
        self._pending: deque[_Work] = deque()
        self._pending_points = 0
        self._barriers: list[anyio.Event] = []
        # anyio events need a running loop: created in open(), which runs in the writer's loop
        self._wake_event: anyio.Event = None  # type: ignore[assignment]
        self._finished: anyio.Event = None  # type: ignore[assignment]
        self._stopping = False
        self._running = False
        self._retry_at = 0.0
        self._last_drain_ms = int(time.time() * 1000)  # nothing can be logged before the writer exists
        self._backoff = 0.0
        # statistics (written only by the writer task)
        self._written = 0
        self._flushes = 0
        self._last_latency = 0.0
        self._max_latency = 0.0
        self._retries = 0
        self._errors = 0
        self._last_error: BaseException | None = None
        self._unreported: BaseException | None = None
        self.info: RunInfo | None = None
        self.deferred: DeviceValues | None = None
        """Device tensors logged as values (set by the run); resolved only once a key got one."""
        buffer.pending_records = self._pending_count

    # ------------------------------------------------------------------ lifecycle

    async def open(self, request: RunRequest) -> RunInfo:
        """Create the run in every sink (the first sink's identity is the run's)."""
        self._wake_event = anyio.Event()
        self._finished = anyio.Event()
        info = await self._sinks[0].open(request)
        for sink in self._sinks[1:]:
            await sink.open(dataclasses.replace(request, run_id=info.run_id))
        self.info = info
        return info

    def wake(self) -> None:
        """Wake the loop now (call from the writer's own event loop thread)."""
        if self._wake_event is not None:
            self._wake_event.set()

    @property
    def alive(self) -> bool:
        return self._running and not self._finished.is_set()

    @property
    def started(self) -> bool:
        return self._running

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer task: loop until :meth:`stop` has been asked and everything is handled.

        Start it with ``task_group.start`` so that it is running (and :meth:`stop` waits for it)
        before the caller goes on: a body that never awaits may close the run at once.
        """
        self._running = True
        task_status.started()
        buffer = self._buffer
        last_write = -math.inf
        try:
            while True:
                if not (self._stopping or self._barriers):
                    buffer.asleep = True
                    with anyio.move_on_after(self._interval):
                        await self._wake_event.wait()
                    buffer.asleep = False
                    self._wake_event = anyio.Event()
                    # least flush_interval between two writes, unless a barrier or close is waiting
                    delay = last_write + self._interval - time.monotonic()
                    if delay > 0 and not (self._stopping or self._barriers):
                        with anyio.move_on_after(delay):
                            await self._wake_event.wait()
                        self._wake_event = anyio.Event()
                buffer.tick()
                barriers, self._barriers = self._barriers, []
                with _eager_switching():
                    wrote = await self._cycle(force=bool(barriers) or self._stopping)
                if wrote:
                    last_write = time.monotonic()
                for event in barriers:
                    event.set()
                if self._stopping and not self._has_work():
                    break
                if self._stopping and self._pending and not barriers:
                    # close keeps retrying until its own timeout cancels it
                    await anyio.sleep(min(max(self._backoff, 0.01), _MAX_BACKOFF))
        finally:
            buffer.asleep = False
            self._finished.set()
            for event in self._barriers:
                event.set()
            buffer.notify_drained()

    def _has_work(self) -> bool:
        b = self._buffer
        return bool(self._pending) or b.queued() > 0 or b.has_events()

    async def _cycle(self, *, force: bool) -> bool:
        """Retry what is pending, then drain and write what is new; True if anything was written."""
        wrote = False
        if self._pending:
            if not force and time.monotonic() < self._retry_at:
                return False
            wrote = await self._retry()
            if self._pending:
                return wrote
        metrics, events = self._buffer.drain()
        deferred = self.deferred
        if deferred is not None and deferred.keys:  # device values become floats before sinks see them
            metrics = await deferred.resolve(
                metrics, wait=force, on_hold=lambda: self._buffer.set_pending(self._pending_count())
            )
        if metrics or events:
            work = self._make_work(metrics, events)
            self._pending.append(work)
            with self._buffer.count_lock:  # hand the drained records over without stats() seeing them twice
                self._pending_points += work.points
                self._buffer.set_pending(self._pending_count())  # the buffer's room shrinks by what we hold
            wrote = await self._retry() or wrote
        else:
            self._buffer.set_pending(self._pending_count())  # what drain() took is counted (none, or deferred)
        self._buffer.notify_drained()
        return wrote

    def _make_work(self, metrics: list[tuple[str, list[Any]]], events: list[Event]) -> _Work:
        params: list[tuple[str, str]] = []
        tags: list[tuple[str, str]] = []
        artifacts: list[ArtifactRecord] = []
        for kind, a, b in events:
            if kind == "param":
                params.append((a, b))
            elif kind == "tag":
                tags.append((a, b))
            else:
                artifacts.append(a)
        # Latency counts from the oldest record's stamp, but never from before the previous drain
        # (anything older was drained then) nor from the future: a caller-given timestamp may be
        # anything, and must not turn into a flush latency of years.
        now = int(time.time() * 1000)
        first = min((items[0] for _k, items in metrics), default=now)
        oldest = min(max(first, self._last_drain_ms), now)
        self._last_drain_ms = now
        batches: list[Batch | None] = [
            Batch(metrics=metrics, params=params, tags=tags, artifacts=artifacts) for _ in self._sinks
        ]
        points = sum(len(items) for _k, items in metrics) // 3
        return _Work(batches=batches, points=points, params=len(params), oldest_ms=oldest)

    async def _retry(self) -> bool:
        """Give each sink its pending batches in order; a sink stops at its first failure."""
        wrote = False
        failed: set[int] = set()
        for work in list(self._pending):
            for i, batch in enumerate(work.batches):
                if batch is None or i in failed:
                    continue
                try:
                    await self._sinks[i].write(batch)
                except Exception as exc:  # a sink's failure is data for the user, not a crash of the run
                    failed.add(i)
                    self._record_error(exc)
                    continue
                work.batches[i] = None
            if work.finished():
                self._pending.remove(work)
                with self._buffer.count_lock:  # written and pending change together for stats()
                    self._written += work.points
                    self._pending_points -= work.points
                    self._buffer.set_pending(self._pending_count())
                self._flushes += 1
                wrote = True
                latency = max(0.0, time.time() - work.oldest_ms / 1000)
                self._last_latency = latency
                self._max_latency = max(self._max_latency, latency)
        if failed:
            self._backoff = min(max(self._backoff * 2, self._interval), _MAX_BACKOFF)
            self._retry_at = time.monotonic() + self._backoff
            self._retries += 1
        else:
            self._backoff = 0.0
        return wrote

    def _record_error(self, exc: BaseException) -> None:
        self._errors += 1
        self._last_error = exc
        self._unreported = exc
        log.warning("steplog: write failed (will retry; data kept in memory): %s", exc)

    # ------------------------------------------------------------------ barriers and stop

    async def barrier(self) -> None:
        """Return once everything logged before the call is written; raise WriteError if it cannot be."""
        if self._finished is None or self._finished.is_set():
            # stopped: nothing more will be written (a writer started but not yet running still
            # takes the barrier at its first cycle)
            self._raise_if_unwritten()
            return
        event = anyio.Event()
        self._barriers.append(event)
        self._wake_event.set()
        await event.wait()
        self._raise_if_unwritten()

    def _raise_if_unwritten(self) -> None:
        if self._pending:
            exc = self._last_error
            error = WriteError(
                f"steplog could not write {self.unwritten_summary()}: {exc}"
                " (kept in memory and retried; check the disk or the server)"
            )
            if isinstance(exc, OSError):  # keep errno and filename for code that inspects them
                error.errno, error.filename = exc.errno, exc.filename
            raise error from exc

    async def stop(self) -> None:
        """Write everything (retrying while the caller's deadline allows), then end the loop."""
        self._stopping = True
        self._wake_event.set()
        if self._running:
            await self._finished.wait()

    async def close_sinks(self, status: RunStatus, end_time: int) -> None:
        """Record the final status in every sink (after :meth:`stop`)."""
        first: BaseException | None = None
        for sink in self._sinks:
            try:
                await sink.close(status, end_time)
            except Exception as exc:  # keep closing the other sinks; report the first failure
                self._record_error(exc)
                first = first or exc
        if first is not None:
            raise WriteError(f"steplog could not record the run's end: {first}") from first

    def emergency_flush(self, status: RunStatus | None, end_time: int, *, timeout: float | None = None) -> None:
        """Write what is queued through the sinks' sync path (no event loop can run here).

        Bounded by ``timeout``: the work runs on a daemon thread, so a sink stuck in
        ``write_sync`` cannot hang a signal handler or the interpreter's exit; what is
        still unwritten then is logged and kept in ``stats().last_error``.
        """
        if timeout is None:
            self._emergency_flush(status, end_time)
            return
        thread = threading.Thread(
            target=self._emergency_flush, args=(status, end_time), name="steplog-emergency", daemon=True
        )
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self._errors += 1
            self._last_error = self._unreported = TimeoutError(f"the run's end timed out after {timeout} s")
            log.error("steplog: giving up after %s s with %s not written", timeout, self.unwritten_summary())

    def _emergency_flush(self, status: RunStatus | None, end_time: int) -> None:
        metrics, events = self._buffer.drain()
        deferred = self.deferred
        if deferred is not None and deferred.keys:
            metrics = deferred.resolve_blocking(metrics)
        if metrics or events:
            work = self._make_work(metrics, events)
            self._pending.append(work)
            self._pending_points += work.points
        self._buffer.set_pending(self._pending_count())
        for work in list(self._pending):
            for i, batch in enumerate(work.batches):
                if batch is None:
                    continue
                try:
                    self._sinks[i].write_sync(batch)
                    work.batches[i] = None
                except Exception as exc:  # best effort: report, keep going
                    self._record_error(exc)
            if work.finished() and work in self._pending:
                self._pending.remove(work)
                self._pending_points -= work.points
                self._written += work.points
        if status is not None:
            for sink in self._sinks:
                try:
                    sink.close_sync(status, end_time)
                except Exception as exc:  # best effort at exit
                    self._record_error(exc)

    def timeout_error(self, what: str, timeout: float | None) -> FlushTimeoutError:
        """The error for a barrier or close that ran out of time, naming what is unwritten."""
        return FlushTimeoutError(f"{what} timed out after {timeout} s with {self.unwritten_summary()} not yet written")

    def unwritten_summary(self) -> str:
        """Human-readable account of what is not written yet, by key."""
        per_key: dict[str, int] = {}
        params = 0
        for work in self._pending:
            batch = next((b for b in work.batches if b is not None), None)
            if batch is None:
                continue
            for key, items in batch.remaining().metrics:
                per_key[key] = per_key.get(key, 0) + len(items) // 3
            params += len(batch.remaining().params)
        for key, n in self._buffer.queued_by_key().items():
            per_key[key] = per_key.get(key, 0) + n
        if self.deferred is not None:
            for key, n in self.deferred.held_by_key().items():
                per_key[key] = per_key.get(key, 0) + n
        total = sum(per_key.values())
        shown = ", ".join(f"{k!r}: {n}" for k, n in sorted(per_key.items(), key=lambda kv: -kv[1])[:10])
        more = "" if len(per_key) <= 10 else f", and {len(per_key) - 10} more keys"
        text = f"{total} metric points ({shown}{more})" if total else "0 metric points"
        if params:
            text += f" and {params} params"
        return text

    def _pending_count(self) -> int:
        if self.deferred is not None:
            return self._pending_points + self.deferred.held_points
        return self._pending_points

    def stats(self) -> Stats:
        buffer = self._buffer
        deferred = self.deferred
        with buffer.count_lock:  # one consistent snapshot of the counts the writer hands over
            queued = buffer.queued()
            written = self._written
            dropped = buffer.dropped + (deferred.dropped if deferred is not None else 0)
        return Stats(
            logged=written + queued + dropped,
            written=written,
            queued=queued,
            dropped=dropped,
            flushes=self._flushes,
            bytes_written=sum(getattr(sink, "bytes_written", 0) for sink in self._sinks),
            last_flush_latency=self._last_latency,
            max_flush_latency=self._max_latency,
            retries=self._retries,
            errors=self._errors,
            last_error=None if self._last_error is None else str(self._last_error),
            blocking_reads=deferred.blocking_reads if deferred is not None else 0,
        )
