"""The column encoder (``steplog._encode``) writes exactly the bytes of the current per-point encoder."""

from __future__ import annotations

import math
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.store.tracking.file_store import FileStore

from steplog._encode import encode_columns, encode_columns_reference
from steplog._layout import encode_metric_lines

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
STAMPS = st.integers(min_value=0, max_value=2**63 - 1)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 2.2250738585072014e-308, 1e300]),
)


def _interleaved(ts: list[int], vs: list[float], ss: list[int]) -> bytes:
    """The current encoder (what the mlruns sink writes today) on the same points."""
    return encode_metric_lines([x for row in zip(ts, vs, ss, strict=True) for x in row])


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _mlflow_reads(data: bytes) -> list[tuple[int, float, int]]:
    """Each line through MLflow's own metric-line parser."""
    out = []
    for line in data.decode("ascii").splitlines():
        m = FileStore._get_metric_from_line("run", "key", line, "0")
        out.append((m.timestamp, m.value, m.step))
    return out


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[int], list[float], list[int]]:
    """Batches shaped like the buffer's (runs of shared stamps, consecutive steps) and arbitrary ones."""
    n = draw(st.integers(min_value=0, max_value=300))
    values = draw(st.lists(FLOATS, min_size=n, max_size=n))
    if draw(st.booleans()):
        per = draw(st.integers(min_value=1, max_value=max(1, n)))
        t0 = draw(STAMPS.filter(lambda t: t < 2**63 - 1000))
        stamps = [t0 + i // per for i in range(n)]
        s0 = draw(INT64.filter(lambda s: s < 2**63 - 1000))
        steps = list(range(s0, s0 + n))
    else:
        stamps = draw(st.lists(STAMPS, min_size=n, max_size=n))
        steps = draw(st.lists(INT64, min_size=n, max_size=n))
    return stamps, values, steps


@settings(max_examples=300, deadline=None)
@given(batches())
def test_columns_encode_byte_identical_to_current_encoder(batch: tuple[list[int], list[float], list[int]]) -> None:
    """For lists and for array columns, every batch (NaN, ±inf, -0.0, subnormals, int64 extremes,
    shared or distinct stamps) encodes to exactly the current encoder's bytes."""
    ts, vs, ss = batch
    expected = _interleaved(ts, vs, ss)
    assert expected == encode_columns(ts, vs, ss)
    assert expected == encode_columns(array("q", ts), array("d", vs), array("q", ss))
    assert expected == encode_columns_reference(ts, vs, ss)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_mlflow_reads_back_the_same_bits(batch: tuple[list[int], list[float], list[int]]) -> None:
    """MLflow's line parser reads each line back as the same stamp, step and float bits (NaN as NaN)."""
    ts, vs, ss = batch
    got = _mlflow_reads(encode_columns(ts, vs, ss))
    assert [(t, s) for t, _v, s in got] == list(zip(ts, ss, strict=True))
    for (_t, v, _s), want in zip(got, vs, strict=True):
        assert (math.isnan(v) and math.isnan(want)) or _bits(v) == _bits(want)


def test_long_stamp_runs_take_the_run_path_and_stay_exact() -> None:
    """A batch of 2,048 points in 4 runs of one stamp (the buffer's usual shape) encodes exactly,
    including a NaN in the last run (which sends the whole batch to the per-point encoder)."""
    ts = [1_764_000_000_000 + i // 512 for i in range(2048)]
    vs = [i / 7 for i in range(2048)]
    ss = list(range(2048))
    assert _interleaved(ts, vs, ss) == encode_columns(ts, vs, ss)
    vs[-1] = math.nan
    assert encode_columns(ts, vs, ss).endswith(b"1764000000003 nan 2047\n")


def test_stamps_out_of_order_fall_back_and_stay_exact() -> None:
    """Stamps that come back after another one (explicit timestamps) are never merged into one run."""
    ts = [5] * 100 + [7] * 100 + [5] * 100
    vs = [float(i) for i in range(300)]
    ss = list(range(300))
    assert _interleaved(ts, vs, ss) == encode_columns(ts, vs, ss)


def test_steps_beyond_64_bits_fall_back_to_the_current_encoder() -> None:
    """An int orjson cannot write (beyond 64 bits) is still written as the per-point encoder writes it."""
    ts, vs, ss = [1] * 40, [0.5] * 40, [2**70 + i for i in range(40)]
    assert _interleaved(ts, vs, ss) == encode_columns(ts, vs, ss)


def test_columns_of_different_lengths_are_refused() -> None:
    """Columns of different lengths are a caller's bug: a ValueError naming the lengths."""
    with pytest.raises(ValueError, match="columns of different lengths: 1, 2, 1"):
        encode_columns([1], [0.5, 0.25], [1])
