"""A property test: random sequences of log/flush/close on sync and async runs match a simple model, read back.

The model is a list of ``(step, value, timestamp)`` per key in call order; the run is read
back through ``steplog.Store`` after a barrier (checking what is there mid-run) and after close.
Every value is unique or has its own explicit timestamp, so steplog's write-once rule for
identical points never applies and the model stays exact.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steplog
from steplog import Store

KEYS = ("loss", "acc", "grp/a", "grp/b", "x.y")
SPECIAL = (math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308)

steps = st.one_of(st.none(), st.integers(min_value=-3, max_value=40))
metric_op = st.tuples(
    st.just("metric"),
    st.sampled_from(KEYS),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64), st.sampled_from(SPECIAL)),
    steps,
    st.booleans(),  # an explicit timestamp
)
metrics_op = st.tuples(
    st.just("metrics"),
    st.lists(st.sampled_from(KEYS), min_size=1, max_size=len(KEYS), unique=True),
    st.floats(allow_nan=False, allow_infinity=False),
    steps,
    st.booleans(),
)
flush_op = st.tuples(st.just("flush"), st.none(), st.none(), st.none(), st.none())
programs = st.lists(st.one_of(metric_op, metrics_op, flush_op), max_size=60)


class Model:
    """What the store must hold: per key, ``(step, value bits, timestamp or None)`` in call order."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, bytes, int | None]]] = {}
        self.step = 0
        self.counter = 0

    def apply(self, run: steplog.Run, op: tuple[Any, ...]) -> None:
        kind, keys, value, step, explicit = op
        if kind == "flush":
            return
        if step is not None:
            self.step = step
        self.counter += 1
        timestamp = 1_600_000_000_000 + self.counter if explicit else None
        names = [keys] if kind == "metric" else keys
        values = {}
        for i, name in enumerate(names):
            v = value
            if not explicit:
                # a unique value per call (the write-once rule drops identical points of one step and stamp);
                # special values (NaN, infinities, -0.0) travel with explicit, unique timestamps
                v = self.counter * 1000 + i + (v % 1.0 if math.isfinite(v) else 0.5)
            values[name] = v
            self.points.setdefault(name, []).append((self.step, _bits(v), timestamp))
        if kind == "metric":
            run.log_metric(keys, values[keys], step=step, timestamp=timestamp)
        else:
            run.log_metrics(values, step=step, timestamp=timestamp)

    def check(self, store: Path, run_id: str) -> None:
        reader = Store(store)
        for key, points in self.points.items():
            history = reader.metric_history(run_id, key)
            assert [(s, b) for s, b, _t in points] == [(p.step, _bits(p.value)) for p in history], key
            assert [t for _s, _b, t in points if t is not None] == [
                p.timestamp for p, (_s, _b, t) in zip(history, points, strict=True) if t is not None
            ]


def _bits(value: float) -> bytes:
    """The float's exact bits (NaN, -0.0 and subnormals compare exactly)."""
    return struct.pack("<d", value)


def _fresh_store() -> Path:
    return Path(tempfile.mkdtemp(prefix="steplog-model-")) / "mlruns"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_sync_runs_match_the_model(program: list[tuple[Any, ...]]) -> None:
    """Any sequence of log_metric/log_metrics/flush on a sync run reads back exactly as the model says."""
    store = _fresh_store()
    try:
        model = Model()
        with steplog.start_run("model", tracking_uri=store, handle_signals=False, flush_interval=0.002) as run:
            for op in program:
                if op[0] == "flush":
                    run.flush()
                    model.check(store, run.run_id)
                else:
                    model.apply(run, op)
        model.check(store, run.run_id)
        assert steplog.RunStatus.FINISHED == Store(store).get_run(run.run_id).status
        assert sum(map(len, model.points.values())) == run.stats().written
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs, backend=st.sampled_from(["asyncio", "trio"]))
def test_async_runs_match_the_model(program: list[tuple[Any, ...]], backend: str) -> None:
    """The same programs on an ``async with`` run (asyncio and trio), with ``await aflush()`` as the barrier."""
    store = _fresh_store()
    try:
        model = Model()

        async def main() -> str:
            async with steplog.start_run(
                "model", tracking_uri=store, handle_signals=False, flush_interval=0.002
            ) as run:
                for op in program:
                    if op[0] == "flush":
                        await run.aflush()
                        model.check(store, run.run_id)
                    else:
                        model.apply(run, op)
            return run.run_id

        run_id = anyio.run(main, backend=backend)
        model.check(store, run_id)
        assert steplog.RunStatus.FINISHED == Store(store).get_run(run_id).status
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
