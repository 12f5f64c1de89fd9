"""Pure ``runs/log-batch`` encoding within every server limit (MLFLOW_FORMAT.md §2.6, §3.5).

NaN and infinities are sent as ``"NaN"``/``"Infinity"``/``"-Infinity"``; timestamps and
steps are int64 integers (a bare NaN token or a float timestamp makes the server silently
drop the rest of the request).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from ..._errors import StepLogError
from ..._layout import encode_values

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTITIES_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_TAGS_PER_BATCH",
    "Part",
    "encode_log_batches",
    "encode_parts",
    "join_parts",
]

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BODY_BYTES = 1_000_000

_SPECIAL = {b"nan": b'"NaN"', b"inf": b'"Infinity"', b"-inf": b'"-Infinity"'}
_METRIC = b'{"key":%b,"value":%b,"timestamp":%d,"step":%d}'
_INT64 = (-(2**63), 2**63 - 1)
_FRAME = len(b'{"run_id":"","metrics":[],"params":[],"tags":[]}')


@dataclasses.dataclass(slots=True)
class Part:
    """The entities of one request body, already JSON: several parts join into one request while they fit."""

    metrics: list[bytes] = dataclasses.field(default_factory=list)
    params: list[bytes] = dataclasses.field(default_factory=list)
    tags: list[bytes] = dataclasses.field(default_factory=list)
    param_keys: set[str] = dataclasses.field(default_factory=set)
    tag_keys: set[str] = dataclasses.field(default_factory=set)
    size: int = 0
    """Bytes of the entities with their separators (the body's frame not counted)."""

    @property
    def points(self) -> int:
        return len(self.metrics)

    def fits(self, other: Part, max_bytes: int = MAX_BODY_BYTES, run_id_bytes: int = 34) -> bool:
        """True if ``other`` can join this part in one request (limits, size, no key twice)."""
        metrics = len(self.metrics) + len(other.metrics)
        params = len(self.params) + len(other.params)
        tags = len(self.tags) + len(other.tags)
        return (
            metrics <= MAX_METRICS_PER_BATCH
            and params <= MAX_PARAMS_PER_BATCH
            and tags <= MAX_TAGS_PER_BATCH
            and metrics + params + tags <= MAX_ENTITIES_PER_BATCH
            and _FRAME + run_id_bytes + self.size + other.size <= max_bytes
            and not (self.param_keys & other.param_keys)
            and not (self.tag_keys & other.tag_keys)
        )

    def absorb(self, other: Part) -> None:
        self.metrics += other.metrics
        self.params += other.params
        self.tags += other.tags
        self.param_keys |= other.param_keys
        self.tag_keys |= other.tag_keys
        self.size += other.size


def _encode_metrics(metrics: Iterable[tuple[str, list[Any]]]) -> list[bytes]:
    """One JSON object per point, in order: special floats as strings, int64 timestamps and steps."""
    out: list[bytes] = []
    lo, hi = _INT64
    for key, items in metrics:
        if not items:
            continue
        k = orjson.dumps(key)
        stamps = items[0::3]
        steps = items[2::3]
        texts = encode_values([float(v) for v in items[1::3]])
        for i, text in enumerate(texts):
            if text in _SPECIAL:
                texts[i] = _SPECIAL[text]
        for ts, text, step in zip(stamps, texts, steps, strict=True):
            ts = int(ts)
            step = int(step)
            if not (lo <= ts <= hi and lo <= step <= hi):
                raise StepLogError(f"metric {key!r}: timestamp {ts} or step {step} is outside int64")
            out.append(_METRIC % (k, text, ts, step))
    return out


def encode_parts(
    run_id: str,
    metrics: Iterable[tuple[str, list[Any]]],
    params: Iterable[tuple[str, str]] = (),
    tags: Iterable[tuple[str, str]] = (),
    *,
    max_bytes: int = MAX_BODY_BYTES,
) -> list[Part]:
    """Split a batch into request parts within every limit: params and tags first, then metrics in logged order.

    A key appears once per part among params (and among tags): the last value of a key wins.
    """
    frame = _FRAME + len(orjson.dumps(run_id))
    parts: list[Part] = []
    cur = Part()
    pending: list[tuple[str, str, bytes]] = [
        ("params", k, orjson.dumps({"key": k, "value": v})) for k, v in dict(params).items()
    ]
    pending += [("tags", k, orjson.dumps({"key": k, "value": v})) for k, v in dict(tags).items()]
    # params and tags were deduplicated over the whole batch, so each key is once per part too
    for kind, key, data in pending:
        extra = len(data) + 1
        if frame + extra > max_bytes:
            raise StepLogError(f"one {kind[:-1]} is {len(data)} bytes: more than a request may carry ({max_bytes})")
        entities = len(cur.metrics) + len(cur.params) + len(cur.tags)
        full = len(cur.params) >= MAX_PARAMS_PER_BATCH if kind == "params" else len(cur.tags) >= MAX_TAGS_PER_BATCH
        if full or entities >= MAX_ENTITIES_PER_BATCH or frame + cur.size + extra > max_bytes:
            parts.append(cur)
            cur = Part()
        if kind == "params":
            cur.params.append(data)
            cur.param_keys.add(key)
        else:
            cur.tags.append(data)
            cur.tag_keys.add(key)
        cur.size += extra
    for data in _encode_metrics(metrics):
        extra = len(data) + 1
        if frame + extra > max_bytes:
            raise StepLogError(f"one metric is {len(data)} bytes: more than a request may carry ({max_bytes})")
        n = len(cur.metrics)
        if (
            n >= MAX_METRICS_PER_BATCH
            or n + len(cur.params) + len(cur.tags) >= MAX_ENTITIES_PER_BATCH
            or frame + cur.size + extra > max_bytes
        ):
            parts.append(cur)
            cur = Part()
        cur.metrics.append(data)
        cur.size += extra
    if cur.metrics or cur.params or cur.tags:
        parts.append(cur)
    return parts


def join_parts(run_id: str, parts: Sequence[Part]) -> bytes:
    """The ``runs/log-batch`` body of parts that fit together (see :meth:`Part.fits`)."""
    return b'{"run_id":%b,"metrics":[%b],"params":[%b],"tags":[%b]}' % (
        orjson.dumps(run_id),
        b",".join(m for p in parts for m in p.metrics),
        b",".join(m for p in parts for m in p.params),
        b",".join(m for p in parts for m in p.tags),
    )


def encode_log_batches(
    run_id: str,
    metrics: Iterable[tuple[str, list[Any]]],
    params: Iterable[tuple[str, str]] = (),
    tags: Iterable[tuple[str, str]] = (),
    *,
    max_bytes: int = MAX_BODY_BYTES,
) -> list[tuple[bytes, int]]:
    """Split a batch into ``runs/log-batch`` request bodies within every server limit.

    Returns ``(body, metric points)`` per request, in order: params and tags first, then
    metrics in logged order per key. Each body holds at most 1000 metrics, 100 params,
    100 tags, 1000 entities and ``max_bytes`` bytes; a key appears once per request
    among params (and among tags).
    """
    return [
        (join_parts(run_id, [p]), p.points) for p in encode_parts(run_id, metrics, params, tags, max_bytes=max_bytes)
    ]
