"""MLflow's naming and value rules (MLFLOW_FORMAT.md §2), as typed, explained errors.

Each check returns the accepted (possibly converted) value or raises an
:class:`~steplog.InvalidKeyError` / :class:`~steplog.InvalidValueError` that names the
key and the rule that was broken, so the user knows what to change.
"""

from __future__ import annotations

import decimal
import math
import numbers
import os
import posixpath
import re
import sys
from typing import Any

from ._errors import InvalidKeyError, InvalidValueError, StepLogError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_ENTITY_KEY_LENGTH",
    "MAX_EXPERIMENT_NAME_LENGTH",
    "MAX_NAME_BYTES",
    "MAX_PARAM_VAL_LENGTH",
    "MAX_TAG_VAL_LENGTH",
    "check_artifact_path",
    "check_experiment_id",
    "check_experiment_name",
    "check_key",
    "check_param_value",
    "check_run_id",
    "check_run_name",
    "check_tag_value",
    "to_step",
    "to_timestamp",
    "to_value",
]

MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_EXPERIMENT_NAME_LENGTH = 500
MAX_NAME_BYTES = 255
"""The longest file name (one path component) Linux, macOS and Windows file systems store, in UTF-8 bytes."""
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# MLflow's character class for keys; the colon is refused on Windows. Matched with fullmatch:
# MLflow's re.match(r"^...$") lets one trailing newline through (``$`` matches before it),
# which would put a newline in a file name.
_KEY_RE = re.compile(r"[/\w.\- ]*" if sys.platform == "win32" else r"[/\w.\- :]*")


def check_key(key: object, kind: str = "metric") -> str:
    """Return ``key`` if MLflow accepts it as a metric/param/tag name, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"{kind} key {key!r} is not allowed: keys must be str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(f"{kind} key '' is not allowed: keys may not be empty")
    if len(key) > MAX_ENTITY_KEY_LENGTH:
        raise InvalidKeyError(
            f"{kind} key '{key[:40]}...' is not allowed: keys may be at most "
            f"{MAX_ENTITY_KEY_LENGTH} characters (got {len(key)})"
        )
    if not _KEY_RE.fullmatch(key):
        bad = sorted({c for c in key if not _KEY_RE.fullmatch(c)})
        raise InvalidKeyError(
            f"{kind} key {key!r} is not allowed: keys may contain only letters, digits, '_', '-', '.', ' ', "
            f"':' and '/' (found {', '.join(repr(c) for c in bad)})"
        )
    if key.startswith("/"):
        raise InvalidKeyError(f"{kind} key {key!r} is not allowed: keys may not be absolute paths (leading '/')")
    if key.startswith(".."):
        raise InvalidKeyError(f"{kind} key {key!r} is not allowed: keys may not start with '..'")
    if posixpath.normpath(key) != key or key == ".":
        raise InvalidKeyError(
            f"{kind} key {key!r} is not allowed: keys must be normalized paths "
            "(no '.' or '..' segments, no empty segment '//', no trailing '/')"
        )
    if len(key) * 4 > MAX_NAME_BYTES:  # only a key this long can hold a segment over the limit
        _check_segments(f"{kind} key", key)
    return key


def _check_segments(what: str, path: str) -> None:
    """Refuse a '/'-separated name with a segment no file system can store as a file name."""
    for segment in path.split("/"):
        size = len(segment.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise InvalidKeyError(
                f"{what} '{path[:40]}...' is not allowed: each part between '/' becomes a file or folder "
                f"name and may be at most {MAX_NAME_BYTES} bytes in UTF-8 (a part is {size} bytes)"
            )


def check_experiment_name(name: object) -> str:
    """Return ``name`` if it is a valid experiment name (non-empty str, at most 500 chars)."""
    if not isinstance(name, str):
        raise InvalidKeyError(f"experiment name {name!r} is not allowed: it must be str, not {type(name).__name__}")
    if not name:
        raise InvalidKeyError("experiment name '' is not allowed: it may not be empty")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise InvalidKeyError(
            f"experiment name '{name[:40]}...' is not allowed: at most {MAX_EXPERIMENT_NAME_LENGTH} characters"
        )
    _check_unicode("experiment name", name)
    return name


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a valid run name (non-empty str of at most 250 valid Unicode characters)."""
    if not isinstance(name, str) or not name or len(name) > MAX_ENTITY_KEY_LENGTH:
        raise InvalidValueError(
            f"run_name {name!r} is not allowed: a non-empty str of at most {MAX_ENTITY_KEY_LENGTH} characters"
        )
    _check_unicode("run_name", name)
    return name


def _check_unicode(what: str, name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (e.g. from os.fsdecode of a non-UTF-8 path)
        raise InvalidValueError(
            f"{what} {name!r} is not allowed: names must be valid Unicode text that UTF-8 can encode "
            f"({exc.reason} at {exc.start})"
        ) from None


# Ids an MLflow store or server hands out (MLFLOW_FORMAT.md §1.4, §1.6): run ids are uuid4().hex
# on every backend; experiment ids are integers (18 digits on the file store, 0, 1, 2... on SQL).
# Only these are accepted: each becomes a folder name, so anything else could lead outside the store.
_RUN_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_EXPERIMENT_ID_RE = re.compile(r"[0-9]{1,19}", re.ASCII)


def check_run_id(value: object, source: str) -> str:
    """Return ``value`` if it is a run id as MLflow makes them (32 lowercase hex digits), else raise.

    Args:
        value: the id, from outside steplog (a server's answer, a journal, the user).
        source: where it came from, for the message (e.g. "the server's runs/create answer").

    Raises:
        StepLogError: the id is malformed; it is never used as a path.
    """
    if not isinstance(value, str) or not _RUN_ID_RE.fullmatch(value):
        raise StepLogError(
            f"run id {_shown(value)} from {source} is not allowed: MLflow run ids are 32 lowercase hex digits"
        )
    return value


def check_experiment_id(value: object, source: str) -> str:
    """Return ``value`` if it is an experiment id as MLflow makes them (decimal digits), else raise.

    Args:
        value: the id, from outside steplog (a server's answer, a journal, the user).
        source: where it came from, for the message.

    Raises:
        StepLogError: the id is malformed; it is never used as a path.
    """
    if not isinstance(value, str) or not _EXPERIMENT_ID_RE.fullmatch(value):
        raise StepLogError(
            f"experiment id {_shown(value)} from {source} is not allowed: "
            "MLflow experiment ids are 1 to 19 ASCII digits"
        )
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _stored_text(kind: str, key: str, value: object, limit: int) -> str:
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no file or server could ever store it
        raise InvalidValueError(
            f"{kind} {key!r} is not allowed: the value is not valid Unicode text ({exc.reason} at {exc.start})"
        ) from None
    if len(text) > limit:
        raise InvalidValueError(
            f"{kind} {key!r} is not allowed: values may be at most {limit} characters (got {len(text)})"
        )
    return text


def check_param_value(key: str, value: object) -> str:
    """Return ``str(value)`` for a param, refusing values over MLflow's 6000-character limit."""
    return _stored_text("param", key, value, MAX_PARAM_VAL_LENGTH)


def check_tag_value(key: str, value: object) -> str:
    """Return ``str(value)`` for a tag, refusing values over MLflow's 8000-character limit."""
    return _stored_text("tag", key, value, MAX_TAG_VAL_LENGTH)


def _refuse(key: str, value: object, rule: str) -> InvalidValueError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidValueError(f"metric {key!r}: value {shown} is not allowed: {rule}")


def to_value(key: str, value: Any) -> float:
    """Convert a metric value to the float that will be stored, or raise InvalidValueError.

    Accepts int, float, numpy scalars, ``Decimal``/``Fraction`` and 0-d or one-element
    arrays and tensors; refuses str, bytes, bool, None, complex and containers.
    """
    if type(value) is float:
        return value
    if value is None or isinstance(value, (bool, str, bytes, bytearray, complex)):
        rule = "metric values must be real numbers"
        if isinstance(value, bool):
            rule += " (bool is refused: log 1.0 or 0.0 explicitly)"
        elif isinstance(value, str):
            rule += " (str is refused: convert it with float() if it is a number)"
        raise _refuse(key, value, rule)
    if isinstance(value, numbers.Real):
        if type(value).__name__ == "bool_":  # numpy.bool_ registers as no Number, but be explicit
            raise _refuse(key, value, "metric values must be real numbers, not booleans")
        try:
            return float(value)
        except OverflowError:
            raise _refuse(key, value, "the integer is too large to store as a float") from None
    if isinstance(value, numbers.Complex):
        raise _refuse(key, value, "metric values must be real numbers, not complex")
    if isinstance(value, decimal.Decimal):  # a Number, but registered as neither Real nor Complex
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. Decimal('sNaN')
            raise _refuse(key, value, f"it cannot be converted to float ({exc})") from None
    return _array_like_to_float(key, value)


def _array_like_to_float(key: str, value: Any) -> float:
    size = getattr(value, "size", None)
    if callable(size):  # torch.Tensor.size() is a method; numel() is the count
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else None
    dtype = getattr(value, "dtype", None)
    if size is None or not hasattr(value, "__float__"):
        raise _refuse(key, value, "metric values must be real numbers (int, float, numpy scalars, 0-d tensors)")
    if size != 1:
        raise _refuse(
            key,
            value,
            f"arrays and tensors must hold exactly one element (got {size}): reduce it first, "
            "e.g. with .mean() or .sum()",
        )
    kind = getattr(dtype, "kind", None)
    name = str(dtype)
    if kind == "b" or name in ("torch.bool", "bool"):
        raise _refuse(key, value, "metric values must be real numbers, not booleans")
    if kind == "c" or "complex" in name:
        raise _refuse(key, value, "metric values must be real numbers, not complex")
    try:
        if hasattr(value, "item"):
            item = value.item()
            if isinstance(item, bool):
                raise _refuse(key, value, "metric values must be real numbers, not booleans")
            return float(item)
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _refuse(key, value, f"it cannot be converted to float ({exc})") from None


def to_step(step: Any) -> int:
    """Convert a step to a Python int within int64, or raise InvalidValueError."""
    if type(step) is not int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            index = getattr(step, "__index__", None)
            if index is None or isinstance(step, (bool, float)) or type(step).__name__ == "bool_":
                raise InvalidValueError(
                    f"step {step!r} is not allowed: steps must be integers (got {type(step).__name__}; use int(step))"
                )
            step = index()
        step = int(step)
    result: int = step
    if not INT64_MIN <= result <= INT64_MAX:
        raise InvalidValueError(f"step {result} is not allowed: steps must fit in a signed 64-bit integer")
    return result


def to_timestamp(timestamp: Any) -> int:
    """Convert a timestamp (integer milliseconds since the epoch) to int, or raise InvalidValueError."""
    if type(timestamp) is not int:
        if isinstance(timestamp, (bool, float)) or not isinstance(timestamp, numbers.Integral):
            raise InvalidValueError(
                f"timestamp {timestamp!r} is not allowed: timestamps are integer milliseconds since the epoch "
                "(e.g. int(time.time() * 1000))"
            )
        timestamp = int(timestamp)
    result: int = timestamp
    if not 0 <= result <= INT64_MAX:
        raise InvalidValueError(f"timestamp {result} is not allowed: timestamps must be >= 0 and fit in 64 bits")
    return result


def check_artifact_path(path: object, what: str = "artifact path") -> str:
    """Return a normalized relative artifact path, refusing anything that escapes the artifact root."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidValueError(f"{what} {path!r} is not allowed: it must be a str")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidValueError(f"{what} {path!r} is not allowed: it must be a str")
    text = text.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise InvalidValueError(f"{what} {text!r} is not allowed: it must be a non-empty relative path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise InvalidValueError(
            f"{what} {text!r} is not allowed: it must stay inside the run's artifact directory (no '..')"
        )
    if any("\x00" in p for p in parts):
        raise InvalidValueError(f"{what} {text!r} is not allowed: NUL characters")
    for part in parts:
        try:
            size = len(os.fsencode(part))
        except UnicodeEncodeError as exc:  # a lone surrogate no file system can name
            raise InvalidValueError(
                f"{what} {text!r} is not allowed: it must be valid Unicode text ({exc.reason} at {exc.start})"
            ) from None
        if size > MAX_NAME_BYTES:
            raise InvalidValueError(
                f"{what} '{text[:40]}...' is not allowed: each part between '/' becomes a file or folder name "
                f"and may be at most {MAX_NAME_BYTES} bytes in UTF-8 (a part is {size} bytes)"
            )
    return "/".join(parts)


def is_finite(value: float) -> bool:
    """True for finite floats (helper for encoders)."""
    return math.isfinite(value)
