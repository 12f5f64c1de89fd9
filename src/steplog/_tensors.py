"""Device tensors as metric values: read back in bulk, without stalling the device.

``float(loss)`` on a CUDA tensor makes the CPU wait until the GPU has finished
everything queued so far. Instead, a log call with a CUDA tensor keeps a
reference to it (detached from autograd) and puts a *placeholder* in the metric's
column where a float would go. The writer, when it drains the buffer, gathers
every placeholder it finds, stacks their tensors on the device (one stack per
device, stream and dtype), copies the stack once into pinned host memory without
blocking, and records a CUDA event after the copy. Once the event has completed
it replaces the placeholders by the floats, before any sink sees the batch, so a
sink only ever gets floats and a key's records keep their order (a key's records
after a value still in flight wait with it).

Why the writer, not the log call, does the device work: the launch-bound figures
of ``benchmarks/gpu_sync.py`` show a stack, a copy and an event record per step costing the training
thread more than the sync they avoid. The logging thread pays only a few attribute reads and one small list per
value; the device work happens once per writer cycle (at most every
``flush_interval``), on the stream that was current when each value was logged,
so the read is ordered after the work that produced it, as ``.item()`` would be.

The value written is what ``float(t.item())`` returns, bit for bit: ``stack``
keeps the dtype (one stack per dtype) and ``tolist()`` converts as ``item()``.

Bounds (documented in the README):

* at most ``max_outstanding`` values (default :data:`MAX_OUTSTANDING`) logged
  and not yet read back; beyond that a log call reads its value with a blocking
  ``.item()`` and counts it in ``run.stats().blocking_reads``. A waiting value
  holds its tensor: a fresh scalar result is one 512-byte block of PyTorch's
  caching allocator, so device memory held for logging stays under
  ``max_outstanding * 512`` bytes (8 MiB by default);
* at most ``ring`` copies (default :data:`RING`) in flight; when the ring is
  full the writer leaves new values waiting on the device until a copy
  completes (they count towards ``max_outstanding``);
* if a stack or copy fails (no device memory left for it), the writer reads
  those values one by one with ``.item()`` and counts them as blocking reads.

A tensor whose value could change before the writer reads it is copied on the
device at the log call instead (one small kernel, still no sync): a view (it
would also pin its base's memory), a leaf that requires grad (a parameter), a
tensor that has already been modified in place (an accumulator), and an
inference-mode tensor (no version counter to check). A fresh tensor modified in
place after it was logged is detected through its version counter; that point
is dropped, counted in ``stats().dropped`` and reported in the ``steplog``
logger, because its logged value no longer exists anywhere.

CPU tensors are read at the call (``float(t.item())``, with the checks of
:func:`~steplog._validation.to_value`, which numpy and every other value go
through). Other torch devices (MPS, XPU) are read with a blocking ``.item()``.
JAX arrays on an accelerator start an asynchronous host copy at the log call
(``copy_to_host_async``) and are read once ``is_ready()``; JAX arrays are
immutable, so no copy on the device is needed.

torch and jax are never imported by steplog: a value's type is recognised by
the name of the module that defines it; only then is the module looked up (it
is already imported, since the value exists).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from ._errors import InvalidValueError
from ._validation import to_value

__all__ = ["MAX_OUTSTANDING", "RING", "DeviceValues"]

log = logging.getLogger("steplog")

MAX_OUTSTANDING = 16_384
"""Values logged from a device and not yet read back, before log calls read with a blocking copy."""
RING = 8
"""Device-to-host copies in flight at once."""

# A placeholder is a plain list (the cheapest object to make on the logging thread):
#   waiting:   [tensor, device, stream, dtype]
#   copied:    [None, _Copy, index, dtype]
#   dropped:   [None, None, step, None]       (modified in place before it was read)
#   JAX:       [array, _JAX, None, None]
_JAX = object()
_WAIT = object()
_POLL_S = 0.0005


class Backend(Protocol):
    """The device operations the deferral needs (CUDA in production, a CPU stand-in in tests)."""

    def stream(self, device: int) -> int:
        """An id of the stream current on ``device`` for the calling thread."""
        ...

    def copy(self, device: int, stream: int, tensors: list[Any]) -> tuple[Any, Any]:
        """Stack ``tensors`` on ``stream``, start a copy to host memory, return ``(host, event)``."""
        ...

    def done(self, event: Any) -> bool:
        """True once the copy behind ``event`` has completed (never blocks)."""
        ...

    def wait(self, event: Any) -> None:
        """Block until the copy behind ``event`` has completed."""
        ...


class CudaBackend:
    """Stack, non-blocking copy into pinned memory, and an event, on the logging stream."""

    def __init__(self) -> None:
        self._torch: Any = importlib.import_module("torch")
        raw = getattr(self._torch._C, "_cuda_getCurrentRawStream", None)
        if raw is None:  # older builds: the public (slower) way
            cuda = self._torch.cuda
            raw = lambda device: cuda.current_stream(device).cuda_stream  # noqa: E731
        self.stream: Callable[[int], int] = raw
        self._streams: dict[tuple[int, int], Any] = {}

    def _stream_object(self, device: int, stream: int) -> Any:
        found = self._streams.get((device, stream))
        if found is None:
            cuda = self._torch.cuda
            default = cuda.default_stream(device)
            found = default if default.cuda_stream == stream else cuda.ExternalStream(stream, device=device)
            self._streams[(device, stream)] = found
        return found

    def copy(self, device: int, stream: int, tensors: list[Any]) -> tuple[Any, Any]:
        torch = self._torch
        s = self._stream_object(device, stream)
        with torch.cuda.stream(s):
            # non_blocking into the CPU allocates the host tensor from the pinned caching allocator
            host = torch.stack(tensors).to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record(s)
        return host, event

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def wait(self, event: Any) -> None:
        event.synchronize()


class _Copy:
    """One device-to-host copy in flight: its event, the host tensor, then the values."""

    __slots__ = ("event", "host", "values")

    def __init__(self, host: Any, event: Any) -> None:
        self.host = host
        self.event = event
        self.values: list[float] | None = None

    def finish(self) -> None:
        # map(float, ...) turns integer dtypes' ints into floats exactly as float(t.item()) does
        self.values = list(map(float, self.host.tolist()))
        self.host = None
        self.event = None


class DeviceValues:
    """The buffer's value hook (:meth:`convert`) and the writer's resolution step (:meth:`resolve`)."""

    def __init__(
        self,
        *,
        flush_interval: float = 0.05,
        max_outstanding: int = MAX_OUTSTANDING,
        ring: int = RING,
        backend: Backend | None = None,
        defer_cpu: bool = False,
    ) -> None:
        self._handlers: dict[type, Callable[[str, Any], Any]] = {}
        self._max = max_outstanding
        self._ring = ring
        self._seal_gap = flush_interval / 2  # writer cycles are about flush_interval apart
        self._backend = backend
        self._defer_cpu = defer_cpu
        self._torch: Any = None
        self._ok_dtypes: set[Any] = set()
        self._seq = itertools.count(1)
        self._read = 0  # written by the writer only
        self._inflight: deque[_Copy] = deque()
        self._last_seal = -1e300
        self._held: dict[str, list[Any]] = {}
        self._warned: set[str] = set()
        self.keys: set[str] = set()
        """Metric keys that ever got a deferred value; empty means the writer skips resolution."""
        self.held_points = 0
        """Records the writer holds back until their device values arrive."""
        self._call_reads = 0  # blocking reads at the log call (bound reached); logging threads only
        self._writer_reads = 0  # blocking reads in the writer (the stacked copy failed); writer only
        self.dropped = 0
        """Points dropped because their tensor was modified in place before it was read."""

    @property
    def blocking_reads(self) -> int:
        """Values read with a blocking copy: at the log call past the bound, or by the writer when a stack failed."""
        return self._call_reads + self._writer_reads

    # ------------------------------------------------------------------ the logging thread

    def convert(self, key: str, value: Any) -> Any:
        """Turn a non-float metric value into a float, or into a placeholder the writer resolves."""
        handler = self._handlers.get(value.__class__)
        if handler is None:
            handler = self._classify(value.__class__)
        return handler(key, value)

    def _classify(self, cls: type) -> Callable[[str, Any], Any]:
        root = str(getattr(cls, "__module__", "") or "").partition(".")[0]
        handler: Callable[[str, Any], Any] = to_value
        if root == "torch":
            torch = importlib.import_module("torch")  # already imported: the value is a tensor
            if cls is torch.Tensor or issubclass(cls, torch.nn.Parameter):
                # other subclasses (DTensor, fake tensors) may run collectives or lack storage: plain path
                self._torch = torch
                handler = self._defer_torch if self._defer_cpu else self._torch_value
        elif root in ("jax", "jaxlib"):
            handler = self._jax_value
        self._handlers[cls] = handler
        return handler

    def _torch_value(self, key: str, t: Any) -> Any:
        if t.is_cuda:
            return self._defer_torch(key, t)
        # CPU (and MPS/XPU) tensors: a synchronous read, as to_value would do, in a third of its time
        if t.ndim and t.numel() != 1:
            raise self._not_scalar(key, t)
        if t.dtype not in self._ok_dtypes:
            self._check_dtype(key, t.dtype)
        return float(t.item())

    def _defer_torch(self, key: str, t: Any) -> Any:
        if t.ndim:
            if t.numel() != 1:
                raise self._not_scalar(key, t)
            t = t.reshape(())
        dtype = t.dtype
        if dtype not in self._ok_dtypes:
            self._check_dtype(key, dtype)
        grad = t.requires_grad
        try:
            fresh = not t._version and t._base is None and not (grad and t.is_leaf)
        except RuntimeError:  # an inference-mode tensor has no version counter to check later
            fresh = False
        if fresh:
            if grad:
                t = t.detach()  # keep the value, not the autograd graph (and its activations)
        else:
            t = t.detach().clone()  # its value may change before the writer reads it: copy it now
        if next(self._seq) - self._read - self._call_reads > self._max:
            self._call_reads += 1
            return float(t.item())
        backend = self._backend
        if backend is None:
            backend = self._backend = CudaBackend()
        device = t.get_device()
        self.keys.add(key)
        return [t, device, backend.stream(device), dtype]

    @staticmethod
    def _not_scalar(key: str, t: Any) -> InvalidValueError:
        return InvalidValueError(
            f"metric {key!r}: a tensor of shape {tuple(t.shape)} is not allowed: metric values must hold exactly "
            f"one element (got {t.numel()}): reduce it first, e.g. with .mean(), .sum() or .norm()"
        )

    def _check_dtype(self, key: str, dtype: Any) -> None:
        torch = self._torch
        if dtype is torch.bool:
            raise InvalidValueError(
                f"metric {key!r}: a bool tensor is not allowed: metric values must be real numbers "
                "(log t.float() for a 0/1 value)"
            )
        if dtype.is_complex:
            raise InvalidValueError(f"metric {key!r}: a complex tensor is not allowed: metric values must be real")
        self._ok_dtypes.add(dtype)

    def _jax_value(self, key: str, x: Any) -> Any:
        start_copy = getattr(x, "copy_to_host_async", None)
        if start_copy is None:  # a tracer or another jax type: the plain rules apply (and explain)
            return to_value(key, x)
        if not self._defer_cpu and all(d.platform == "cpu" for d in x.devices()):
            return to_value(key, x)
        size = int(x.size)
        if size != 1:
            raise InvalidValueError(
                f"metric {key!r}: an array of shape {tuple(x.shape)} is not allowed: metric values must hold "
                f"exactly one element (got {size}): reduce it first, e.g. with .mean() or .sum()"
            )
        kind = getattr(x.dtype, "kind", "")
        if kind in ("b", "c"):
            what = "bool" if kind == "b" else "complex"
            raise InvalidValueError(f"metric {key!r}: a {what} array is not allowed: metric values must be real")
        if next(self._seq) - self._read - self._call_reads > self._max:
            self._call_reads += 1
            return float(x.item())
        start_copy()
        self.keys.add(key)
        return [x, _JAX, None, None]

    # ------------------------------------------------------------------ the writer

    async def resolve(
        self,
        metrics: list[tuple[str, list[Any]]],
        *,
        wait: bool,
        on_hold: Callable[[], object] | None = None,
    ) -> list[tuple[str, list[Any]]]:
        """Replace placeholders by floats; hold back each key's records from its first value in flight.

        With ``wait`` (a barrier or close) every value is copied and waited for, so nothing is held;
        ``on_hold`` is called when the records are held for that wait (so the writer counts them).
        """
        work = self._merge(metrics)
        if self._inflight:
            self._poll()  # frees ring slots before sealing
        self._seal(work, force=wait)
        self._poll()
        if wait and (self._inflight or self._jax_waiting(work)):
            # hold everything while waiting, so a barrier that times out (is cancelled) loses nothing
            self._held = dict(work)
            self.held_points = sum(len(items) for _key, items in work) // 3
            if on_hold is not None:
                on_hold()
            while self._inflight or self._jax_waiting(work):
                await anyio.sleep(_POLL_S)
                self._poll()
            work = self._merge([])
        return self._substitute(work, block=False)

    def resolve_blocking(self, metrics: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
        """Like ``resolve(wait=True)`` without an event loop (the emergency path at exit)."""
        work = self._merge(metrics)
        self._seal(work, force=True)
        backend = self._backend
        while self._inflight:
            copy = self._inflight.popleft()
            if backend is not None:
                backend.wait(copy.event)
            copy.finish()
        return self._substitute(work, block=True)

    def held_by_key(self) -> dict[str, int]:
        """Records held back per key (for messages naming what is unwritten)."""
        return {key: len(items) // 3 for key, items in list(self._held.items())}

    def _merge(self, metrics: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
        held = self._held
        if not held:
            return metrics
        work: list[tuple[str, list[Any]]] = []
        for key, items in metrics:
            older = held.pop(key, None)
            work.append((key, items if older is None else older + items))
        work.extend(held.items())
        held.clear()
        self.held_points = 0
        return work

    def _seal(self, work: list[tuple[str, list[Any]]], *, force: bool) -> None:
        """Start one copy per (device, stream, dtype) for the placeholders not copied yet."""
        now = time.monotonic()
        if not force and (len(self._inflight) >= self._ring or now - self._last_seal < self._seal_gap):
            return  # the ring is full, or a copy started less than flush_interval ago: wait on the device
        keys = self.keys
        groups: dict[tuple[Any, Any, Any], list[list[Any]]] = {}
        for key, items in work:
            if key not in keys:
                continue
            for i in range(1, len(items), 3):
                p = items[i]
                if p.__class__ is list and p[0] is not None and p[1] is not _JAX:
                    t = p[0]
                    try:
                        changed = t._version != 0
                    except RuntimeError:  # our own inference-mode copy: nobody else can change it
                        changed = False
                    if changed:
                        self._drop(key, p, items[i + 1])
                    else:
                        groups.setdefault((p[1], p[2], p[3]), []).append(p)
        if not groups:
            return
        backend = self._backend
        assert backend is not None
        for (device, stream, _dtype), placeholders in groups.items():
            tensors = [p[0] for p in placeholders]
            try:
                host, event = backend.copy(device, stream, tensors)
            except Exception as exc:  # e.g. no device memory left for the stack: read them one by one
                copy = _Copy(None, None)
                copy.values = [float(t.item()) for t in tensors]
                self._writer_reads += len(tensors)
                log.warning("steplog: copying %d device values failed (%s); read them one by one", len(tensors), exc)
            else:
                copy = _Copy(host, event)
                self._inflight.append(copy)
            for index, p in enumerate(placeholders):
                p[0] = None  # the tensor's memory goes back to the allocator (stream-ordered: safe)
                p[1] = copy
                p[2] = index
        self._last_seal = now

    def _drop(self, key: str, p: list[Any], step: Any) -> None:
        p[0] = p[1] = p[3] = None
        p[2] = step
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "steplog: metric %r: the tensor logged at step %s was modified in place (e.g. by += or zero_()) "
                "before steplog read it, so its logged value is gone and the point is dropped (counted in "
                "run.stats().dropped). Log a copy (t.clone()) or a fresh tensor instead.",
                key,
                step,
            )

    def _poll(self) -> None:
        backend = self._backend
        if backend is None:
            return
        remaining: deque[_Copy] = deque()
        for copy in self._inflight:
            if backend.done(copy.event):
                copy.finish()
            else:
                remaining.append(copy)  # streams may complete out of order: check every copy
        self._inflight = remaining

    def _jax_waiting(self, work: list[tuple[str, list[Any]]]) -> bool:
        for key, items in work:
            if key in self.keys:
                for i in range(1, len(items), 3):
                    p = items[i]
                    if p.__class__ is list and p[1] is _JAX and not _jax_ready(p[0]):
                        return True
        return False

    def _substitute(self, work: list[tuple[str, list[Any]]], *, block: bool) -> list[tuple[str, list[Any]]]:
        """Put the floats in place of the placeholders (in the drained lists, which the writer owns)."""
        keys = self.keys
        out: list[tuple[str, list[Any]]] = []
        read = 0
        for key, items in work:
            if key not in keys:
                out.append((key, items))
                continue
            dropped = False
            n = len(items)
            for i in range(1, n, 3):
                v = items[i]
                if v.__class__ is list:
                    copy = v[1]
                    if copy.__class__ is _Copy and v[0] is None and copy.values is not None:
                        items[i] = copy.values[v[2]]  # the common case, inlined
                        read += 1
                        continue
                    value = self._value_of(v, block)
                    if value is _WAIT:
                        self._held[key] = items[i - 1 :]
                        self.held_points += (n - i + 1) // 3
                        del items[i - 1 :]
                        break
                    read += 1
                    if value is None:  # modified in place before it was read
                        self.dropped += 1
                        dropped = True
                    items[i] = value
            if dropped:
                items = [x for j in range(0, len(items), 3) if items[j + 1] is not None for x in items[j : j + 3]]
            if items:
                out.append((key, items))
        self._read += read
        return out

    @staticmethod
    def _value_of(p: list[Any], block: bool) -> Any:
        tag = p[1]
        if tag is _JAX:
            x = p[0]
            if block or _jax_ready(x):
                return float(x.item())
            return _WAIT
        if tag is None:
            return None
        if p[0] is not None:
            return _WAIT  # not copied yet (the ring was full)
        values = tag.values
        if values is None:
            return _WAIT
        return values[p[2]]


def _jax_ready(x: Any) -> bool:
    is_ready = getattr(x, "is_ready", None)
    return True if is_ready is None else bool(is_ready())


def __getattr__(name: str) -> Any:
    # the CPU stand-ins moved to steplog.testing; benchmarks/gpu_sync.py still imports them from here
    if name in ("CpuBackend", "ManualEvent", "defer_cpu_tensors"):
        from . import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
