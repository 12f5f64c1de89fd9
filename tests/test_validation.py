"""MLflow's naming and value rules (MLFLOW_FORMAT.md §2), as steplog enforces them at the call."""

from __future__ import annotations

import decimal
import fractions
import struct
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name

import steplog
from steplog import InvalidKeyError, InvalidValueError
from steplog._validation import (
    INT64_MAX,
    INT64_MIN,
    check_experiment_id,
    check_experiment_name,
    check_key,
    check_param_value,
    check_run_id,
    check_run_name,
    check_tag_value,
    to_step,
    to_timestamp,
    to_value,
)
from steplog.testing import MemorySink


def bits(value: float) -> bytes:
    """The exact bits of a float (so NaN and -0.0 compare as themselves)."""
    return struct.pack("<d", value)


# --------------------------------------------------------------------------- keys

# (key, a word of the rule the message must give) -- every rejected example of MLFLOW_FORMAT.md §2.2
REJECTED_KEYS = [
    ("", "empty"),
    (".", "normalized"),
    ("./a", "normalized"),
    ("../x", "'..'"),
    ("a/../b", "normalized"),
    ("/lead", "absolute"),
    ("trail/", "trailing '/'"),
    ("a//b", "'//'"),
    ("..foo", "'..'"),
    ("a/.", "normalized"),
    ("a\\b", "'\\\\'"),
    ("a*b", "'*'"),
    ("tab\tkey", "'\\t'"),
    ("new\nline", "'\\n'"),
    ("trailing-newline\n", "'\\n'"),
    ("x" * 251, "at most 250"),
]

ACCEPTED_KEYS = ["a..b", "é", "a/..b", "loss", "train/acc/top1", "a b", "a:b", "a-b_c.d", "x" * 250, "0", "日本"]


@pytest.mark.parametrize(("key", "rule"), REJECTED_KEYS)
def test_rejected_keys_name_the_key_and_the_rule(key: str, rule: str) -> None:
    """Every key MLflow refuses is refused with InvalidKeyError (a ValueError) naming the key and the rule."""
    with pytest.raises(InvalidKeyError) as caught:
        check_key(key)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    shown = f"'{key[:40]}..." if len(key) > 250 else repr(key)
    assert shown in message
    assert rule in message


@pytest.mark.parametrize("key", ACCEPTED_KEYS)
def test_accepted_keys_come_back_unchanged(key: str) -> None:
    """Keys MLflow accepts (including 'a..b', 'é' and 'a/..b') are accepted as they are."""
    assert key == check_key(key)


@pytest.mark.parametrize("key", [None, 3, b"loss", ("a",)])
def test_non_str_keys_are_refused(key: object) -> None:
    """A key that is not a str is refused with a message naming its type."""
    with pytest.raises(InvalidKeyError, match=type(key).__name__):
        check_key(key)


@pytest.mark.parametrize("kind", ["metric", "param", "tag"])
def test_key_errors_name_the_kind(kind: str) -> None:
    """The message says whether the bad key was a metric, param or tag key."""
    with pytest.raises(InvalidKeyError, match=f"^{kind} key '../x'"):
        check_key("../x", kind)


@settings(deadline=None)  # the machine is shared: timings are noisy
@given(st.text(alphabet="ab./-_ :é\\*", max_size=8))
def test_keys_follow_mlflows_own_validator(key: str) -> None:
    """steplog accepts a key exactly when MLflow 3.17's own validator accepts it (keys without newlines)."""
    try:
        _validate_metric_name(key)  # type: ignore[no-untyped-call]  # mlflow leaves its validator unannotated
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    try:
        check_key(key)
        steplog_ok = True
    except InvalidKeyError:
        steplog_ok = False
    assert mlflow_ok == steplog_ok


def test_experiment_names() -> None:
    """Experiment names are non-empty str of at most 500 characters."""
    assert "x" * 500 == check_experiment_name("x" * 500)
    for bad, rule in [("", "empty"), ("x" * 501, "500"), (None, "str")]:
        with pytest.raises(InvalidKeyError, match=rule):
            check_experiment_name(bad)


def test_param_and_tag_values_are_str_and_bounded() -> None:
    """Params and tags are stored as str(value) (None as ''); over-long values are refused, naming the key."""
    assert "0.001" == check_param_value("lr", 1e-3)
    assert "" == check_param_value("lr", None)
    assert "x" * 6000 == check_param_value("p", "x" * 6000)
    assert "x" * 8000 == check_tag_value("t", "x" * 8000)
    with pytest.raises(InvalidValueError, match=r"param 'p'.*6000"):
        check_param_value("p", "x" * 6001)
    with pytest.raises(InvalidValueError, match=r"tag 't'.*8000"):
        check_tag_value("t", "x" * 8001)


# --------------------------------------------------------------------------- values

ACCEPTED_VALUES: list[tuple[str, Any, float]] = [
    ("int", 3, 3.0),
    ("negative int", -7, -7.0),
    ("big int", 2**70, float(2**70)),
    ("float", 0.1, 0.1),
    ("nan", float("nan"), float("nan")),
    ("inf", float("inf"), float("inf")),
    ("-0.0", -0.0, -0.0),
    ("np.float64", np.float64(0.1), 0.1),
    ("np.float32", np.float32(0.1), float(np.float32(0.1))),
    ("np.float16", np.float16(0.1), float(np.float16(0.1))),
    ("np.int64", np.int64(-5), -5.0),
    ("np.uint8", np.uint8(200), 200.0),
    ("np.float32 nan", np.float32("nan"), float("nan")),
    ("0-d array", np.array(2.5), 2.5),
    ("0-d float32 array", np.array(0.1, dtype=np.float32), float(np.float32(0.1))),
    ("one-element array", np.array([2.5]), 2.5),
    ("one-element 2-d array", np.array([[4.0]]), 4.0),
    ("0-d tensor", torch.tensor(1.5), 1.5),
    ("0-d float32 tensor", torch.tensor(0.1), float(np.float32(0.1))),
    ("0-d int tensor", torch.tensor(3), 3.0),
    ("one-element tensor", torch.tensor([0.25]), 0.25),
    ("tensor with grad", torch.tensor(2.0, requires_grad=True) * 1.5, 3.0),
    ("Fraction", fractions.Fraction(1, 3), 1 / 3),
    ("Decimal", decimal.Decimal("0.1"), 0.1),
]


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _n, v, e in ACCEPTED_VALUES], ids=[n for n, *_ in ACCEPTED_VALUES]
)
def test_numbers_are_converted_bit_exactly(value: Any, expected: float) -> None:
    """Anything a user would call a number becomes the float with the same bits as float(value)."""
    result = to_value("loss", value)
    assert float is type(result)
    assert bits(expected) == bits(result)


REFUSED_VALUES: list[tuple[str, Any, str]] = [
    ("str", "0.5", "str is refused"),
    ("np.str_", np.str_("0.5"), "str is refused"),
    ("bytes", b"0.5", "real numbers"),
    ("bytearray", bytearray(b"1"), "real numbers"),
    ("bool", True, "bool is refused"),
    ("np.bool_", np.bool_(False), "booleans"),
    ("bool array", np.array(True), "booleans"),
    ("bool tensor", torch.tensor(True), "booleans"),
    ("None", None, "real numbers"),
    ("complex", 1j, "real numbers"),
    ("np.complex128", np.complex128(1 + 1j), "real numbers"),
    ("complex array", np.array(1 + 1j), "complex"),
    ("list", [1.0], "real numbers"),
    ("tuple", (1.0,), "real numbers"),
    ("dict", {"a": 1.0}, "real numbers"),
    ("multi-element array", np.array([1.0, 2.0]), "exactly one element (got 2)"),
    ("empty array", np.array([]), "exactly one element (got 0)"),
    ("multi-element tensor", torch.tensor([1.0, 2.0, 3.0]), "exactly one element (got 3)"),
    ("object", object(), "real numbers"),
    ("int too large for a float", 10**400, "too large"),
    ("Decimal sNaN", decimal.Decimal("sNaN"), "cannot be converted"),
]


@pytest.mark.parametrize(
    ("value", "rule"), [(v, r) for _n, v, r in REFUSED_VALUES], ids=[n for n, *_ in REFUSED_VALUES]
)
def test_non_numbers_are_refused_naming_key_and_rule(value: Any, rule: str) -> None:
    """Non-numbers raise InvalidValueError (a ValueError and a TypeError) naming the key and the rule."""
    with pytest.raises(InvalidValueError) as caught:
        to_value("train/loss", value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, TypeError)
    assert "metric 'train/loss'" in str(caught.value)
    assert rule in str(caught.value)


@settings(deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))
def test_floats_pass_through_untouched(value: float) -> None:
    """A Python float is stored with exactly its bits, whatever it is."""
    assert bits(value) == bits(to_value("k", value))


@settings(deadline=None)
@given(st.floats(width=32, allow_nan=False))
def test_float32_values_keep_their_exact_widened_value(value: float) -> None:
    """np.float32 values are stored as float(np.float32(x)), not via their short str (0.1 stays 0.10000000149...)."""
    x = np.float32(value)
    assert bits(float(x)) == bits(to_value("k", x))


# --------------------------------------------------------------------------- steps and timestamps

ACCEPTED_STEPS = [0, 1, -3, INT64_MAX, INT64_MIN, np.int64(5), np.int32(-2), np.uint32(7), torch.tensor(4)]


@pytest.mark.parametrize("step", ACCEPTED_STEPS, ids=repr)
def test_integer_steps_are_accepted(step: Any) -> None:
    """Steps are integers: Python ints, numpy ints and integer 0-d tensors, within int64."""
    result = to_step(step)
    assert int is type(result)
    assert int(step) == result


@pytest.mark.parametrize(
    ("step", "rule"),
    [
        (1.0, "integers"),
        (np.float64(2.0), "integers"),
        ("1", "integers"),
        (True, "integers"),
        (np.bool_(True), "integers"),
        (None, "integers"),
        (INT64_MAX + 1, "64-bit"),
        (INT64_MIN - 1, "64-bit"),
        (np.uint64(2**63), "64-bit"),
    ],
    ids=repr,
)
def test_non_integer_or_out_of_range_steps_are_refused(step: Any, rule: str) -> None:
    """Floats, str, bool and values outside int64 are refused as steps, with the rule in the message."""
    with pytest.raises(InvalidValueError, match=rule) as caught:
        to_step(step)
    assert "step" in str(caught.value)


@pytest.mark.parametrize("timestamp", [0, 1_700_000_000_000, INT64_MAX, np.int64(1_700_000_000_000)], ids=repr)
def test_integer_timestamps_are_accepted(timestamp: Any) -> None:
    """Timestamps are integer ms since the epoch, within 0..int64."""
    result = to_timestamp(timestamp)
    assert int is type(result)
    assert int(timestamp) == result


@pytest.mark.parametrize(
    ("timestamp", "rule"),
    [
        (1.7e12, "integer milliseconds"),
        (True, "integer milliseconds"),
        ("1", "integer milliseconds"),
        (-1, ">= 0"),
        (INT64_MAX + 1, "64 bits"),
    ],
    ids=repr,
)
def test_bad_timestamps_are_refused(timestamp: Any, rule: str) -> None:
    """Float timestamps (MLflow writes them and then cannot read them), bool, str, negatives are refused."""
    with pytest.raises(InvalidValueError, match=rule):
        to_timestamp(timestamp)


# --------------------------------------------------------------------------- at the call


def test_errors_are_raised_at_the_log_call() -> None:
    """A bad key, value, step or timestamp raises at the call itself, and nothing of it is written."""
    sink = MemorySink()
    with steplog.start_run("v", sinks=[sink]) as run:
        with pytest.raises(InvalidKeyError, match="'a//b'"):
            run.log_metric("a//b", 1.0)
        with pytest.raises(InvalidValueError, match=r"metric 'loss'.*str is refused"):
            run.log_metric("loss", "0.5")
        run.log_metric("loss", 0.5, step=1)  # the key is known now: the fast path must still check values
        with pytest.raises(InvalidValueError, match=r"metric 'loss'.*bool"):
            run.log_metric("loss", True)
        with pytest.raises(InvalidValueError, match="step"):
            run.log_metric("loss", 0.5, step=1.5)  # type: ignore[arg-type]  # a wrong type on purpose
        with pytest.raises(InvalidValueError, match="timestamp"):
            run.log_metric("loss", 0.5, timestamp=1.5)  # type: ignore[arg-type]  # a wrong type on purpose
        with pytest.raises(InvalidKeyError, match="param key '/abs'"):
            run.log_param("/abs", 1)
        with pytest.raises(InvalidKeyError, match="tag key 'a\\*'"):
            run.set_tag("a*", 1)
    assert {"loss": [0.5]} == {k: sink.values(k) for k in sink.metrics}
    assert {} == sink.params


@pytest.mark.skipif(sys.platform == "win32", reason="the colon is refused on Windows only")
def test_colon_is_allowed_on_posix() -> None:
    """On POSIX the colon is a valid key character, as in MLflow."""
    assert "eval:acc" == check_key("eval:acc")


@pytest.mark.parametrize("check", [check_param_value, check_tag_value])
def test_values_that_are_not_valid_unicode_are_refused(check: Any) -> None:
    """A lone surrogate can never be written to a file or sent to a server, so it is refused at the call."""
    with pytest.raises(InvalidValueError, match="not valid Unicode"):
        check("p", "a\ud800")


# --------------------------------------------------------------------------- ids and names from outside


def test_ids_mlflow_makes_are_accepted() -> None:
    """Run ids as every MLflow backend makes them, and file-store and SQL experiment ids, pass unchanged."""
    from steplog._layout import new_experiment_id, new_run_id

    for run_id in [new_run_id() for _ in range(50)]:
        assert run_id == check_run_id(run_id, "test")
    for experiment_id in ["0", "1", "42", "9223372036854775807", *(new_experiment_id() for _ in range(50))]:
        assert experiment_id == check_experiment_id(experiment_id, "test")


@pytest.mark.parametrize(
    "value", ["../x", "/abs", "", "g" * 32, "A" * 32, "a" * 33, "a" * 31, None, 123, "\u0660" * 32, "abc\n"], ids=repr
)
def test_malformed_run_ids_are_refused_naming_the_source(value: object) -> None:
    """Anything but 32 lowercase ASCII hex digits is a StepLogError that names the id and where it came from."""
    with pytest.raises(steplog.StepLogError, match="from the server's answer is not allowed: MLflow run ids"):
        check_run_id(value, "the server's answer")


@pytest.mark.parametrize("value", ["../1", "1/2", "", "-1", "1.0", "\u0661", "1" * 20, None, 1, " 1"], ids=repr)
def test_malformed_experiment_ids_are_refused_naming_the_source(value: object) -> None:
    """Anything but 1 to 19 ASCII digits is a StepLogError that names the id and where it came from."""
    with pytest.raises(steplog.StepLogError, match="from a journal is not allowed: MLflow experiment ids"):
        check_experiment_id(value, "a journal")


def test_names_must_be_valid_unicode() -> None:
    """Experiment and run names with a lone surrogate are InvalidValueError; other Unicode is accepted."""
    assert "実験\u3000\u0661\u0662" == check_experiment_name("実験\u3000\u0661\u0662")
    assert "run 😀" == check_run_name("run 😀")
    with pytest.raises(InvalidValueError, match="experiment name 'a\\\\udc80' is not allowed: names must be valid"):
        check_experiment_name("a\udc80")
    with pytest.raises(InvalidValueError, match=r"run_name .* valid Unicode"):
        check_run_name("\ud800")
    for bad in ("", "x" * 251, None):
        with pytest.raises(InvalidValueError, match="at most 250"):
            check_run_name(bad)


@pytest.mark.parametrize("key", ["é" * 128, "a/" + "é" * 128, "日" * 86, "x/" + "\U0001d400" * 64 + "/y"], ids=len)
def test_key_parts_over_255_bytes_are_refused(key: str) -> None:
    """A key part between '/' over 255 bytes of UTF-8 cannot be a file name: InvalidKeyError naming the rule."""
    with pytest.raises(InvalidKeyError, match="at most 255 bytes in UTF-8"):
        check_key(key, "metric")


@pytest.mark.parametrize("key", ["é" * 127, "日" * 85, "\U0001d400" * 63, ("é" * 120 + "/") * 2 + "x"], ids=len)
def test_key_parts_up_to_255_bytes_are_accepted(key: str) -> None:
    """Parts of up to 255 bytes are accepted (the key as a whole may be longer, up to 250 characters)."""
    assert key == check_key(key, "metric")
