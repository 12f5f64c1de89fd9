"""Tensors as metric values: device values read back without a sync, exactly, in order, bounded.

No GPU here: the deferral machinery (placeholders, one stacked copy per writer cycle,
events, the ring, the bound and its blocking fallback) is driven through
``steplog.testing.defer_cpu_tensors``, which treats CPU tensors as device tensors
behind a stand-in backend whose "events" complete when the test says so.
"""

from __future__ import annotations

import logging
import math
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # in the test extra: a missing torch must fail the suite, not skip it
from hypothesis import given, settings
from hypothesis import strategies as st

import steplog
from steplog import InvalidValueError
from steplog._tensors import DeviceValues
from steplog.testing import CpuBackend, MemorySink, defer_cpu_tensors


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def expected_float(t: Any) -> float:
    """What steplog promises: the value written equals ``float(t.item())``."""
    return float(t.item())


def memory_run(**options: Any) -> tuple[steplog.Run, MemorySink]:
    sink = MemorySink()
    return steplog.start_run("tensors", sinks=[sink], **options), sink


def deferred_run(
    *, auto_complete: bool = True, max_outstanding: int | None = None, ring: int | None = None, **options: Any
) -> tuple[steplog.Run, MemorySink, CpuBackend]:
    run, sink = memory_run(**options)
    backend = CpuBackend(auto_complete=auto_complete)
    defer_cpu_tensors(run._tensors, backend, max_outstanding=max_outstanding, ring=ring)
    return run, sink, backend


SPECIAL = [
    torch.tensor(0.1, dtype=torch.float32),
    torch.tensor(-0.0),
    torch.tensor(float("inf")),
    torch.tensor(float("-inf")),
    torch.tensor(1e-45, dtype=torch.float32),  # float32 subnormal
    torch.tensor(3.4028234663852886e38, dtype=torch.float32),
    torch.tensor(1 / 3, dtype=torch.float64),
    torch.tensor(5e-324, dtype=torch.float64),
    torch.tensor(0.1, dtype=torch.float16),
    torch.tensor(0.1, dtype=torch.bfloat16),
    torch.tensor(2**53 + 1, dtype=torch.int64),  # rounds when it becomes a float, as float(item()) does
    torch.tensor(-(2**63), dtype=torch.int64),
    torch.tensor(7, dtype=torch.int32),
    torch.tensor(255, dtype=torch.uint8),
    torch.tensor([0.25]),  # one element, shape (1,)
    torch.tensor([[1.5]], dtype=torch.float64),  # one element, shape (1, 1)
]


def test_deferred_values_are_bit_exact_for_every_dtype() -> None:
    """A deferred tensor of any real dtype is written as exactly float(t.item()), bit for bit."""
    run, sink, backend = deferred_run()
    with run:
        for i, t in enumerate(SPECIAL):
            run.log_metric(f"v{i}", t, step=i)
    assert [bits(expected_float(t)) for t in SPECIAL] == [bits(sink.values(f"v{i}")[0]) for i in range(len(SPECIAL))]
    assert backend.copies >= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=30))
def test_deferred_float64_bits_round_trip(patterns: list[int]) -> None:
    """Any float64 bit pattern (NaN payloads included) logged as a tensor comes back with the same bits."""
    tensors = [torch.tensor(struct.unpack("<d", struct.pack("<Q", p))[0], dtype=torch.float64) for p in patterns]
    values = DeviceValues(flush_interval=0.0)
    defer_cpu_tensors(values)
    items: list[Any] = []
    for step, t in enumerate(tensors):
        items += (0, values.convert("k", t), step)
    out = values.resolve_blocking([("k", items)])
    assert [bits(expected_float(t)) for t in tensors] == [bits(v) for v in out[0][1][1::3]]


def test_mlflow_reads_deferred_tensor_values_back(store: Path, mlflow_client: Any) -> None:
    """MLflow's own reader sees deferred tensor values with their steps, exactly as float(t.item())."""
    values = [torch.tensor(x, dtype=torch.float32) for x in (0.1, 2.5, -3.75, 1e-8)]
    with steplog.start_run("tensors", tracking_uri=store) as run:
        defer_cpu_tensors(run._tensors)
        for step, t in enumerate(values):
            run.log_metrics({"loss": t, "lr": 0.001}, step=step * 10)
    history = mlflow_client.get_metric_history(run.run_id, "loss")
    assert [(s * 10, expected_float(t)) for s, t in enumerate(values)] == [(m.step, m.value) for m in history]
    assert [0.001] * 4 == [m.value for m in mlflow_client.get_metric_history(run.run_id, "lr")]


def log_mixed(run: steplog.Run, convert: Any) -> None:
    """A loop mixing floats and tensors on the same keys, explicit steps and step=None."""
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        loss = torch.rand((), generator=gen, dtype=torch.float64)
        run.log_metric("loss", convert(loss), step=step)
        run.log_metric("loss", 0.5)  # step=None: the current step, after the tensor
        norms = {f"grad/{i}": convert(torch.rand((), generator=gen)) for i in range(5)}
        run.log_metrics({**norms, "lr": 1e-3 * step}, step=step)
        if step % 7 == 0:
            run.log_metric("tokens", convert(torch.tensor(step * 1000, dtype=torch.int64)))


def test_order_and_steps_match_logging_floats() -> None:
    """Deferred tensors give the same (step, value) sequence per key as logging float(t.item()) would."""
    run, tensor_sink, _backend = deferred_run()
    with run:
        log_mixed(run, lambda t: t)
    plain_run, float_sink = memory_run()
    with plain_run:
        log_mixed(plain_run, expected_float)
    assert sorted(float_sink.metrics) == sorted(tensor_sink.metrics)
    for key in float_sink.metrics:
        assert [(p.step, p.value) for p in float_sink.metrics[key]] == [
            (p.step, p.value) for p in tensor_sink.metrics[key]
        ]


def test_records_after_a_value_in_flight_wait_for_it() -> None:
    """A key's later records (floats included) are held back until its earlier device value is read."""
    values = DeviceValues(flush_interval=0.0)
    backend = defer_cpu_tensors(values, CpuBackend(auto_complete=False))
    first: list[Any] = [0, values.convert("a", torch.tensor(1.0)), 0, 0, 2.0, 1]
    other: list[Any] = [0, 9.0, 0]
    out = anyio_run(values.resolve, [("a", first), ("b", other)], wait=False)
    assert [("b", [0, 9.0, 0])] == out
    assert ({"a": 2}, 2) == (values.held_by_key(), values.held_points)
    backend.complete()
    out = anyio_run(values.resolve, [("a", [0, 3.0, 2])], wait=False)
    assert [("a", [0, 1.0, 0, 0, 2.0, 1, 0, 3.0, 2])] == out
    assert 0 == values.held_points


def anyio_run(func: Any, *args: Any, **kwargs: Any) -> Any:
    import anyio

    async def main() -> Any:
        return await func(*args, **kwargs)

    return anyio.run(main)


def test_one_copy_per_cycle_per_dtype() -> None:
    """The writer copies all values of a cycle in one stack per dtype, not one copy per value or step."""
    values = DeviceValues(flush_interval=0.0)
    backend = defer_cpu_tensors(values)
    items: list[Any] = []
    for step in range(50):
        for dtype in (torch.float32, torch.int64):
            items += (0, values.convert("k", torch.tensor(step, dtype=dtype)), step)
    out = anyio_run(values.resolve, [("k", items)], wait=True)
    assert 2 == backend.copies
    assert [float(s) for s in range(50) for _ in range(2)] == out[0][1][1::3]


class StreamsBackend(CpuBackend):
    """A stand-in device whose current stream the test sets, recording which stream each copy ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.copied: list[tuple[int, list[float]]] = []

    def stream(self, device: int) -> int:
        return self.current

    def copy(self, device: int, stream: int, tensors: list[Any]) -> tuple[Any, Any]:
        self.copied.append((stream, [float(t) for t in tensors]))
        return super().copy(device, stream, tensors)


def test_values_are_read_on_the_stream_current_when_they_were_logged() -> None:
    """Each value is copied on the stream that was current at its log call (one copy per stream)."""
    values = DeviceValues(flush_interval=0.0)
    backend = defer_cpu_tensors(values, StreamsBackend())
    items: list[Any] = []
    for step, stream in enumerate([7, 9, 7, 9]):
        backend.current = stream
        items += (0, values.convert("k", torch.tensor(float(step))), step)
    out = anyio_run(values.resolve, [("k", items)], wait=True)
    assert [(7, [0.0, 2.0]), (9, [1.0, 3.0])] == sorted(backend.copied)
    assert [0.0, 1.0, 2.0, 3.0] == out[0][1][1::3]


def test_full_ring_leaves_values_on_the_device_until_a_copy_completes() -> None:
    """With the ring full no new copy starts; once a copy completes, the waiting values are copied next."""
    values = DeviceValues(flush_interval=0.0, ring=1)
    backend = defer_cpu_tensors(values, CpuBackend(auto_complete=False))
    first = anyio_run(values.resolve, [("k", [0, values.convert("k", torch.tensor(1.0)), 0])], wait=False)
    second = anyio_run(values.resolve, [("k", [0, values.convert("k", torch.tensor(2.0)), 1])], wait=False)
    assert ([], [], 1) == (first, second, backend.copies)
    backend.auto_complete = True
    backend.complete()
    third = anyio_run(values.resolve, [], wait=False)
    assert ([("k", [0, 1.0, 0, 0, 2.0, 1])], 2) == (third, backend.copies)


def test_bound_falls_back_to_blocking_reads_and_counts_them() -> None:
    """Past max_outstanding values waiting on the device, a log call reads its value at once and counts it."""
    run, sink, backend = deferred_run(auto_complete=False, max_outstanding=5, ring=1)
    with run:
        for step in range(20):
            run.log_metric("loss", torch.tensor(step / 3), step=step)
        assert 15 == run.stats().blocking_reads
        backend.auto_complete = True
        backend.complete()
        run.flush()
        stats = run.stats()
    assert [expected_float(torch.tensor(s / 3)) for s in range(20)] == sink.values("loss")
    assert list(range(20)) == sink.steps("loss")
    assert (20, 20, 0, 15) == (stats.logged, stats.written, stats.queued, stats.blocking_reads)


def test_flush_waits_for_device_values_and_timeout_names_them() -> None:
    """A barrier waits for values still in flight; timing out, it names the keys still held."""
    run, sink, backend = deferred_run(auto_complete=False)
    with run:
        run.log_metric("loss", torch.tensor(1.5), step=0)
        with pytest.raises(steplog.FlushTimeoutError, match="'loss': 1"):
            run.flush(timeout=0.3)
        assert 1 == run.stats().queued
        backend.auto_complete = True
        backend.complete()
        run.flush()
        assert [1.5] == sink.values("loss")


class FailingCopyBackend(CpuBackend):
    """A device whose stacked copy fails (as when no device memory is left for the stack)."""

    def copy(self, device: int, stream: int, tensors: list[Any]) -> tuple[Any, Any]:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_failed_stacked_copy_falls_back_to_reading_values_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    """When the writer cannot stack and copy, it reads the values one by one: exact, counted, reported."""
    run, sink = memory_run()
    defer_cpu_tensors(run._tensors, FailingCopyBackend())
    with caplog.at_level(logging.WARNING, logger="steplog"), run:
        for step in range(5):
            run.log_metric("loss", torch.tensor(step / 7), step=step)
        run.flush()
        stats = run.stats()
    assert [expected_float(torch.tensor(s / 7)) for s in range(5)] == sink.values("loss")
    assert (5, 5) == (stats.written, stats.blocking_reads)
    assert "read them one by one" in caplog.text


def test_tensor_with_grad_is_logged_without_its_graph() -> None:
    """A loss that requires grad is logged by value; steplog keeps a detached tensor, not the autograd graph."""
    values = DeviceValues(flush_interval=0.0)
    defer_cpu_tensors(values)
    w = torch.randn(100, requires_grad=True)
    loss = (w * w).sum()
    placeholder = values.convert("loss", loss)
    assert (False, None) == (placeholder[0].requires_grad, placeholder[0].grad_fn)
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    out = values.resolve_blocking([("loss", [0, placeholder, 0])])
    assert [expected_float(loss)] == out[0][1][1::3]


def test_values_that_may_change_are_copied_at_the_call() -> None:
    """Parameters, views and accumulators are copied at the log call, so later in-place updates don't leak in."""
    run, sink, _backend = deferred_run()
    param = torch.nn.Parameter(torch.tensor(1.0))
    base = torch.arange(4.0)
    acc = torch.zeros(())
    acc += 5.0  # an accumulator: already modified in place once
    with run:
        run.log_metrics({"param": param, "view": base[2], "acc": acc}, step=0)
        with torch.no_grad():
            param.add_(10.0)
        base[2] = 100.0
        acc.zero_()
        run.flush()
    assert ([1.0], [2.0], [5.0]) == (sink.values("param"), sink.values("view"), sink.values("acc"))


def test_fresh_tensor_changed_in_place_before_read_is_dropped_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """A fresh tensor modified in place after logging is dropped, counted in stats().dropped and reported."""
    # ring=0: no copy starts before the barrier, so the writer cannot read the value before zero_()
    run, sink, backend = deferred_run(auto_complete=False, ring=0)
    fresh = torch.tensor(1.0) * 3  # a fresh result: kept by reference until the writer reads it
    with caplog.at_level(logging.WARNING, logger="steplog"), run:
        run.log_metric("loss", fresh, step=0)
        run.log_metric("loss", torch.tensor(4.0) * 1, step=1)
        fresh.zero_()
        backend.auto_complete = True
        backend.complete()
        run.flush()
        stats = run.stats()
    assert ([4.0], [1]) == (sink.values("loss"), sink.steps("loss"))
    assert (2, 1, 1) == (stats.logged, stats.written, stats.dropped)
    assert "modified in place" in caplog.text


def test_inference_mode_tensors_are_deferred() -> None:
    """Tensors made under torch.inference_mode (no version counter) are copied at the call and logged exactly."""
    run, sink, _backend = deferred_run()
    with run:
        with torch.inference_mode():
            val = torch.tensor(0.7) * 2
            run.log_metric("val_loss", val, step=0)
        run.flush()
    assert [expected_float(val)] == sink.values("val_loss")


@pytest.mark.parametrize("forced", [False, True], ids=["cpu-plain", "deferred"])
@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.ones(2), "reduce it first"),
        (torch.ones(2, 3), "reduce it first"),
        (torch.tensor(True), "bool"),
        (torch.tensor(1 + 2j), "complex"),
    ],
    ids=["vector", "matrix", "bool", "complex"],
)
def test_non_scalar_and_non_real_tensors_are_refused(value: Any, match: str, forced: bool) -> None:
    """A multi-element, bool or complex tensor is refused at the call with InvalidValueError, nothing queued."""
    run, sink = memory_run()
    if forced:
        defer_cpu_tensors(run._tensors)
    with run:
        with pytest.raises(steplog.InvalidValueError, match=match):
            run.log_metric("x", value)
        with pytest.raises(steplog.InvalidValueError, match=match):
            run.log_metrics({"ok": torch.tensor(1.0), "x": value})
        assert 0 == run.stats().logged
    assert {} == sink.metrics


def test_cpu_tensors_and_numpy_take_the_plain_path() -> None:
    """Without a device, tensors and numpy scalars are converted at the call: nothing deferred, no blocking read."""
    run, sink = memory_run()
    with run:
        run.log_metrics({"t": torch.tensor(0.1), "grad": torch.tensor(2.0, requires_grad=True) * 2}, step=0)
        run.log_metrics({"np": np.float32(0.1), "t64": torch.tensor([3], dtype=torch.int64)}, step=0)
        assert set() == run._tensors.keys
    expected = {"t": 0.1, "grad": 4.0, "np": 0.1, "t64": 3.0}
    assert {k: float(np.float32(v)) if k in ("t", "np") else v for k, v in expected.items()} == {
        k: sink.values(k)[0] for k in expected
    }
    assert 0 == run.stats().blocking_reads


@pytest.mark.anyio
async def test_async_run_defers_and_aflush_waits() -> None:
    """In an async run (asyncio and trio) deferred values are written by aflush(), in order."""
    sink = MemorySink()
    async with steplog.start_run("tensors", sinks=[sink]) as run:
        defer_cpu_tensors(run._tensors)
        for step in range(10):
            run.log_metrics({"loss": torch.tensor(step * 0.1), "acc": step / 10}, step=step)
        await run.aflush()
        assert [expected_float(torch.tensor(s * 0.1)) for s in range(10)] == sink.values("loss")
        assert list(range(10)) == sink.steps("loss")


def test_emergency_path_reads_device_values_blocking() -> None:
    """The exit path (no event loop) waits on the device copies and writes exact values."""
    values = DeviceValues(flush_interval=0.0)
    backend = defer_cpu_tensors(values, CpuBackend(auto_complete=False))
    items = [0, values.convert("k", torch.tensor(0.3)), 0]
    assert ([("k", [0, expected_float(torch.tensor(0.3)), 0])], 1) == (
        values.resolve_blocking([("k", items)]),
        backend.waits,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the development machine)")
def test_cuda_tensors_are_logged_exactly_without_a_sync() -> None:
    """On a GPU, CUDA tensors are deferred, never synchronise the device, and equal float(t.item())."""
    run, sink = memory_run()
    values = [torch.randn((), device="cuda") * 10**i for i in range(-5, 6)]
    values += [torch.tensor(2**53 + 1, device="cuda"), torch.tensor(0.1, dtype=torch.bfloat16, device="cuda")]
    w = torch.randn(64, device="cuda", requires_grad=True)
    with run:
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises from here on
        try:
            for step in range(50):
                loss = (w * w).sum()
                run.log_metrics({"loss": loss, **{f"v{i}": v for i, v in enumerate(values)}}, step=step)
            run.flush()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stats = run.stats()
    assert ({"loss", *(f"v{i}" for i in range(len(values)))}, 0, 0) == (
        run._tensors.keys,
        stats.errors,
        stats.blocking_reads,
    )
    assert [bits(expected_float(v)) for v in values] == [bits(sink.values(f"v{i}")[-1]) for i in range(len(values))]
    assert [bits(expected_float((w * w).sum()))] * 50 == [bits(v) for v in sink.values("loss")]


class FakeDevice:
    def __init__(self, platform: str) -> None:
        self.platform = platform


class FakeJaxArray:
    """Just enough of jax.Array's API: copy_to_host_async, is_ready, devices, item, size, dtype."""

    def __init__(self, value: Any, platform: str = "gpu") -> None:
        self._value = np.asarray(value)
        self._platform = platform
        self.copies = 0
        self.ready = False
        self.size = self._value.size
        self.shape = self._value.shape
        self.dtype = self._value.dtype

    def copy_to_host_async(self) -> None:
        self.copies += 1

    def is_ready(self) -> bool:
        return self.ready

    def devices(self) -> set[FakeDevice]:
        return {FakeDevice(self._platform)}

    def item(self) -> Any:
        return self._value.item()

    def __float__(self) -> float:
        return float(self._value)


FakeJaxArray.__module__ = "jaxlib.xla_extension"


def test_jax_arrays_start_an_async_host_copy_and_are_read_when_ready() -> None:
    """A JAX array on an accelerator starts copy_to_host_async at the call and is read once is_ready()."""
    values = DeviceValues(flush_interval=0.0)
    x = FakeJaxArray(np.float32(0.1))
    items = [0, values.convert("loss", x), 0]
    assert (1, [], 1) == (x.copies, anyio_run(values.resolve, [("loss", items)], wait=False), values.held_points)
    x.ready = True
    assert [("loss", [0, float(np.float32(0.1)), 0])] == anyio_run(values.resolve, [], wait=False)


def test_jax_arrays_on_cpu_and_non_scalars() -> None:
    """A JAX array on the CPU is converted at the call; a multi-element one is refused."""
    values = DeviceValues()
    cpu = FakeJaxArray(np.float64(2.5), platform="cpu")
    assert (2.5, 0) == (values.convert("x", cpu), cpu.copies)
    with pytest.raises(steplog.InvalidValueError, match="reduce it first"):
        values.convert("x", FakeJaxArray(np.ones(3)))


def test_real_jax_array_is_logged_exactly() -> None:
    """With jax installed, a jax array is logged as float(x.item())."""
    jnp = pytest.importorskip(
        "jax.numpy",
        reason="jax is optional and not in the test extra (a multi-GB install); "
        "test_jax_arrays_* drive the same code path with a stand-in array on every run",
    )
    run, sink = memory_run()
    x = jnp.float32(0.1) * 3
    with run:
        run.log_metric("x", x, step=0)
    assert [float(x.item())] == sink.values("x")


@pytest.mark.slow
def test_torch_is_never_imported_unless_a_tensor_is_logged(tmp_path: Path) -> None:
    """A run that logs floats, ints and numpy scalars never imports torch (or jax)."""
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import steplog
        from steplog.testing import MemorySink
        with steplog.start_run("x", sinks=[MemorySink()]) as run:
            run.log_metrics({"a": 1.0, "b": 2, "c": np.float32(3.0), "d": np.array(4.0)}, step=0)
        print(sorted(m for m in ("torch", "jax", "jaxlib") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (0, "[]") == (result.returncode, result.stdout.strip()), result.stderr


def test_float_only_runs_never_resolve() -> None:
    """A run that logs no device tensor skips the writer's resolution step entirely."""
    run, sink = memory_run()
    with run:
        run.log_metric("a", 1.0, step=0)
        run.log_metric("b", torch.tensor(2.0), step=0)
    assert (set(), [2.0], 0) == (run._tensors.keys, sink.values("b"), run.stats().blocking_reads)
    assert not math.isnan(sink.values("a")[0])


class _BrokenFloat(float):
    """A float subclass whose conversion raises, as a user's buggy number type might."""

    def __float__(self) -> float:
        raise ArithmeticError("broken __float__")


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.timedelta64(5, "s"),
        lambda: torch.tensor(1.0, device="meta"),
        lambda: _BrokenFloat(1.0),
    ],
    ids=["numpy-timedelta64", "meta-tensor", "float-subclass-raising"],
)
def test_values_that_cannot_be_read_are_refused_naming_the_key(make: Callable[[], Any]) -> None:
    """A value whose conversion raises (TypeError, RuntimeError, anything) becomes InvalidValueError naming the key."""
    sink = MemorySink()
    with steplog.start_run("values", sinks=[sink]) as run:
        run.log_metric("fine", 1.0)
        with pytest.raises(InvalidValueError, match="'odd/value'"):
            run.log_metric("odd/value", make())
        with pytest.raises(InvalidValueError, match="'odd/value'"):
            run.log_metrics({"ok": 2.0, "odd/value": make()})
    assert sink.values("fine") == [1.0]
    assert "odd/value" not in sink.metrics
    assert "ok" not in sink.metrics  # all or nothing
