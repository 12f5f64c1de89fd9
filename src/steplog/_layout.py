"""The mlruns file-store format (MLFLOW_FORMAT.md §1), shared by the writer's sink and the reader.

Everything that knows how MLflow 3.17 lays a run out on disk lives here: paths,
``meta.yaml`` rendering and parsing, and the ``<timestamp> <value> <step>`` metric
line encoding. The sink (:mod:`steplog.sinks.mlruns`) and the reader
(:mod:`steplog.store`) both import it, so what is written and what is read cannot
drift apart.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "DEFAULT_EXPERIMENT_ID",
    "RESERVED_EXPERIMENT_FOLDERS",
    "dump_meta",
    "encode_metric_lines",
    "experiment_meta",
    "file_uri",
    "new_experiment_id",
    "new_run_id",
    "parse_meta",
    "parse_metric_lines",
    "random_run_name",
    "run_meta",
    "temp_name",
    "uri_to_path",
    "write_atomic",
]

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
META = "meta.yaml"
RUN_DIRS = ("metrics", "params", "tags", "artifacts")
RESERVED_EXPERIMENT_FOLDERS = frozenset({"tags", "datasets", "traces", "models"})
RESERVED_ROOT_FOLDERS = frozenset({".trash", "models"})
TMP_PREFIX = ".steplog-tmp-"
"""Temporary files live in the run directory (never in metrics/, where MLflow would read them as metrics)."""


# --------------------------------------------------------------------------- ids, names, uris


def new_run_id() -> str:
    """A run id as MLflow makes it: 32 lowercase hex digits."""
    return uuid.uuid4().hex


def new_experiment_id() -> str:
    """An experiment id as MLflow's file store makes it: an 18-digit integer, as a string."""
    digits = str(uuid.uuid4().int)[:18].lstrip("0")
    while len(digits) < 18:
        digits += str(random.randint(0, 9))
    return digits


_ADJECTIVES = (
    "abundant", "bold", "brave", "bright", "calm", "clever", "crisp", "dapper", "eager", "gentle",
    "glamorous", "hilarious", "honest", "humble", "lucky", "merciful", "nimble", "polite", "quiet",
    "resilient", "shy", "silent", "sincere", "spry", "stately", "sunny", "tasteful", "unique", "valuable",
    "wise",
)  # fmt: skip
_NOUNS = (
    "ant", "bass", "bat", "bee", "calf", "cat", "crab", "deer", "dog", "doe", "eel", "fawn", "finch",
    "fox", "gnu", "goat", "hare", "hawk", "hen", "jay", "koi", "lark", "lynx", "mole", "moth", "newt",
    "owl", "ram", "seal", "shrew", "slug", "snail", "sow", "squid", "stag", "swan", "toad", "trout",
    "whale", "wolf", "wren", "yak",
)  # fmt: skip


def random_run_name() -> str:
    """A run name in MLflow's ``<adjective>-<noun>-<int>`` style."""
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}-{random.randint(0, 999)}"


def file_uri(path: str | os.PathLike[str]) -> str:
    """``file://`` URI of an absolute local path, as MLflow writes it (``file:///abs/path``)."""
    return Path(os.path.abspath(path)).as_uri()


def uri_to_path(uri: str) -> Path:
    """Local path of a ``file:`` URI or a plain path."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if uri.startswith("file:"):
        return Path(uri[len("file:") :])
    return Path(uri)


# --------------------------------------------------------------------------- meta.yaml


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if value and re.fullmatch(r"[A-Za-z_][\w.\-/]*", value) and value.lower() not in _YAML_WORDS:
            return value  # plain scalars MLflow itself would write unquoted (active, names, ...)
        # A JSON string is a valid YAML double-quoted scalar, except for characters YAML refuses raw
        # (DEL, C1 controls, U+FFFE/FFFF, lone surrogates) or reads as line breaks (U+0085, U+2028,
        # U+2029): those are written as \u escapes (four hex digits), which both readers decode exactly.
        return _YAML_UNSAFE.sub(_escape_char, json.dumps(value, ensure_ascii=False))
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    if isinstance(value, Mapping) and not value:
        return "{}"
    raise TypeError(f"cannot render {value!r} in meta.yaml")


_YAML_UNSAFE = re.compile("[^\t\n\r\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


_YAML_WORDS = frozenset({"null", "true", "false", "yes", "no", "on", "off", "y", "n", "nan", "inf", "~"})


def dump_meta(fields: Mapping[str, Any]) -> str:
    """Render a flat mapping as block YAML with sorted keys, the way MLflow's ``safe_dump`` does.

    Digit-only ids stay strings (quoted), so PyYAML never reads them back as ints.
    """
    return "".join(f"{key}: {_yaml_scalar(fields[key])}\n" for key in sorted(fields))


# What PyYAML's safe_load reads a plain (unquoted) scalar as, for the spellings MLflow writes; any
# other plain scalar that PyYAML might resolve to a non-str (floats, octal or sexagesimal ints,
# timestamps, yes/no/on/off, ...) or might read differently (comments, indicators) goes to PyYAML.
_PLAIN_INT = re.compile(r"-?(?:0|[1-9][0-9]*)", re.ASCII)  # YAML's digits are ASCII, not \d
_PLAIN_WORDS: dict[str, Any] = {
    "~": None, "null": None, "Null": None, "NULL": None,
    "true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
}  # fmt: skip
_PLAIN_UNSURE = frozenset("0123456789+-.<=-?:,[]{}#&*!|>'\"%@`")
_YAML_SPACE = " \t"  # the only characters YAML trims around a plain scalar (not U+3000 and the like)


class _Unsure(ValueError):
    """The flat parser cannot be sure it reads a line as PyYAML would."""


def _parse_scalar(text: str) -> Any:
    text = text.strip(_YAML_SPACE)
    if text == "":
        return None
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text[0] in "'\"":
        if len(text) < 2 or not text.endswith(text[0]):
            raise _Unsure("a quoted scalar that continues on the next line")  # PyYAML wraps long values
        if text[0] == "'":
            inner = text[1:-1]
            if "'" in inner.replace("''", ""):
                raise _Unsure("a quote inside a single-quoted scalar")
            return inner.replace("''", "'")
        if "\\" in text and re.search(r"\\(?![\\\"/bfnrt]|u[0-9a-cA-CefEF])", text):
            raise _Unsure("a YAML escape that JSON spells differently (or a surrogate)")
        return json.loads(text)
    if text in _PLAIN_WORDS:
        return _PLAIN_WORDS[text]
    if _PLAIN_INT.fullmatch(text):
        return int(text)
    if text[0] in _PLAIN_UNSURE or " #" in text or ": " in text or text.endswith(":"):
        raise _Unsure(f"a plain scalar PyYAML may not read as text: {text[:20]!r}")
    if text.lower() in ("yes", "no", "on", "off"):
        raise _Unsure("a YAML 1.1 boolean")
    return text


def parse_meta(text: str) -> dict[str, Any]:
    """Parse a ``meta.yaml`` exactly as MLflow's reader (PyYAML ``safe_load``) does.

    A fast flat parser reads what MLflow and steplog write (block mappings of plain,
    quoted and integer scalars); anything it is not sure PyYAML reads the same way
    (wrapped lines, line breaks other than ``\\n``, tabs, YAML 1.1 words, floats, octal
    ints, escapes JSON spells differently) is read by PyYAML itself.
    """
    if "\r" in text or "\t" in text or "\x85" in text or "\u2028" in text or "\u2029" in text or "\ufeff" in text:
        return _parse_meta_yaml(text)  # line breaks (and a BOM) PyYAML reads otherwise than str.split
    out: dict[str, Any] = {}
    after_scalar = False
    for line in text.split("\n"):
        if not line.strip(_YAML_SPACE) or line.lstrip(_YAML_SPACE).startswith("#"):
            continue
        if line[0] in " -":
            if after_scalar:  # a long value PyYAML wrapped onto the next line: let PyYAML read it
                return _parse_meta_yaml(text)
            continue  # a nested block (e.g. ``tags:`` of a deleted experiment): not needed
        key, sep, rest = line.partition(":")
        if not sep or not re.fullmatch(r"[a-z_]+", key) or (rest and rest[0] != " "):
            return _parse_meta_yaml(text)
        try:
            out[key] = _parse_scalar(rest)
        except ValueError:
            return _parse_meta_yaml(text)
        after_scalar = bool(rest.strip(_YAML_SPACE))
    return out


def _parse_meta_yaml(text: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is present wherever MLflow is
        raise ValueError("meta.yaml is not a flat mapping and PyYAML is not installed") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"meta.yaml is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("meta.yaml is not a mapping")
    return data


def experiment_meta(experiment_id: str, name: str, artifact_location: str, now_ms: int) -> dict[str, Any]:
    """The fields of an experiment's ``meta.yaml`` as MLflow 3.17 writes them."""
    return {
        "artifact_location": artifact_location,
        "creation_time": now_ms,
        "experiment_id": experiment_id,
        "last_update_time": now_ms,
        "lifecycle_stage": "active",
        "name": name,
    }


def run_meta(
    *,
    run_id: str,
    experiment_id: str,
    run_name: str,
    artifact_uri: str,
    user_id: str,
    start_time: int,
    end_time: int | None,
    status: int,
) -> dict[str, Any]:
    """The fields of a run's ``meta.yaml``: MLflow 3.17's, legacy fields included, integer status."""
    return {
        "artifact_uri": artifact_uri,
        "deleted_time": None,
        "end_time": end_time,
        "entry_point_name": "",
        "experiment_id": experiment_id,
        "lifecycle_stage": "active",
        "run_id": run_id,
        "run_name": run_name,
        "source_name": "",
        "source_type": 4,
        "source_version": "",
        "start_time": start_time,
        "status": status,
        "tags": [],
        "user_id": user_id,
    }


def write_atomic(path: Path, data: bytes, *, fsync: bool = False, temp_dir: Path | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (a temp file, then ``os.replace``).

    ``temp_dir`` (same filesystem) holds the temp file; give the run directory for anything under
    ``metrics/``, ``params/``, ``tags/`` or ``artifacts/``, where MLflow would read a stray temp file
    as an entry. The temp name has a fixed length (:func:`temp_name`), so any name that fits the file
    system can be written (a 250-character key included).
    """
    tmp = (temp_dir or path.parent) / temp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise


def temp_name() -> str:
    """A fresh temp file name: ``TMP_PREFIX`` and 12 hex digits (25 bytes, whatever the final name)."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- metric lines

_LINE = b"%d %b %d\n"
_NON_FINITE = {math.inf: b"inf", -math.inf: b"-inf"}


def encode_values(values: list[float]) -> list[bytes]:
    """Each float's shortest text that ``float()`` reads back to the same bits.

    orjson formats finite floats exactly (shortest round trip) at a fraction of ``repr``'s
    cost; it writes NaN and infinities as ``null``, which get their own spelling here.
    """
    dumped = orjson.dumps(values)
    texts = dumped[1:-1].split(b",")
    if b"null" in dumped:
        for i, text in enumerate(texts):
            if text == b"null":
                value = values[i]
                texts[i] = b"nan" if value != value else _NON_FINITE[value]
    return texts


def encode_metric_lines(items: list[Any]) -> bytes:
    """Encode interleaved ``[ts, value, step, ts, value, step, ...]`` as metric-file lines.

    The line is ``f"{ts} {value} {step}\\n"`` with the value spelled so that ``float()``
    gives back the same bits (NaN as ``nan``, infinities as ``inf``/``-inf``, ``-0.0`` kept).
    """
    n = len(items) // 3
    if not n:
        return b""
    args = items.copy()
    args[1::3] = encode_values(items[1::3])
    return (_LINE * n) % tuple(args)


def encode_metric_line(timestamp: int, value: float, step: int) -> bytes:
    """One metric line (see :func:`encode_metric_lines`)."""
    return encode_metric_lines([timestamp, value, step])


# Bytes a metric file of 3-field lines (as steplog and MLflow write them) is made of; anything
# else (5-field dataset lines, CR, tabs, other spellings of NaN) is left to the line-by-line parser.
_FAST_BYTES = b"0123456789.-+eE \nnaif"
_PADDING = re.compile(rb" +\n")


def _parse_fast(body: bytes) -> tuple[list[int], list[float], list[int], int] | None:
    """Parse ``body`` (complete lines) at C speed, or return None where the exact parser must decide.

    The file becomes one JSON array for orjson: spaces become commas and each line end becomes
    ``,null,``, so ``[ts, value, step, null, ts, value, step, null, ..., 0]``. A ``null`` at every
    fourth place proves each line had exactly three fields; orjson refuses empty fields, ``+1``,
    ``1.``, ``.5``, leading zeros and out-of-range floats, and a float among the timestamps or
    steps makes ``sum`` a float: all of these go to the exact parser. ``nan``, ``inf`` and ``-inf``
    (the spellings MLflow and steplog write) become JSON strings that ``float()`` reads; any other
    use of those letters leaves invalid JSON. orjson reads numbers with correct rounding, so values
    are the floats ``float()`` gives, except ``-0``, which JSON reads as the int 0
    (``float(b"-0")`` is ``-0.0``); such a value also goes to the exact parser.
    """
    if b" \n" in body:  # lines padded to a page boundary by the sink (MLflow strips them too)
        body = _PADDING.sub(b"\n", body)
    if body.translate(None, _FAST_BYTES) or b" -0 " in body:
        return None
    n = body.count(b"\n")
    text = body.replace(b" ", b",")
    if b"n" in text:
        text = text.replace(b"nan", b'"nan"').replace(b"inf", b'"inf"').replace(b'-"inf"', b'"-inf"')
    try:
        flat = orjson.loads(b"[" + text.replace(b"\n", b",null,") + b"0]")
    except orjson.JSONDecodeError:
        return None
    if len(flat) != 4 * n + 1 or flat[3::4].count(None) != n:
        return None
    stamps = flat[0 : 4 * n : 4]
    steps = flat[2::4]
    try:
        if type(sum(stamps)) is not int or type(sum(steps)) is not int:
            return None  # a float (or out-of-range) timestamp or step: int() would refuse it
    except TypeError:
        return None  # nan/inf in place of a timestamp or step
    return steps, list(map(float, flat[1::4])), stamps, 0


def parse_metric_lines(data: bytes) -> tuple[list[int], list[float], list[int], int]:
    """Parse a metric file's bytes into ``(steps, values, timestamps, bad_lines)``.

    Follows MLflow's reader: 3 or 5 fields (``ts value step [dataset digest]``), or the legacy
    2-field form (step 0); timestamps and steps are read with ``int()``, values with ``float()``.
    An incomplete last line (no ``\\n``: a live writer mid-append, or a torn tail) is ignored.
    Malformed lines are skipped and counted in ``bad_lines``. A file of well-formed 3-field lines
    takes a fast path (about 0.5 s of CPU per million points, half the line-by-line
    parser's time; ``benchmarks/reader.py``) with the same results.
    """
    end = data.rfind(b"\n")
    body = data[: end + 1] if end >= 0 else b""
    fast = _parse_fast(body) if body else None
    if fast is not None:
        return fast
    steps: list[int] = []
    values: list[float] = []
    stamps: list[int] = []
    bad = 0
    for raw in body.split(b"\n")[:-1]:
        fields = raw.strip().split(b" ")
        try:
            if len(fields) in (3, 5):
                ts, value, step = int(fields[0]), float(fields[1]), int(fields[2])
            elif len(fields) == 2:
                ts, value, step = int(fields[0]), float(fields[1]), 0
            else:
                raise ValueError(raw)
        except ValueError:
            bad += 1
            continue
        stamps.append(ts)
        values.append(value)
        steps.append(step)
    return steps, values, stamps, bad


def iter_files(folder: Path) -> Iterable[tuple[str, Path]]:
    """``(key, path)`` for every file below ``folder``, keys with ``/`` for nested folders (MLflow's walk)."""
    base = len(str(folder)) + 1
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            yield path[base:].replace(os.sep, "/"), Path(path)
