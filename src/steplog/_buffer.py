"""The hot path's data: validate once, stamp, enqueue, step boundaries, backpressure.

Records live in one list per metric key, interleaved as ``[ts, value, step, ...]``
(the order of a metric-file line). A log call appends its three items with one
``list += tuple``: a single C-level operation, so it is atomic under the GIL and
threads never interleave half-records; per-key order is the order of the calls.
The writer takes a key's items with a slice and a ``del`` of the same length, so
records appended in between are never lost. No per-record object is kept beyond
the float itself (about 48 bytes a record).

Time is stamped once per step boundary and refreshed by the writer at each tick,
so records of one step may share a stamp and the hot path never calls the clock.

Anything unusual (a new key, a non-float value, a new step, an explicit timestamp,
a full buffer, a closed run, a forked child) leaves the fast path for
:meth:`Buffer._log_slow`, which validates and explains.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, SupportsIndex

from ._errors import BufferFullError, InvalidKeyError, InvalidValueError, ParamChangedError, RunStateError, StepLogError
from ._records import ArtifactRecord
from ._validation import (
    INT64_MAX,
    INT64_MIN,
    check_key,
    check_param_value,
    check_tag_value,
    to_step,
    to_timestamp,
    to_value,
)

__all__ = ["Buffer", "OnFull"]

OnFull = Literal["block", "drop", "raise"]
Event = tuple[str, Any, Any]  # ("param", key, text) | ("tag", key, text) | ("artifact", record, None)

_live_buffers: weakref.WeakSet[Buffer] = weakref.WeakSet()


_time_ns = time.time_ns


def _now_ms() -> int:
    return _time_ns() // 1_000_000


def _after_fork_in_child() -> None:
    for buffer in list(_live_buffers):
        buffer._forked = True
        buffer._cap = -1  # every call leaves the fast path and meets the fork check


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Namespace:
    """Keys of one kind (metrics, params or tags): known files and the folders their '/' implies."""

    __slots__ = ("dirs", "files", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def check_new(self, key: object, staged: Iterable[str] = ()) -> str:
        """Validate a key not seen before, including the file/folder clash of MLflow's layout.

        ``staged`` holds keys of the same call, not added yet: they must not clash either.
        """
        key = check_key(key, self.kind)
        for other in staged:
            if other.startswith(key + "/") or key.startswith(other + "/"):
                raise InvalidKeyError(
                    f"{self.kind} keys {other!r} and {key!r} cannot both be logged: on disk "
                    f"{min(other, key, key=len)!r} would have to be both a file and a folder"
                )
        if key in self.dirs:
            other = next(k for k in self.files if k.startswith(key + "/"))
            raise InvalidKeyError(
                f"{self.kind} key {key!r} is not allowed: {other!r} is already logged, and on disk "
                f"{key!r} would have to be both a file and a folder"
            )
        parts = key.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.files:
                raise InvalidKeyError(
                    f"{self.kind} key {key!r} is not allowed: {prefix!r} is already logged, and on disk "
                    f"{prefix!r} would have to be both a file and a folder"
                )
        return key

    def add(self, key: str) -> None:
        self.files.add(key)
        parts = key.split("/")
        for i in range(1, len(parts)):
            self.dirs.add("/".join(parts[:i]))


class Buffer:
    """Where log calls put records and the writer takes them from.

    ``log_metric``/``log_metrics`` are the hot path; everything else is rare.
    """

    def __init__(
        self,
        *,
        max_buffer: int = 1_000_000,
        on_full: OnFull = "block",
        value_hook: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self._cols: dict[str, list[Any]] = {}
        self._known: set[str] = set()
        self._metric_keys = _Namespace("metric")
        self._param_keys = _Namespace("param")
        self._tag_keys = _Namespace("tag")
        self._params: dict[str, str] = {}
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()  # slow paths only (new keys, params, blocking waits)
        self._drained = threading.Condition(threading.Lock())
        self._step = 0
        self._ts = _now_ms()
        self._max_buffer = max_buffer
        self._on_full: OnFull = on_full
        self._open_cap = 3 * max_buffer
        self._cap = self._open_cap
        self._pending_seen = 0  # records the writer holds, as it last said (set_pending)
        self._in_drain = 0  # records taken by drain() that the writer has not counted yet
        self.count_lock = threading.RLock()
        """Held while records move between the columns, the drain and the writer (never on the hot path)."""
        self._value_hook = value_hook
        self._dropped = 0
        self._warned_drop = False
        self._forked = False
        self._closed_reason: str | None = None
        self._pid = os.getpid()
        self.asleep = False
        """Set by the writer while it sleeps; a step boundary then wakes it (at most once a sleep)."""
        self.wake: Callable[[], object] = _noop
        """Schedules the writer's wake-up from any thread (given by :meth:`attach_writer`)."""
        self._loop_thread: int | None = None
        self.writer_alive: Callable[[], bool] = lambda: True
        self._pending_records: Callable[[], int] = lambda: 0
        _live_buffers.add(self)

    # ------------------------------------------------------------------ wiring (see _writer's docstring)

    def attach_writer(self, *, wake: Callable[[], None], alive: Callable[[], bool], loop_thread: int | None) -> None:
        """Connect the writer's host: called once when the writer starts.

        ``wake`` schedules the writer's wake-up from any thread; ``alive`` says whether a
        writer will still drain (a blocked caller gives up otherwise); ``loop_thread`` is the
        thread id of the event loop the writer runs in when that loop is the caller's own
        (async hosting), where waiting for room would deadlock.
        """
        self.wake = wake
        self.writer_alive = alive
        self._loop_thread = loop_thread

    @property
    def loop_thread(self) -> int | None:
        """Thread id of the event loop the writer runs in, when it is the caller's (async hosting)."""
        return self._loop_thread

    @loop_thread.setter
    def loop_thread(self, value: int | None) -> None:  # the run's old wiring; attach_writer() replaces it
        self._loop_thread = value

    def set_pending_source(self, pending: Callable[[], int]) -> None:
        """The writer's count of records it holds (read under ``count_lock`` by :meth:`queued`)."""
        self._pending_records = pending

    # ------------------------------------------------------------------ hot path

    def log_metric(
        self, key: str, value: Any, step: SupportsIndex | None = None, timestamp: SupportsIndex | None = None
    ) -> None:
        """Queue one metric point; see :meth:`steplog.Run.log_metric`."""
        try:
            col = self._cols[key]
        except (KeyError, TypeError):
            return self._log_slow(key, value, step, timestamp)
        if value.__class__ is float and timestamp is None and len(col) < self._cap:
            # Cheapest test first: in a training loop the step passed is the very int object
            # of the current step (a loop variable), so identity settles most calls.
            if step is self._step:
                col += (self._ts, value, step)
                return None
            if step is None:
                col += (self._ts, value, self._step)
                return None
            if step.__class__ is int and INT64_MIN <= step <= INT64_MAX:
                if step != self._step:
                    # a step boundary, inlined: one key per step makes every call one
                    self._step = step
                    ts = _time_ns() // 1_000_000
                    if ts != self._ts:  # keep the old int object: the records share it (32 bytes each)
                        self._ts = ts
                    if self.asleep:
                        self.asleep = False
                        self.wake()
                col += (self._ts, value, step)
                return None
        return self._log_slow(key, value, step, timestamp)

    def log_metrics(
        self, metrics: Mapping[str, Any], step: SupportsIndex | None = None, timestamp: SupportsIndex | None = None
    ) -> None:
        """Queue several points of one step; all or nothing (every item is checked first)."""
        if timestamp is None and self._cap > 0 and metrics.__class__ is dict:
            if step is None:
                step = self._step
            elif step is not self._step and not (step.__class__ is int and INT64_MIN <= step <= INT64_MAX):
                return self._log_metrics_slow(metrics, step, timestamp)
            if metrics.keys() <= self._known:
                for value in metrics.values():
                    if value.__class__ is not float:
                        return self._log_metrics_slow(metrics, step, timestamp)
                if step != self._step:  # a step boundary (the usual case: one call per step)
                    self._step = step
                    ts = _time_ns() // 1_000_000
                    if ts != self._ts:
                        self._ts = ts
                    if self.asleep:
                        self.asleep = False
                        self.wake()
                cols = self._cols
                ts = self._ts
                cap = self._cap
                for key, value in metrics.items():
                    col = cols[key]
                    if len(col) < cap:
                        col += (ts, value, step)
                    else:
                        return self._log_metrics_rest(metrics, key, ts, step)
                return None
        return self._log_metrics_slow(metrics, step, timestamp)

    # ------------------------------------------------------------------ slow path

    def check_usable(self) -> None:
        """Raise if this run cannot take calls here: a forked child (StepLogError) or a closed run (RunStateError)."""
        if self._forked or os.getpid() != self._pid:
            raise StepLogError(
                f"this run belongs to process {self._pid}; a forked child (pid {os.getpid()}) cannot log "
                "through its parent's run. Start a new run in the child (steplog.start_run(...)), or log "
                "from the parent only."
            )
        if self._closed_reason is not None:
            raise RunStateError(self._closed_reason)

    def seed(self, *, params: Mapping[str, str], tags: Iterable[str], metric_keys: Iterable[str], step: int) -> None:
        """Tell a resumed run's buffer what the run already holds, before anything is logged.

        Params logged again must keep their value (ParamChangedError otherwise), existing keys still
        clash with a file/folder twin, and ``step=None`` continues from ``step``.
        """
        with self._lock:
            for key, text in params.items():
                if key not in self._params:  # a param logged before the start (async code) is checked when written
                    self._params[key] = text
                    self._param_keys.add(key)
            for key in tags:
                self._tag_keys.add(key)
            for key in metric_keys:
                self._metric_keys.add(key)
            if self._step == 0:  # unless steps were logged before the start: they are the newer ones
                self._step = step

    def log_side_metrics(self, metrics: Mapping[str, Any], step: int, timestamp: int) -> None:
        """Queue points at ``step`` without moving the run's current step (system metrics' own counter).

        Called from a sampler thread, never from the hot path; validated like any log call.
        """
        self.check_usable()
        prepared = [self._prepare(key, value) for key, value in metrics.items()]
        for col, value in prepared:
            if len(col) >= self._cap and not self._make_room(col):
                continue
            col += (timestamp, value, step)

    def _column(self, key: Any) -> list[Any]:
        col = self._cols.get(key) if isinstance(key, str) else None
        if col is not None:
            return col
        with self._lock:
            col = self._cols.get(key) if isinstance(key, str) else None
            if col is None:
                key = self._metric_keys.check_new(key)
                self._metric_keys.add(key)
                col = []
                self._cols[key] = col
                self._known.add(key)
                self._refresh_cap()  # one more key: a smaller share each
        return col

    def _prepare(self, key: Any, value: Any) -> tuple[list[Any], Any]:
        col = self._column(key)
        if value.__class__ is not float:
            hook = self._value_hook
            try:
                value = to_value(key, value) if hook is None else hook(key, value)
            except StepLogError:
                raise
            except Exception as exc:  # np.timedelta64, a meta tensor, a __float__ that raises: the user's value
                raise InvalidValueError(
                    f"metric {key!r}: a value of type {type(value).__name__} is not allowed: it cannot be read "
                    f"as a real number ({type(exc).__name__}: {exc})"
                ) from exc
        return col, value

    def _log_slow(self, key: Any, value: Any, step: Any, timestamp: Any) -> None:
        self.check_usable()
        # step and timestamp first: a refused call registers nothing, not even its key
        ts = None if timestamp is None else _for_keys((key,), to_timestamp, timestamp)
        if step is not None:
            step = _for_keys((key,), to_step, step)
        col, value = self._prepare(key, value)
        if step is None:
            step = self._step
        elif step != self._step:
            self._boundary(step)
        if len(col) >= self._cap and not self._make_room(col):
            return None
        col += (self._ts if ts is None else ts, value, step)
        return None

    def _log_metrics_slow(self, metrics: Mapping[str, Any], step: Any, timestamp: Any) -> None:
        self.check_usable()
        if not isinstance(metrics, Mapping):
            raise InvalidKeyError(f"log_metrics() takes a mapping of metric key to value, not {type(metrics).__name__}")
        ts = None if timestamp is None else _for_keys(metrics, to_timestamp, timestamp)
        step = self._step if step is None else _for_keys(metrics, to_step, step)
        prepared = [self._prepare(key, value) for key, value in metrics.items()]  # all checked before any enqueued
        if step != self._step:
            self._boundary(step)
        stamp = self._ts if ts is None else ts
        if self._on_full == "raise" and any(len(col) >= self._cap for col, _v in prepared):
            # all or nothing: refuse now if some key would meet a full buffer once the keys before it are in
            queued = self.queued()
            for i, (col, _value) in enumerate(prepared):
                if len(col) >= self._cap and queued + i >= self._max_buffer:
                    raise self._full_error()  # before any key is queued
        queued_some = False
        for col, value in prepared:
            if len(col) >= self._cap and not self._make_room(col, partial=True, queued_some=queued_some):
                continue
            col += (stamp, value, step)
            queued_some = True

    def _log_metrics_rest(self, metrics: Mapping[str, Any], missed: str, stamp: int, step: int) -> None:
        """The fast path's keys from ``missed`` on, which found their column full.

        All or nothing: if ``missed`` is the call's first key nothing is queued yet and the
        whole call takes the slow path (which may refuse it); otherwise the call is already
        partly queued and ``on_full="raise"`` lets the rest in (at most one call's keys past
        ``max_buffer``) rather than refuse half a step.
        """
        items = iter(metrics.items())
        first = True
        for key, _value in items:
            if key == missed:
                break
            first = False
        if first:
            return self._log_metrics_slow(metrics, step, None)
        for key, value in [(missed, metrics[missed]), *items]:
            col = self._cols[key]
            if len(col) >= self._cap and not self._make_room(col, partial=True, queued_some=True):
                continue
            col += (stamp, value, step)
        return None

    def _boundary(self, step: int) -> None:
        self._step = step
        ts = _now_ms()
        if ts != self._ts:
            self._ts = ts
        if self.asleep:
            self.asleep = False
            self.wake()

    def _make_room(self, col: list[Any], *, partial: bool = False, queued_some: bool = False) -> bool:
        """Apply ``on_full`` once the buffer holds ``max_buffer`` records; False means drop this record.

        ``partial``: part of this call may be queued already, so ``on_full="raise"`` lets it in.
        ``queued_some``: part of this call is queued: a close that began meanwhile lets the rest
        in too (all or nothing; the writer's last drain waits for calls in flight).
        """
        if queued_some and self._closed_reason is not None:
            return True
        self.check_usable()
        if self.queued() < self._max_buffer:
            # this column grows past its share: shrink the other keys' shares, or the fast path would
            # let them fill the room it takes (rare: only while the writer is behind)
            with self.count_lock:
                self._refresh_cap()
            return True
        if self._on_full == "drop":
            with self._lock:
                self._dropped += 1
                warn = not self._warned_drop
                self._warned_drop = True
            if warn:
                warnings.warn(
                    f"steplog: the buffer is full ({self._max_buffer} records) and on_full='drop': dropping "
                    "records until the writer catches up (counted in run.stats().dropped)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        if self._on_full == "raise":
            if partial:
                return True
            raise self._full_error()
        if self.loop_thread == threading.get_ident():
            raise BufferFullError(
                f"the buffer is full ({self._max_buffer} records) and waiting here would block the event loop "
                "the writer runs in: await run.aflush() now and then to let it catch up"
            )
        self.wake()
        with self._drained:
            while self.queued() >= self._max_buffer:
                if queued_some and self._closed_reason is not None:
                    return True
                self.check_usable()
                if not self.writer_alive():
                    raise BufferFullError(f"the buffer is full ({self._max_buffer} records) and the writer has stopped")
                self._drained.wait(0.05)
        return True

    def _full_error(self) -> BufferFullError:
        return BufferFullError(
            f"the buffer is full ({self._max_buffer} records): the writer is behind or stalled. "
            "Raise max_buffer, log less often, or use on_full='block' or 'drop'"
        )

    # ------------------------------------------------------------------ params, tags, artifacts

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params; refuse a key whose value differs from what is already logged."""
        self.check_usable()
        with self._lock:
            staged: dict[str, str] = {}
            for key, value in params.items():
                text = check_param_value(str(key) if isinstance(key, str) else key, value)
                old = self._params.get(key, staged.get(key))
                if old is None:
                    self._param_keys.check_new(key, staged)
                elif old != text:
                    raise ParamChangedError(
                        f"param {key!r} is already logged as {old!r} and cannot change to {text!r}: params are "
                        "immutable (log a new key, or a metric for values that change)"
                    )
                staged[key] = text
            for key, text in staged.items():
                if key not in self._params:
                    self._params[key] = text
                    self._param_keys.add(key)
                    self._events.append(("param", key, text))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (a tag set again is overwritten)."""
        self.check_usable()
        with self._lock:
            staged: list[tuple[str, str]] = []
            for key, value in tags.items():
                if key not in self._tag_keys.files:
                    self._tag_keys.check_new(key, [k for k, _text in staged])
                staged.append((key, check_tag_value(key, value)))
            for key, text in staged:
                self._tag_keys.add(key)
                self._events.append(("tag", key, text))

    def log_artifact(self, record: ArtifactRecord) -> None:
        """Queue an artifact copy or an in-memory artifact."""
        self.check_usable()
        self._events.append(("artifact", record, None))

    # ------------------------------------------------------------------ the writer's side

    def tick(self) -> None:
        """Refresh the shared timestamp (called by the writer at each wake-up)."""
        self._ts = _now_ms()

    def drain(self) -> tuple[list[tuple[str, list[Any]]], list[Event]]:
        """Take everything queued: ``(metrics per key, params/tags/artifacts in order)``.

        Until the writer counts what it took (:meth:`set_pending`), the taken records stay
        counted in :meth:`queued` and the hot path's room is sized with them, so a caller
        racing the drain cannot overfill the buffer past ``max_buffer``.
        """
        metrics, events, _rest = self.drain_part(0, None)
        return metrics, events

    def drain_part(self, start: int, budget: int | None) -> tuple[list[tuple[str, list[Any]]], list[Event], int | None]:
        """Like :meth:`drain`, for the keys from the ``start``-th on, until ``budget`` items are taken.

        Returns what :meth:`drain` does and the index of the first key not looked at (None when
        every key was). Keys keep their first-logged order, so a writer in the caller's event
        loop drains a big backlog in parts and lets the loop run in between (a drain of 86,000
        points takes ~0.5 ms of interpreter time). Each part is a whole drain: counted in
        :meth:`queued` until :meth:`set_pending`, however many parts come before it.
        """
        if self._cap > 0:
            self._cap = 0  # calls during the drain take the slow path, which counts everything
        metrics: list[tuple[str, list[Any]]] = []
        rest: int | None = None
        with self.count_lock:
            cols = list(self._cols.items())
            taken = 0
            for i in range(start, len(cols)):
                if budget is not None and taken >= budget:
                    rest = i
                    break
                key, col = cols[i]
                n = len(col)
                if n:
                    items = col[:n]
                    self._in_drain += n // 3  # counted before the column shrinks
                    del col[:n]
                    metrics.append((key, items))
                    taken += n
            self._refresh_cap()
        events: list[Event] = []
        pop = self._events.popleft
        while True:
            try:
                events.append(pop())
            except IndexError:
                break
        return metrics, events, rest

    def notify_drained(self) -> None:
        """Wake callers blocked by ``on_full="block"``."""
        with self._drained:
            self._drained.notify_all()

    def queued(self) -> int:
        """Records logged and not yet written (in the buffer and in the writer's hands)."""
        return sum(map(len, list(self._cols.values()))) // 3 + self._in_drain + self._pending_records()

    def queued_by_key(self) -> dict[str, int]:
        """Records still in the buffer, per key."""
        return {k: len(c) // 3 for k, c in list(self._cols.items()) if c}

    def has_events(self) -> bool:
        return bool(self._events)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def current_step(self) -> int:
        return self._step

    def set_pending(self, pending: int) -> None:
        """Size the hot path's room from the records the writer holds (called when that number changes).

        Each key's column may grow, without leaving the fast path, to an equal share of
        what ``max_buffer`` leaves beside the writer's records; past it a call takes the
        slow path, where ``on_full`` applies once the whole run holds ``max_buffer``. So
        memory stays bounded by ``max_buffer`` however many keys there are.
        """
        with self.count_lock:
            self._pending_seen = pending
            self._in_drain = 0  # what drain() took is counted in ``pending`` now
            self._refresh_cap()

    def _refresh_cap(self) -> None:
        """Set the per-key limit so that all columns together cannot pass ``max_buffer`` on the fast path.

        Water-filling: a column already longer than the fair share keeps its records but may
        not grow; the others share what is left.
        """
        budget = self._max_buffer - self._pending_seen - self._in_drain
        lengths = [len(c) // 3 for c in list(self._cols.values())]
        remaining = len(lengths)
        limit = 0
        if remaining and budget > 0:
            limit = budget // remaining
            if max(lengths) > limit:  # rare: some columns are long (a stalled writer, a new key)
                for n in sorted(lengths, reverse=True):
                    if n <= limit or remaining == 1:
                        break
                    budget -= n
                    remaining -= 1
                    limit = max(0, budget) // remaining
        self._cap = 3 * limit
        if self._closed_reason is not None or self._forked:
            self._cap = -1  # close() or a fork won a race with this update: keep refusing

    def close(self, reason: str) -> None:
        """Refuse further calls with a RunStateError carrying ``reason``."""
        self._closed_reason = reason
        self._cap = -1

    def seal(self, reason: str) -> None:
        """Refuse further calls (the writer's last drain follows): like :meth:`close`, unless already closed."""
        if self._closed_reason is None:
            self.close(reason)

    def detach(self) -> None:
        """Stop tracking this buffer for fork handling."""
        _live_buffers.discard(self)

    @staticmethod
    def calls_in_flight() -> bool:
        """True if a thread other than the current one is inside a Buffer method right now.

        A call that passed the hot path's room check just before :meth:`seal` appends after it;
        the writer's last drain waits for such calls to leave (they need the interpreter lock
        for a few bytecodes). Looking at every thread's stack takes microseconds, where
        sleeping a fixed two switch intervals cost every ``close()`` 10 ms. Any buffer counts
        (frames are not asked whose ``self`` they hold): at worst the wait covers another
        run's call too, and it is bounded by the caller.
        """
        me = threading.get_ident()
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            f: Any = frame
            while f is not None:
                if f.f_code in _BUFFER_CODES:
                    return True
                f = f.f_back
        return False


_BUFFER_CODES = frozenset(fn.__code__ for fn in vars(Buffer).values() if callable(fn) and hasattr(fn, "__code__"))
"""Code objects of Buffer's methods: a frame running one of them is a call in flight."""


def _for_keys(keys: Any, convert: Callable[[Any], int], value: Any) -> int:
    """``convert(value)``, with a refusal naming the metric key(s) it was logged for."""
    try:
        return convert(value)
    except InvalidValueError as exc:
        names = ", ".join(repr(k) for k in list(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        raise InvalidValueError(f"metric {names}: {exc}") from None


def _noop() -> None:
    return None
