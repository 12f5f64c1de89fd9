"""The background writer: wait for a trigger, drain, hand batches to every sink, retry, record errors.

The contract between the buffer, the writer and the sinks (the one place it is written down):

* **Hot path** (``Buffer.log_metric``/``log_metrics``, any thread): appends to a key's column
  and reads ``Buffer._cap``, ``_step``, ``_ts``, ``asleep``; at a step boundary it may call
  the ``wake`` given to :meth:`Buffer.attach_writer`. It takes no lock and touches nothing
  of the writer's.
* **Buffer side, slow paths** (any thread): new keys, params, ``on_full`` under
  ``Buffer._lock``; waits for room on ``Buffer._drained``.
* **Counts** move between the buffer and the writer only under ``Buffer.count_lock``:
  :meth:`Buffer.drain` counts what it takes (``_in_drain``) as it takes it; the writer
  hands them over with :meth:`Buffer.set_pending` in the same locked block in which it
  adds them to ``_pending_points``; a finished slice moves from ``_pending_points`` to
  ``_written``/``_lost`` under the same lock. :meth:`Writer.stats` reads all of them
  under it, so ``logged == written + queued + dropped + lost`` in every snapshot.
* **The writer's own state** (the slices it holds, each sink's queue, backoff and errors)
  is written only by the writer's tasks in its event loop, or by :meth:`Writer.emergency_flush`
  when that loop cannot run any more; the run reads it through :attr:`Writer.pending`,
  :attr:`Writer.last_error`, :attr:`Writer.lost`, :meth:`Writer.stats` and
  :meth:`Writer.raise_if_unwritten`.
* **Memory bound**: a slice counts in ``queued`` (and so against ``max_buffer``) until every
  sink has acknowledged it or refused it for good: the slowest sink's backlog is what counts.
* **Compacted backlog**: while every sink that still holds a slice is stalled (one write in
  progress for longer than ``max(0.25 s, 4 * flush_interval)``) or failing (in backoff after
  a transient error), the writer's loop packs that slice's metrics into ``marshal`` blobs
  (about 19 bytes a point instead of about 50); ``metrics`` (the list every sink's Batch
  shares) is empty meanwhile. A slice at the head of some sink's queue is never packed,
  and every path that hands a slice to a sink restores it first (:meth:`Writer._restore`),
  in place and under ``Writer._pack_lock``; once the loop cannot run any more (close's
  last writes, the emergency path) nothing is packed again. Counts never change.

The writer is one anyio task plus one task per sink. The main task sleeps until a step
boundary wakes it (at most one wake-up per sleep) or ``flush_interval`` passes, keeps at
least ``flush_interval`` between two drains unless a barrier or close is waiting, then
drains the buffer into one slice and appends that slice to every sink's queue. Each sink's
task writes its own queue in order, with its own retry state, so a slow, failing or hung
sink never delays another. Errors are classified (:func:`is_permanent`): a transient one
(a full disk, an I/O error, a timeout, the network) is retried with capped backoff; a
permanent one (a name the file system refuses, a file/folder clash, a sink's
:class:`~steplog.typing.PermanentWriteError`) drops the one entry it concerns, counted in
:attr:`Writer.lost`, and the rest is written. Errors are kept, counted, logged, and raised
as :class:`~steplog.WriteError` at the next barrier or close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import logging
import marshal
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._errors import FlushTimeoutError, InvalidValueError, WriteError
from ._records import ArtifactRecord, RunInfo, RunStatus, Stats
from ._threads import dispose_in_daemon_thread, in_daemon_thread
from .typing import Batch, PermanentWriteError, RunRequest, Sink, SyncSink

if TYPE_CHECKING:
    from ._buffer import Buffer, Event
    from ._tensors import DeviceValues

__all__ = ["Writer", "is_permanent"]

log = logging.getLogger("steplog")

_MAX_BACKOFF = 5.0
SINK_TIMEOUT = 60.0
"""Seconds a barrier waits for a sink stuck in one write before it reports that sink (default)."""

_STALL_MIN = 0.25
"""A sink whose write has lasted ``max(_STALL_MIN, 4 * flush_interval)`` seconds is stalled: its backlog is packed."""
_PACK_ITEMS = 3 * 4096
"""Items (3 a point) per marshal call when a backlog is packed: about 0.25 ms each, so the training
thread gets the interpreter lock back between two calls."""

# OS errors that writing the same thing again cannot fix: the name or the layout is refused.
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENAMETOOLONG", "EINVAL", "EISDIR", "ENOTDIR", "EEXIST", "ENOTEMPTY", "ELOOP", "EILSEQ")
    if hasattr(errno, name)
)


def is_permanent(exc: BaseException) -> bool:
    """True if retrying the write that raised ``exc`` cannot succeed.

    Permanent: a sink's :class:`~steplog.typing.PermanentWriteError`; an OS error whose
    errno says the name or the layout is refused (``ENAMETOOLONG``, ``EINVAL``, ``EISDIR``,
    ``ENOTDIR``, ``EEXIST``, ``ENOTEMPTY``, ``ELOOP``, ``EILSEQ``); a ``ValueError`` or
    ``TypeError`` (a value the sink cannot encode). Everything else (``ENOSPC``, ``EIO``,
    timeouts, network errors) is transient and retried.
    """
    if isinstance(exc, PermanentWriteError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _PERMANENT_ERRNOS
    return isinstance(exc, ValueError | TypeError)


@dataclasses.dataclass(slots=True, eq=False)
class _Work:
    """One drained slice: a batch per sink (None once that sink finished it)."""

    seq: int
    batches: list[Batch | None]
    metrics: list[tuple[str, list[Any]]]
    points: int
    params: int
    oldest_ms: int
    waiting: int
    """Sinks that have not finished it yet."""
    lost: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    """Entries some sink refused for good."""
    packed: list[bytes] | None = None
    """While compacted: ``metrics`` as marshal blobs, in order (``metrics`` is empty meanwhile)."""
    packed_keys: dict[str, int] | None = None
    """While compacted: points per metric key."""
    unpackable: bool = False
    """A value marshal cannot store exactly (a float subclass from a value hook): kept as it is."""


class _Lane:
    """One sink with its own queue, retry state and task: sinks progress independently."""

    __slots__ = (
        "backoff",
        "busy_since",
        "failures",
        "force",
        "index",
        "name",
        "queue",
        "retry_at",
        "scope",
        "sink",
        "wake_event",
    )

    def __init__(self, index: int, sink: Sink | SyncSink) -> None:
        self.index = index
        self.sink = sink
        self.name = f"{type(sink).__name__}#{index}"
        self.queue: deque[_Work] = deque()
        self.backoff = 0.0
        self.retry_at = 0.0
        self.failures = 0
        self.force = False
        self.busy_since: float | None = None
        self.wake_event: anyio.Event | None = None
        self.scope: anyio.CancelScope | None = None

    def poke(self) -> None:
        """Wake the sink's task (from the writer's loop only)."""
        if self.wake_event is not None:
            self.wake_event.set()

    async def open(self, request: RunRequest) -> RunInfo:
        info: RunInfo = await _call(self.sink.open, request)
        return info

    async def write(self, batch: Batch) -> None:
        await _call(self.sink.write, batch)

    async def close(self, status: RunStatus, end_time: int) -> None:
        await _call(self.sink.close, status, end_time)

    def write_sync(self, batch: Batch) -> None:
        method = getattr(self.sink, "write_sync", None)
        if method is None and not inspect.iscoroutinefunction(self.sink.write):
            method = self.sink.write  # a sync sink: its write is the emergency path too
        if method is None:
            raise WriteError(f"sink {self.name} has no write_sync(): it cannot be written without an event loop")
        method(batch)

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        method = getattr(self.sink, "close_sync", None)
        if method is None and not inspect.iscoroutinefunction(self.sink.close):
            method = self.sink.close
        if method is not None:
            method(status, end_time)

    @property
    def bytes_written(self) -> int:
        value = getattr(self.sink, "bytes_written", 0)  # optional (see steplog.typing.Sink)
        return value if isinstance(value, int) else 0


async def _call(method: Callable[..., Any], *args: Any) -> Any:
    """Await an ``async def`` sink method; run a plain one on a daemon thread (a sync sink)."""
    if inspect.iscoroutinefunction(method):
        return await _sink_code(method, *args)
    return await in_daemon_thread(lambda: method(*args))


async def _sink_code(method: Callable[..., Any], *args: Any) -> Any:
    """An async sink's own code: under trio, where a Ctrl-C may land as in plain trio (see
    :func:`_shield_from_trio_keyboard_interrupts`). A plain sink's call stays protected: it runs
    on a thread, and an interrupt raised while ``_call`` waits for it would leave that thread
    writing the batch while the close writes it again."""
    return await method(*args)


_SWITCH_INTERVAL = 0.0005
"""Switch interval while a writer on its own thread (sync code) writes."""
_LOOP_SWITCH_INTERVAL = 0.0002
"""Switch interval while a writer in the caller's event loop writes: the loop gets the lock back sooner."""
_DISPOSE_AWAY = 16_384
"""Points of a written slice from which its records are freed on a sink-call thread, not in the loop."""
_DRAIN_PART = 3 * 16_384
"""Items per part of a drain (~0.1 ms of interpreter time): the caller's event loop runs between parts."""
_switching_lock = threading.Lock()
_switching_users = 0
_switching_saved = 0.0
_switching_set = 0.0
"""The interval steplog set last while writers are in a cycle (0.0 when it set none)."""


def _reset_switching_after_fork() -> None:
    """In a forked child no writer runs: a lock held by the parent's writer thread would never be released."""
    global _switching_lock, _switching_users, _switching_set
    if _switching_users and _switching_set and abs(sys.getswitchinterval() - _switching_set) < 1e-9:
        sys.setswitchinterval(_switching_saved)  # the parent's writer shortened it; the child has none
    _switching_lock = threading.Lock()
    _switching_users = 0
    _switching_set = 0.0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_switching_after_fork)


@contextlib.contextmanager
def _eager_switching(interval: float = _SWITCH_INTERVAL) -> Iterator[None]:
    """Shorten the interpreter's thread switch interval to ``interval`` while a write cycle runs.

    Each ``os.write`` lets the training loop take the interpreter lock back, and the writer
    then waits a whole switch interval (5 ms by default) for it again: with 20 metric files
    a cycle took over 100 ms and the flush deadline slipped. While a writer on its own thread
    writes, the interval is at most 0.5 ms; the number of switches stays the same (one per
    system call), only the waits get shorter. A writer in the caller's event loop asks for
    0.2 ms, so that the loop, waiting for the lock while a sink's thread encodes, gets it back
    sooner (0.5 ms gave an asyncio lag p99 of 0.66 ms, 0.2 ms 0.58 ms); for a writer on its own
    thread 0.2 ms cost more switches than it saved (sustained hot path 3.28x a no-op call
    against 2.93x; ``benchmarks/switch_interval.py``). With several writers, the smallest
    interval asked for holds until the last cycle ends. The user's own setting is then
    restored, unless the user changed it meanwhile. (A process-wide setting: see the README.)
    """
    global _switching_users, _switching_saved, _switching_set
    with _switching_lock:
        current = sys.getswitchinterval()
        if _switching_users == 0:
            _switching_saved = current
            _switching_set = 0.0
        ours = _switching_users == 0 or (_switching_set > 0 and abs(current - _switching_set) < 1e-9)
        if ours and current > interval:
            sys.setswitchinterval(interval)
            _switching_set = sys.getswitchinterval()
        _switching_users += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching_users -= 1
            if _switching_users == 0:
                # restored unless the user changed it meanwhile
                if _switching_set and abs(sys.getswitchinterval() - _switching_set) < 1e-9:
                    sys.setswitchinterval(_switching_saved)
                _switching_set = 0.0


class Writer:
    """Moves records from a :class:`~steplog._buffer.Buffer` to sinks; runs as anyio tasks.

    Args:
        sink_timeout: seconds a barrier waits for a sink stuck inside one write before it
            raises a WriteError naming that sink (the write itself goes on).
    """

    def __init__(
        self,
        buffer: Buffer,
        sinks: Sequence[Sink | SyncSink],
        *,
        flush_interval: float,
        sink_timeout: float | None = None,
    ) -> None:
        if not sinks:
            raise InvalidValueError(
                "a run needs at least one sink: pass tracking_uri=..., or sinks=[...] with at least one "
                "(for a run kept in memory: sinks=[steplog.testing.MemorySink()])"
            )
        self._buffer = buffer
        self._sinks = list(sinks)
        self._lanes = [_Lane(i, sink) for i, sink in enumerate(self._sinks)]
        self._interval = flush_interval
        self._sink_timeout = SINK_TIMEOUT if sink_timeout is None else sink_timeout
        self._works: deque[_Work] = deque()  # slices some sink has not finished, oldest first
        self._draining: list[tuple[str, list[Any]]] = []
        """Parts of a drain in progress, not in a slice yet: the emergency path takes them too."""
        self._draining_events: list[Event] = []
        self._pack_lock = threading.Lock()  # packing and restoring a slice (close's threads restore too)
        self._packing = True  # False once slices are written outside the loop (close, emergency)
        self.packs = 0
        """Slices packed so far (a stalled or failing sink's backlog, see the module docstring)."""
        self._seq = 0
        self._pending_points = 0
        self._barriers: list[anyio.Event] = []
        # anyio events need a running loop: created in open(), which runs in the writer's loop
        self._wake_event: anyio.Event = None  # type: ignore[assignment]
        self._finished: anyio.Event = None  # type: ignore[assignment]
        self._progress: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._running = False
        self._last_drain_ms = int(time.time() * 1000)  # nothing can be logged before the writer exists
        # statistics (counts under buffer.count_lock, see the module docstring)
        self._written = 0
        self._lost = 0
        self._lost_points = 0
        self._flushes = 0
        self._last_latency = 0.0
        self._max_latency = 0.0
        self._retries = 0
        self._errors = 0
        self._last_error: BaseException | None = None
        self._lost_error: BaseException | None = None  # a refusal not yet raised at a barrier
        self.info: RunInfo | None = None
        self.deferred: DeviceValues | None = None
        """Device tensors logged as values (set by the run); resolved only once a key got one."""
        buffer.set_pending_source(self._pending_count)

    # ------------------------------------------------------------------ what the run reads

    @property
    def last_error(self) -> BaseException | None:
        """The last error a sink raised (kept after a retry succeeds, for ``stats()``)."""
        return self._last_error

    @property
    def pending(self) -> bool:
        """True while some drained record is not yet acknowledged (or refused) by every sink."""
        return bool(self._works)

    @property
    def _pending(self) -> deque[_Work]:  # old name, until the run uses ``pending``
        return self._works

    @property
    def lost(self) -> int:
        """Records (points, params, tags, artifacts) some sink refused for good: the run did not finish cleanly."""
        return self._lost

    # ------------------------------------------------------------------ lifecycle

    async def open(self, request: RunRequest) -> RunInfo:
        """Create the run in every sink (the first sink's identity is the run's)."""
        self._wake_event = anyio.Event()
        self._finished = anyio.Event()
        self._progress = anyio.Event()
        for lane in self._lanes:
            lane.wake_event = anyio.Event()
        info = await self._lanes[0].open(request)
        for lane in self._lanes[1:]:
            await lane.open(dataclasses.replace(request, run_id=info.run_id))
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
        """The writer: loop until :meth:`stop` has been asked and everything is handled.

        Start it with ``task_group.start`` so that it is running (and :meth:`stop` waits for it)
        before the caller goes on: a body that never awaits may close the run at once.
        """
        self._running = True
        _shield_from_trio_keyboard_interrupts()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                for lane in self._lanes:
                    tg.start_soon(self._lane_loop, lane)
                task_status.started()
                await self._main_loop()
                tg.cancel_scope.cancel()  # every sink's queue is empty: end their tasks
        finally:
            self._buffer.asleep = False
            self._finished.set()
            for event in self._barriers:
                event.set()
            self._signal_progress()
            self._buffer.notify_drained()

    async def _main_loop(self) -> None:
        buffer = self._buffer
        last_drain = -math.inf
        sealed = False
        forced_on_stop = False
        while True:
            if not (self._stopping or self._barriers):
                buffer.asleep = True
                with anyio.move_on_after(self._interval):
                    await self._wake_event.wait()
                buffer.asleep = False
                self._wake_event = anyio.Event()
                # least flush_interval between two drains, unless a barrier or close is waiting
                delay = last_drain + self._interval - time.monotonic()
                if delay > 0 and not (self._stopping or self._barriers):
                    with anyio.move_on_after(delay):
                        await self._wake_event.wait()
                    self._wake_event = anyio.Event()
            buffer.tick()
            barriers, self._barriers = self._barriers, []
            force = bool(barriers) or self._stopping
            with _eager_switching(self._switch_interval()):
                if await self._take(force=force):
                    last_drain = time.monotonic()
            await self._compact_backlog()
            if barriers or (self._stopping and not forced_on_stop):
                forced_on_stop = self._stopping
                for lane in self._lanes:  # a barrier or close retries now, not after the backoff
                    lane.force = True
                    lane.poke()
            for event in barriers:
                event.set()  # the barrier now waits on the sinks themselves (see barrier())
            if not self._stopping:
                continue
            if not sealed:
                # close: refuse new calls, then give a call already past the hot path's room check
                # the interpreter lock, so that its append lands before the drains that follow
                sealed = True
                buffer.seal("the run is closing: start a new run to log more")
                # a call in flight (another thread, past the room check) appends once it gets the
                # interpreter lock: wait for it to leave, at most two switch intervals as before
                deadline = time.monotonic() + 2 * sys.getswitchinterval()
                while buffer.calls_in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll of other threads' stacks: no event to wait on
                    await anyio.sleep(0.0002)
                continue
            if not self._has_work():
                break
            # wait for the sinks (they retry on their own backoff) or for something new
            with anyio.move_on_after(0.05):
                await self._wake_event.wait()
            self._wake_event = anyio.Event()

    def _switch_interval(self) -> float:
        """The switch interval this writer asks for while it writes (see :func:`_eager_switching`)."""
        return _LOOP_SWITCH_INTERVAL if self._buffer.loop_thread is not None else _SWITCH_INTERVAL

    def _has_work(self) -> bool:
        b = self._buffer
        return bool(self._works) or b.queued() > 0 or b.has_events()

    async def _take(self, *, force: bool) -> bool:
        """Drain the buffer into one slice for every sink's queue; True if anything was taken.

        A big backlog is drained in parts (``_DRAIN_PART`` items) with the event loop running in
        between; the parts wait in ``_draining``, where a signal's emergency flush, which writes
        the queues and the buffer, takes them too. Keys come in first-logged order, each once.
        """
        start: int | None = 0
        while start is not None:
            if start:
                # let the event loop run between parts (shielded: the parts must reach a slice)
                await anyio.lowlevel.cancel_shielded_checkpoint()
            metrics, events, start = self._buffer.drain_part(start, _DRAIN_PART)
            self._draining += metrics
            self._draining_events += events
        metrics = self._draining
        deferred = self.deferred
        if deferred is not None and deferred.keys:  # device values become floats before sinks see them
            metrics = await deferred.resolve(
                metrics, wait=force, on_hold=lambda: self._buffer.set_pending(self._pending_count())
            )
        events = self._draining_events
        self._draining, self._draining_events = [], []
        work = self._enqueue(metrics, events)
        if work is not None:
            for lane in self._lanes:
                lane.poke()
        self._buffer.notify_drained()
        return work is not None

    def _enqueue(self, metrics: list[tuple[str, list[Any]]], events: list[Event]) -> _Work | None:
        """Hand drained records to every sink's queue (the one path, async or emergency)."""
        if not (metrics or events):
            self._buffer.set_pending(self._pending_count())  # what drain() took is counted (none, or deferred)
            return None
        work = self._make_work(metrics, events)
        with self._buffer.count_lock:  # hand the drained records over without stats() seeing them twice
            self._works.append(work)
            self._pending_points += work.points
            self._buffer.set_pending(self._pending_count())  # the buffer's room shrinks by what we hold
        for lane in self._lanes:
            lane.queue.append(work)
        return work

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
            Batch(metrics=metrics, params=params, tags=tags, artifacts=artifacts) for _ in self._lanes
        ]
        points = sum(len(items) for _k, items in metrics) // 3
        self._seq += 1
        return _Work(
            seq=self._seq,
            batches=batches,
            metrics=metrics,
            points=points,
            params=len(params),
            oldest_ms=oldest,
            waiting=len(batches),
        )

    # ------------------------------------------------------------------ a stalled sink's backlog

    def _stalled(self, now: float) -> list[bool]:
        """Per sink: is it stalled (one write lasting too long) or failing (in backoff)?"""
        limit = max(_STALL_MIN, 4 * self._interval)
        return [
            lane.backoff > 0 or (lane.busy_since is not None and now - lane.busy_since > limit) for lane in self._lanes
        ]

    def _may_pack(self, work: _Work, stalled: list[bool]) -> bool:
        """True if no sink writes ``work`` soon: every sink that holds it is stalled and has an older slice first."""
        if work.packed is not None or work.unpackable or not work.metrics or not self._packing:
            return False
        held = False
        for lane in self._lanes:
            if lane.queue and lane.queue[0] is work:
                return False  # being written, or next
            if work.batches[lane.index] is not None:
                if not stalled[lane.index]:
                    return False  # a healthy sink writes it soon
                held = True
        return held

    async def _compact_backlog(self) -> None:
        """Pack the slices that only stalled or failing sinks still hold (see the module docstring).

        Runs in the writer's loop; each marshal call covers at most ``_PACK_ITEMS`` items and the
        loop gets a checkpoint between two, so neither the training thread nor an async host waits
        long. A slice is committed only if it is still packable after the last checkpoint.
        """
        stalled = self._stalled(time.monotonic())
        if not any(stalled):
            return
        for work in list(self._works):
            if not self._may_pack(work, stalled):
                continue
            blobs: list[bytes] = []
            try:
                for group in _pack_groups(work.metrics):
                    blobs.append(marshal.dumps(group))
                    await anyio.lowlevel.checkpoint()
            except ValueError:  # not a plain float or int (marshal refuses subclasses): keep it as it is
                work.unpackable = True
                continue
            if not self._may_pack(work, stalled):
                continue  # a sink reached it meanwhile
            counts = {key: len(items) // 3 for key, items in work.metrics}
            if len(counts) < len(work.metrics):  # a key twice in one slice (not made by drain)
                counts = {key: _points_of(work, key) for key in counts}
            with self._pack_lock:
                if not self._packing:
                    return
                work.packed = blobs
                work.packed_keys = counts
                # a fresh list for the sinks still to write it (restored into it in place); the old
                # one is left as it is: a sink that already wrote this slice may have kept its Batch
                fresh: list[tuple[str, list[Any]]] = []
                work.metrics = fresh
                for batch in work.batches:
                    if batch is not None:
                        batch.metrics = fresh
                self.packs += 1

    def _restore(self, work: _Work) -> None:
        """Unpack a packed slice's metrics into its shared list, before a sink reads them (any thread)."""
        if work.packed is None:
            return
        with self._pack_lock:
            blobs = work.packed
            if blobs is None:
                return  # another sink's thread restored it
            by_key: dict[str, list[Any]] = {}
            for blob in blobs:  # one marshal call per blob, each at most _PACK_ITEMS items
                for key, items in marshal.loads(blob):
                    column = by_key.get(key)
                    if column is None:
                        by_key[key] = items
                    else:
                        column += items
            work.metrics.extend(by_key.items())
            work.packed = None
            work.packed_keys = None

    def _stop_packing(self) -> None:
        """No slice is packed from now on: the queues are written outside the loop."""
        with self._pack_lock:
            self._packing = False

    # ------------------------------------------------------------------ one sink's task

    async def _lane_loop(self, lane: _Lane) -> None:
        with anyio.CancelScope() as scope:
            lane.scope = scope
            while True:
                wake = lane.wake_event
                assert wake is not None
                if not lane.queue:
                    await wake.wait()
                    lane.wake_event = anyio.Event()
                    continue
                delay = lane.retry_at - time.monotonic()
                if delay > 0 and not lane.force:
                    with anyio.move_on_after(delay):
                        await wake.wait()
                    lane.wake_event = anyio.Event()
                    continue
                lane.force = False
                await self._attempt(lane)
                self._signal_progress()

    async def _attempt(self, lane: _Lane) -> None:
        """One write of the sink's oldest slice (its own frame: a waiting task keeps no slice alive)."""
        work = lane.queue[0]
        batch = work.batches[lane.index]
        assert batch is not None
        self._restore(work)  # the head of a queue is never packed again
        lane.busy_since = time.monotonic()
        try:
            with _eager_switching(self._switch_interval()):  # a write's system calls pass the lock back and forth
                await lane.write(batch)
        except Exception as exc:  # a sink's failure is data for the user, not a crash of the run
            lane.busy_since = None
            self._failed(lane, work, batch, exc)
            if not is_permanent(exc):
                lane.backoff = min(max(lane.backoff * 2, self._interval), _MAX_BACKOFF)
                lane.retry_at = time.monotonic() + lane.backoff
        else:
            lane.busy_since = None
            lane.backoff = 0.0
            self._settle(lane, work)

    def _failed(self, lane: _Lane, work: _Work, batch: Batch, exc: Exception) -> None:
        """Count a failed write; a permanent failure gives up the one entry it concerns."""
        self._errors += 1
        self._last_error = exc
        if not is_permanent(exc):
            lane.failures += 1
            self._retries += 1
            log.warning("steplog: write to %s failed (will retry; data kept in memory): %s", lane.name, exc)
            return
        entry = exc.entry if isinstance(exc, PermanentWriteError) and exc.entry is not None else None
        if entry is None or batch.is_marked(*entry):
            entry = batch.first_unmarked()
        if entry is not None:
            batch.mark_done(*entry)
            work.lost.add(entry)
        self._lost_error = exc
        log.error("steplog: %s refused %s for good (dropped; the rest is written): %s", lane.name, entry, exc)
        if batch.is_done():
            self._settle(lane, work)

    def _settle(self, lane: _Lane, work: _Work) -> None:
        """The sink finished its part of ``work`` (written, or refused for good)."""
        if lane.queue and lane.queue[0] is work:
            lane.queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                lane.queue.remove(work)
        work.batches[lane.index] = None
        work.waiting -= 1
        if work.waiting > 0:
            return
        lost_points = lost_other = 0
        for kind, name in work.lost:
            if kind == "metric":
                lost_points += _points_of(work, name)
            else:
                lost_other += 1
        with self._buffer.count_lock:  # written, lost and pending change together for stats()
            with contextlib.suppress(ValueError):
                self._works.remove(work)
            self._written += work.points - lost_points
            self._lost_points += lost_points
            self._lost += lost_points + lost_other
            self._pending_points -= work.points
            self._buffer.set_pending(self._pending_count())
        self._flushes += 1
        latency = max(0.0, time.time() - work.oldest_ms / 1000)
        self._last_latency = latency
        self._max_latency = max(self._max_latency, latency)
        self._buffer.notify_drained()
        if work.points >= _DISPOSE_AWAY:
            # freeing a big slice's records is one long C call (~0.3 ms per 100,000 points): done on
            # a sink-call thread, in parts, so it never stalls an event loop the writer runs in
            columns = [items for _key, items in work.metrics]
            work.metrics = []
            dispose_in_daemon_thread(columns)

    def _signal_progress(self) -> None:
        progress = self._progress
        if progress is not None:
            self._progress = anyio.Event()
            progress.set()
        if self._stopping:
            self.wake()

    # ------------------------------------------------------------------ barriers and stop

    async def barrier(self) -> None:
        """Return once everything logged before the call is written; raise WriteError if it cannot be.

        Never waits forever: a sink stuck in one write for ``sink_timeout`` seconds is named
        in a WriteError (its write goes on; the other sinks are not held up).
        """
        if self._finished is None or self._finished.is_set():
            # stopped: nothing more will be written (a writer started but not yet running still
            # takes the barrier at its first cycle)
            self.raise_if_unwritten()
            return
        failures = [lane.failures for lane in self._lanes]  # a failure from now on settles that sink
        event = anyio.Event()
        self._barriers.append(event)
        self._wake_event.set()
        await event.wait()
        target = self._seq  # the slice drained for this barrier (or an earlier one)
        stuck: list[_Lane] = []
        while not self._finished.is_set():
            now = time.monotonic()
            waiting = [
                lane
                for lane in self._lanes
                if lane.queue and lane.queue[0].seq <= target and lane.failures == failures[lane.index]
            ]
            stuck = [
                lane for lane in waiting if lane.busy_since is not None and now - lane.busy_since >= self._sink_timeout
            ]
            if len(stuck) == len(waiting):
                break
            progress = self._progress
            assert progress is not None
            next_check = min(
                (lane.busy_since + self._sink_timeout for lane in waiting if lane.busy_since is not None),
                default=now + 1.0,
            )
            with anyio.move_on_after(max(0.01, min(next_check - now, 1.0))):
                await progress.wait()
        if stuck:
            names = ", ".join(lane.name for lane in stuck)
            raise WriteError(
                f"steplog could not write {self.unwritten_summary()}: sink {names} did not acknowledge a write "
                f"within {self._sink_timeout} s (kept in memory; the other sinks are written)"
            )
        self.raise_if_unwritten()

    def raise_if_unwritten(self) -> None:
        """Raise WriteError if some record is unwritten (still retried) or was refused for good since the last call."""
        exc = self._last_error
        if self._works and (exc is not None or self._finished is None or self._finished.is_set()):
            behind = ", ".join(lane.name for lane in self._lanes if lane.queue)
            reason = exc if exc is not None else f"not acknowledged by {behind}"
            error = WriteError(
                f"steplog could not write {self.unwritten_summary()}: {reason}"
                " (kept in memory and retried; check the disk or the server)"
            )
            if isinstance(exc, OSError):  # keep errno and filename for code that inspects them
                error.errno, error.filename = exc.errno, exc.filename
            raise error from exc
        lost_error, self._lost_error = self._lost_error, None
        if lost_error is not None:
            self._raise_write_error(
                lost_error,
                f"steplog could not write {self._lost} records, refused for good and dropped: {lost_error}",
            )

    _raise_if_unwritten = raise_if_unwritten  # old name, until the run uses the public one

    @staticmethod
    def _raise_write_error(exc: BaseException, message: str) -> None:
        error = WriteError(message)
        if isinstance(exc, OSError):  # keep errno and filename for code that inspects them
            error.errno, error.filename = exc.errno, exc.filename
        raise error from exc

    def interrupt(self) -> None:
        """The process got SIGTERM or SIGINT and the run is closing: tell each sink that has ``interrupt()``.

        Called in the writer's loop before :meth:`stop`. A sink waiting on a network stops
        waiting and keeps what it took, and its close journals it before any network wait
        (see :meth:`steplog.sinks.mlflow_rest.MlflowRestSink.interrupt`).
        """
        for lane in self._lanes:
            method = getattr(lane.sink, "interrupt", None)
            if callable(method):
                try:
                    method()
                except Exception as exc:  # the close goes on; the sink's own close reports what it could not do
                    self._errors += 1
                    self._last_error = exc
                    log.warning("steplog: interrupting %s: %s", lane.name, exc)

    async def stop(self) -> None:
        """Write everything (retrying while the caller's deadline allows), then end the loop."""
        self._stopping = True
        self._wake_event.set()
        if self._running:
            await self._finished.wait()

    async def close_sinks(self, status: RunStatus, end_time: int) -> None:
        """Record the final status in every sink (after :meth:`stop`), each on its own.

        What a sink has not acknowledged when this runs (close gave up on it) is handed to
        its emergency path (``write_sync``: the REST sink journals it) before its close.
        """
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()  # stop retrying: close gave up waiting
        self._stop_packing()  # the lanes' queues are written from threads now
        first: list[BaseException] = []

        async def close_one(lane: _Lane) -> None:
            try:
                if lane.queue:
                    await in_daemon_thread(lambda: self._write_lane_sync(lane))
                await lane.close(status, end_time)
            except Exception as exc:  # keep closing the other sinks; report the first failure
                self._errors += 1
                self._last_error = exc
                first.append(exc)

        async with anyio.create_task_group() as tg:
            for lane in self._lanes:
                tg.start_soon(close_one, lane)
        if first:
            raise WriteError(f"steplog could not record the run's end: {first[0]}") from first[0]

    def emergency_flush(self, status: RunStatus | None, end_time: int, *, timeout: float | None = None) -> None:
        """Write what is queued through the sinks' sync path (no event loop can run here).

        Bounded by ``timeout``: the work runs on a daemon thread, so a sink stuck in
        ``write_sync`` cannot hang a signal handler or the interpreter's exit; what is
        still unwritten then is logged and kept in ``stats().last_error``. Except when this
        thread holds the count lock: a signal handler runs on the thread it interrupts, which
        may be the writer's own event loop in the middle of a drain or a settle; a daemon thread
        would then wait for that lock until the timeout, and the run would end unwritten. The
        work runs here instead (the lock is re-entrant).
        """
        if timeout is None or _owned_by_this_thread(self._buffer.count_lock):
            self._emergency_flush(status, end_time)
            return
        thread = threading.Thread(
            target=self._emergency_flush, args=(status, end_time), name="steplog-emergency", daemon=True
        )
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self._errors += 1
            self._last_error = TimeoutError(f"the run's end timed out after {timeout} s")
            log.error("steplog: giving up after %s s with %s not written", timeout, self.unwritten_summary())

    def _emergency_flush(self, status: RunStatus | None, end_time: int) -> None:
        self._stop_packing()
        held, held_events = self._draining, self._draining_events  # a drain the signal interrupted
        self._draining, self._draining_events = [], []
        metrics, events = self._buffer.drain()
        if held:
            merged: dict[str, list[Any]] = {}
            for key, items in (*held, *metrics):  # older first; one entry per key, as a sink expects
                column = merged.get(key)
                if column is None:
                    merged[key] = items
                else:
                    merged[key] = column + items
            metrics = list(merged.items())
        events = held_events + events
        deferred = self.deferred
        if deferred is not None and deferred.keys:
            metrics = deferred.resolve_blocking(metrics)
        self._enqueue(metrics, events)
        for lane in self._lanes:
            self._write_lane_sync(lane)
            if status is not None:
                try:
                    lane.close_sync(status, end_time)
                except Exception as exc:  # best effort at exit
                    self._errors += 1
                    self._last_error = exc

    def _write_lane_sync(self, lane: _Lane) -> None:
        """Write one sink's queue through its sync path, in order; stop at its first transient failure."""
        while lane.queue:
            work = lane.queue[0]
            batch = work.batches[lane.index]
            if batch is None:
                self._settle(lane, work)
                continue
            self._restore(work)
            try:
                lane.write_sync(batch)
            except Exception as exc:  # best effort: report, keep the rest for this sink
                self._failed(lane, work, batch, exc)
                if is_permanent(exc):
                    continue
                return
            self._settle(lane, work)

    # ------------------------------------------------------------------ reporting

    def timeout_error(self, what: str, timeout: float | None) -> FlushTimeoutError:
        """The error for a barrier or close that ran out of time, naming what is unwritten."""
        return FlushTimeoutError(f"{what} timed out after {timeout} s with {self.unwritten_summary()} not yet written")

    def unwritten_summary(self) -> str:
        """Human-readable account of what is not written yet, by key (and which sinks hold it)."""
        per_key: dict[str, int] = {}
        params = 0
        for work in list(self._works):
            batch = next((b for b in work.batches if b is not None), None)
            if batch is None:
                continue
            with self._pack_lock:
                rest = batch.remaining()
                packed_keys = work.packed_keys
                if packed_keys is not None:  # a packed slice: no sink has started it
                    for key, n in packed_keys.items():
                        per_key[key] = per_key.get(key, 0) + n
                for key, items in rest.metrics:
                    per_key[key] = per_key.get(key, 0) + len(items) // 3
            params += len(rest.params)
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
        behind = [lane.name for lane in self._lanes if lane.queue]
        if behind and len(behind) < len(self._lanes):
            text += f" (not acknowledged by {', '.join(behind)})"
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
            lost = self._lost_points
            dropped = buffer.dropped + (deferred.dropped if deferred is not None else 0)
        outages = [state() for lane in self._lanes if callable(state := getattr(lane.sink, "outage_state", None))]
        last_error = None if self._last_error is None else str(self._last_error)
        if last_error is None:  # a sink riding out an outage of its own says why in words
            last_error = next((str(o.last_error) for o in outages if getattr(o, "last_error", None)), None)
        return Stats(
            logged=written + queued + dropped + lost,
            written=written,
            queued=queued,
            dropped=dropped,
            flushes=self._flushes,
            bytes_written=sum(lane.bytes_written for lane in self._lanes),
            last_flush_latency=self._last_latency,
            max_flush_latency=self._max_latency,
            retries=self._retries + sum(int(getattr(o, "retries", 0)) for o in outages),
            errors=self._errors,
            last_error=last_error,
            blocking_reads=deferred.blocking_reads if deferred is not None else 0,
            lost=lost,
            backlog=sum(int(getattr(o, "backlog_points", 0)) for o in outages),
            spilled=sum(int(getattr(o, "spilled_points", 0)) for o in outages),
        )


def _shield_from_trio_keyboard_interrupts() -> None:
    """Under trio, a Ctrl-C goes to the caller's task at its next checkpoint, never into the writer's.

    trio raises KeyboardInterrupt inside whatever unprotected code runs when SIGINT lands. In the
    writer's tasks that is between bytecodes of a drain: records just taken from the buffer and
    not yet in a sink's queue would be dropped with the task. Marking the writer's task functions
    KI-protected (trio finds the mark by walking the interrupted frame's callers) makes trio
    deliver the interrupt to the main task instead, as it does for its own internals; the run
    then closes as KILLED with everything written. Without trio loaded there is nothing to do.

    An async sink's own code is the user's, not the writer's: :func:`_sink_code` turns the
    protection off again, so a sink stuck in sync code (a blocking request inside
    ``async def write``) can be interrupted as in plain trio; the batch it was given is still in
    the sink's queue.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        for fn in (Writer.run, Writer._lane_loop):
            trio.lowlevel.enable_ki_protection(fn)
        trio.lowlevel.disable_ki_protection(_sink_code)


def _owned_by_this_thread(lock: Any) -> bool:
    """True if the current thread holds ``lock``, a ``threading.RLock``."""
    is_owned = getattr(lock, "_is_owned", None)
    return bool(is_owned()) if is_owned is not None else False


def _points_of(work: _Work, key: str) -> int:
    """Metric points of ``key`` in a slice."""
    if work.packed_keys is not None:
        return work.packed_keys.get(key, 0)
    return sum(len(items) for k, items in work.metrics if k == key) // 3


def _pack_groups(metrics: list[tuple[str, list[Any]]]) -> Iterator[list[tuple[str, list[Any]]]]:
    """``metrics`` cut into groups of at most ``_PACK_ITEMS`` items (a long key spans several groups)."""
    group: list[tuple[str, list[Any]]] = []
    room = _PACK_ITEMS
    for key, items in metrics:
        start = 0
        while start < len(items):
            part = items if start == 0 and len(items) <= room else items[start : start + room]
            start += len(part)
            group.append((key, part))
            room -= len(part)
            if room == 0:
                yield group
                group, room = [], _PACK_ITEMS
    if group:
        yield group
