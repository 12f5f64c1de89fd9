"""Metric lines for a whole batch of one key in a few C-level calls (used by the mlruns sink).

The mlruns sink writes one line per point, ``b"%d %b %d\\n" % (timestamp, value_text, step)``,
with the value spelled by orjson (shortest text that reads back to the same bits) and NaN and
the infinities as ``nan``/``inf``/``-inf`` (:func:`steplog._layout.encode_metric_lines`). Doing
that per point costs a Python-level tuple, a ``%`` and a split per point, all while the writer
holds the interpreter lock the training loop needs.

Here orjson formats the whole batch at once: the points, zipped into tuples, become one JSON
array of arrays (``[[ts,value,step],[ts,value,step]]``) and two ``bytes.replace`` calls turn it
into lines. When the points share a few timestamps (the buffer stamps a step once, so a batch
of one key usually holds one or a handful of distinct stamps), each run of equal stamps is
encoded without its stamp, and the stamp's text is put back by the same ``replace`` that makes
the line ends. The output is byte for byte what :func:`steplog._layout.encode_metric_lines`
writes; a batch with a non-finite value or an integer outside orjson's 64-bit range is handed
to that per-point encoder, so every spelling stays the one MLflow reads back.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import orjson

from ._layout import encode_values

__all__ = ["encode_columns", "encode_columns_reference"]

_NULL = b"null"
_LINE = b"%d %b %d\n"
_MIN_RUN = 32
"""Points per distinct stamp, on average, below which the per-point encoder is as fast."""


def encode_columns(timestamps: Sequence[int], values: Sequence[float], steps: Sequence[int]) -> bytes:
    """The metric-file lines of one key's points, given as three columns of equal length.

    Columns may be lists or ``array('q')``/``array('d')``/``array('q')``. The result equals
    :func:`encode_columns_reference` (the current per-point encoder) for every input.
    """
    n = len(values)
    if n != len(timestamps) or n != len(steps):
        raise ValueError(f"columns of different lengths: {len(timestamps)}, {n}, {len(steps)}")
    if not n:
        return b""
    try:
        runs = _stamp_runs(timestamps)
        if runs is None:
            return encode_columns_reference(timestamps, values, steps)
        parts: list[bytes] = []
        for stamp, start, end in runs:
            whole = start == 0 and end == n
            pairs = zip(values, steps) if whole else zip(values[start:end], steps[start:end])  # noqa: B905
            data = orjson.dumps(list(pairs))
            if _NULL in data:
                return encode_columns_reference(timestamps, values, steps)
            # [[v,s],[v,s]] -> "v s\nTS v s\nTS": drop "[", each "]" becomes a line end and the
            # next line's stamp, each "," a space. One-byte patterns only: CPython replaces those
            # with a memchr loop, several times faster than a multi-byte pattern like "],["
            stamp_text = b"%d" % stamp
            body = data[2:-1].replace(b"[", b"").replace(b"]", b"\n" + stamp_text).replace(b",", b" ")
            parts += (stamp_text, b" ", body[: -len(stamp_text)])
        return b"".join(parts)
    except (orjson.JSONEncodeError, TypeError, OverflowError):
        # an int beyond 64 bits, a float subclass orjson refuses, ...: the per-point encoder decides
        return encode_columns_reference(timestamps, values, steps)


def _stamp_runs(timestamps: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """``(stamp, start, end)`` of each run of equal stamps, or None when runs would not pay off.

    Only when the batch has at most one run per ``_MIN_RUN`` points. The buffer stamps points in
    order (once per step and millisecond), so a run's end is found by bisection; each run is
    then checked to hold its stamp only (``count`` of a slice), so stamps out of order give None,
    never wrong lines. All C-level calls, a few per run.
    """
    n = len(timestamps)
    first = timestamps[0]
    if timestamps.count(first) == n:
        return [(first, 0, n)]
    limit = n // _MIN_RUN
    runs: list[tuple[int, int, int]] = []
    start = 0
    while start < n:
        if len(runs) >= limit:
            return None
        stamp = timestamps[start]
        end = bisect_right(timestamps, stamp, start)  # > start: timestamps[start] == stamp
        if timestamps[start:end].count(stamp) != end - start:
            return None
        runs.append((stamp, start, end))
        start = end
    return runs


def encode_columns_reference(timestamps: Sequence[int], values: Sequence[float], steps: Sequence[int]) -> bytes:
    """The current per-point encoding (:func:`steplog._layout.encode_metric_lines`) of three columns."""
    n = len(values)
    if not n:
        return b""
    items: list[object] = [None] * (3 * n)
    items[0::3] = timestamps
    items[1::3] = encode_values(values if isinstance(values, list) else list(values))
    items[2::3] = steps
    return (_LINE * n) % tuple(items)
