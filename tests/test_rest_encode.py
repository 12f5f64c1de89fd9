"""``runs/log-batch`` encoding (sinks/_rest/encode.py): request limits, special values, int64 stamps and steps."""

from __future__ import annotations

import math

from _rest_fake import bodies, items
from steplog.sinks._rest.encode import MAX_BODY_BYTES, encode_log_batches

# ---------------------------------------------------------------------------- chunking


def test_metrics_are_split_at_1000_per_request_in_logged_order() -> None:
    """2500 points of one key become requests of 1000, 1000 and 500 metrics, in order."""
    decoded = bodies(encode_log_batches("r", [("loss", items(2500))]))
    assert [1000, 1000, 500] == [len(b["metrics"]) for b in decoded]
    assert list(range(2500)) == [m["step"] for b in decoded for m in b["metrics"]]


def test_params_and_tags_are_split_at_100_per_request() -> None:
    """250 params and 150 tags are spread so no request holds more than 100 of either."""
    params = [(f"p{i}", str(i)) for i in range(250)]
    tags = [(f"t{i}", str(i)) for i in range(150)]
    decoded = bodies(encode_log_batches("r", [], params, tags))
    assert all(len(b["params"]) <= 100 and len(b["tags"]) <= 100 for b in decoded)
    assert [f"p{i}" for i in range(250)] == [p["key"] for b in decoded for p in b["params"]]
    assert [f"t{i}" for i in range(150)] == [t["key"] for b in decoded for t in b["tags"]]


def test_entities_are_limited_to_1000_per_request() -> None:
    """100 params, 100 tags and 1000 metrics never share a request beyond 1000 entities."""
    params = [(f"p{i}", "v") for i in range(100)]
    tags = [(f"t{i}", "v") for i in range(100)]
    decoded = bodies(encode_log_batches("r", [("m", items(1000))], params, tags))
    sizes = [len(b["metrics"]) + len(b["params"]) + len(b["tags"]) for b in decoded]
    assert [1000, 200] == sizes
    assert 1000 == sum(len(b["metrics"]) for b in decoded)


def test_request_bodies_stay_under_one_megabyte() -> None:
    """100 params of 6000 characters and 100 tags of 8000 are split by size (no body over 1 MB)."""
    params = [(f"p{i}", "x" * 6000) for i in range(100)]
    tags = [(f"t{i}", "y" * 8000) for i in range(100)]
    chunks = encode_log_batches("r", [], params, tags)
    assert all(len(body) <= MAX_BODY_BYTES for body, _n in chunks)
    assert len(chunks) >= 2
    decoded = bodies(chunks)
    assert 100 == sum(len(b["params"]) for b in decoded)
    assert 100 == sum(len(b["tags"]) for b in decoded)


def test_params_and_tags_are_deduplicated_per_request() -> None:
    """A key given twice is sent once per request: params keep their value, a tag its last value."""
    (body,) = bodies(encode_log_batches("r", [], [("lr", "0.1"), ("lr", "0.1")], [("t", "a"), ("t", "b")]))
    assert [{"key": "lr", "value": "0.1"}] == body["params"]
    assert [{"key": "t", "value": "b"}] == body["tags"]


# ---------------------------------------------------------------------------- encoding


def test_special_values_are_sent_as_strings_and_ints_as_int64() -> None:
    """NaN and infinities become "NaN"/"Infinity"/"-Infinity"; -0.0 and big steps stay exact."""
    big = 2**63 - 1
    items = [1, math.nan, 0, 2, math.inf, 1, 3, -math.inf, 2, 4, -0.0, big, 5, 0.1, -5]
    (body,) = bodies(encode_log_batches("r", [("m", items)]))
    values = [m["value"] for m in body["metrics"]]
    assert ["NaN", "Infinity", "-Infinity", -0.0, 0.1] == values
    assert math.copysign(1.0, values[3]) == -1.0
    assert [0, 1, 2, big, -5] == [m["step"] for m in body["metrics"]]
    assert [1, 2, 3, 4, 5] == [m["timestamp"] for m in body["metrics"]]


def test_numpy_values_are_sent_as_plain_numbers() -> None:
    """A numpy float32 in the batch is encoded as its exact float value, not its short str()."""
    import numpy as np  # in the test extra: a missing numpy must fail, not skip

    (body,) = bodies(encode_log_batches("r", [("m", [1, np.float32(0.1), 0])]))
    assert float(np.float32(0.1)) == body["metrics"][0]["value"]
