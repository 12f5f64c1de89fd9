"""The mlruns format in ``_layout.py``: meta.yaml rendering and parsing, and metric line encoding."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlflow.store.tracking.file_store import FileStore

from steplog._layout import (
    dump_meta,
    encode_metric_line,
    encode_metric_lines,
    experiment_meta,
    new_experiment_id,
    new_run_id,
    parse_meta,
    parse_metric_lines,
    run_meta,
)


def bits(values: list[float]) -> list[bytes]:
    """The exact bits of each float, so -0.0 and 0.0 differ; every NaN counts as one NaN.

    A NaN's payload and sign cannot survive any text format (MLflow's included): ``nan`` is ``nan``.
    """
    return [struct.pack("<d", math.nan if v != v else v) for v in values]


# --------------------------------------------------------------------------- meta.yaml


def a_run_meta(**changes: Any) -> dict[str, Any]:
    """A run's meta.yaml fields as steplog writes them."""
    fields: dict[str, Any] = {
        "run_id": new_run_id(),
        "experiment_id": "012345678901234567",
        "run_name": "baseline",
        "artifact_uri": "file:///tmp/mlruns/012345678901234567/abc/artifacts",
        "user_id": "root",
        "start_time": 1_700_000_000_000,
        "end_time": None,
        "status": 1,
    }
    fields.update(changes)
    return run_meta(**fields)


def test_run_meta_has_mlflows_fields_in_sorted_order() -> None:
    """A run's meta.yaml lists MLflow 3.17's fields (legacy ones included) in sorted order, status as an int."""
    text = dump_meta(a_run_meta(status=3, end_time=1_700_000_000_500))
    keys = [line.split(":", 1)[0] for line in text.splitlines()]
    assert sorted(keys) == keys
    expected = {
        "artifact_uri",
        "deleted_time",
        "end_time",
        "entry_point_name",
        "experiment_id",
        "lifecycle_stage",
        "run_id",
        "run_name",
        "source_name",
        "source_type",
        "source_version",
        "start_time",
        "status",
        "tags",
        "user_id",
    }
    assert expected == set(keys)
    loaded = yaml.safe_load(text)
    assert 3 == loaded["status"]
    assert [] == loaded["tags"]
    assert 4 == loaded["source_type"]
    assert "" == loaded["entry_point_name"]


def test_digit_only_ids_stay_strings() -> None:
    """Digit-only ids (including ones with a leading zero, which YAML would read as octal) are quoted strings."""
    fields = a_run_meta(experiment_id="0123", run_id="0000000000000000000000000000000a")
    fields["other"] = "007"
    text = dump_meta(fields)
    assert 'experiment_id: "0123"\n' in text
    assert fields == yaml.safe_load(text)
    assert fields == parse_meta(text)


def test_experiment_meta_round_trips() -> None:
    """An experiment's meta.yaml reads back (PyYAML and steplog's parser) as the mapping written."""
    fields = experiment_meta("0", "Default", "file:///tmp/mlruns/0", 1_700_000_000_000)
    text = dump_meta(fields)
    assert fields == yaml.safe_load(text)
    assert fields == parse_meta(text)


TRICKY_NAMES = [
    "yes", "No", "null", "NULL", "~", "true", "on", "0123", "1e5", "1.0", ".inf", "-", "- a", "#x", "a #b",
    "a: b", "it's", '"q"', " lead", "trail ", "", "é", "日本語", "emoji 😀", "a\nb", "tab\t", "back\\slash",
    "a\x7fb", "nel\x85", "ls\u2028ps\u2029", "nonchar\ufffe", "[list]", "{map}", "&anchor", "*alias", "!tag",
    "%pct", "@at", "`tick", "|pipe", ">fold", "?q", "a,b", "0x1F", "0o17", "1_000", "12:30:00", "2024-01-01",
]  # fmt: skip


@pytest.mark.parametrize("name", TRICKY_NAMES, ids=repr)
def test_tricky_strings_round_trip(name: str) -> None:
    """Names YAML would misread (words, numbers, indicators, unicode, control characters) come back exactly."""
    fields = a_run_meta(run_name=name)
    text = dump_meta(fields)
    assert fields == yaml.safe_load(text)
    assert fields == parse_meta(text)


@settings(deadline=None)  # the machine is shared: timings are noisy
@given(name=st.text(max_size=30), number=st.integers(min_value=0, max_value=2**63 - 1))
def test_any_string_round_trips(name: str, number: int) -> None:
    """Whatever the string, PyYAML's safe_load (MLflow's reader) and parse_meta give back the mapping written."""
    fields = a_run_meta(run_name=name, start_time=number, user_id=name)
    text = dump_meta(fields)
    text.encode("utf-8")  # always encodable (lone surrogates are escaped)
    assert fields == yaml.safe_load(text)
    assert fields == parse_meta(text)


def test_parse_meta_reads_what_mlflow_writes(tmp_path: Path) -> None:
    """parse_meta reads MLflow's own meta.yaml files (PyYAML safe_dump) as PyYAML does."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment_id = client.create_experiment("0123: yes é")  # (MLflow itself cannot create names with a quote)
    run = client.create_run(experiment_id, run_name="0777")
    client.set_terminated(run.info.run_id)
    for path in [
        tmp_path / "mlruns" / experiment_id / "meta.yaml",
        Path(run.info.artifact_uri[7:]).parent / "meta.yaml",
    ]:
        text = path.read_text(encoding="utf-8")
        assert yaml.safe_load(text) == parse_meta(text)


def test_parse_meta_falls_back_to_yaml_for_nested_blocks() -> None:
    """A deleted experiment's meta.yaml (with a nested ``tags:`` block) still parses."""
    text = "experiment_id: '5'\nlifecycle_stage: deleted\nname: old\ntags:\n  a: b\n"
    parsed = parse_meta(text)
    assert "5" == parsed["experiment_id"]
    assert "deleted" == parsed["lifecycle_stage"]


def test_ids_have_mlflows_shape() -> None:
    """Run ids are 32 lowercase hex digits; experiment ids are 18-digit integers without a leading zero."""
    for _ in range(200):
        run_id = new_run_id()
        assert 32 == len(run_id)
        assert set(run_id) <= set("0123456789abcdef")
        experiment_id = new_experiment_id()
        assert 18 == len(experiment_id)
        assert experiment_id.isdigit()
        assert "0" != experiment_id[0]


# --------------------------------------------------------------------------- metric lines

SPECIAL_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    5e-324,  # the smallest subnormal
    -2.2250738585072014e-308 / 3,  # a negative subnormal
    2.2250738585072014e-308,  # the smallest normal
    1.7976931348623157e308,  # the largest finite
    1e-300,
    123456789.12345679,
    0.1,
    1 / 3,
    float(2**53 + 1),
    -1e22,
]


def test_line_format_is_timestamp_value_step() -> None:
    """A line is ``<timestamp> <value> <step>\\n`` with one space between fields."""
    assert b"1700000000020 0.5 1\n" == encode_metric_line(1_700_000_000_020, 0.5, 1)
    assert b"1 nan -3\n2 inf 0\n3 -inf 9223372036854775807\n4 -0.0 0\n" == encode_metric_lines(
        [1, math.nan, -3, 2, math.inf, 0, 3, -math.inf, 2**63 - 1, 4, -0.0, 0]
    )
    assert b"" == encode_metric_lines([])


def test_special_values_are_bit_exact() -> None:
    """NaN, ±inf, -0.0, subnormals and extremes are spelled so that float() gives back the same bits."""
    items: list[Any] = []
    for i, value in enumerate(SPECIAL_FLOATS):
        items += [1_700_000_000_000 + i, value, i]
    data = encode_metric_lines(items)
    steps, values, stamps, bad = parse_metric_lines(data)
    assert bits(SPECIAL_FLOATS) == bits(values)
    assert bits(SPECIAL_FLOATS) == bits([float(line.split()[1]) for line in data.splitlines()])
    assert list(range(len(SPECIAL_FLOATS))) == steps
    assert [1_700_000_000_000 + i for i in range(len(SPECIAL_FLOATS))] == stamps
    assert 0 == bad


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2**63 - 1),
            st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
        ),
        max_size=40,
    )
)
def test_any_points_round_trip_through_mlflows_line_reader(points: list[tuple[int, float, int]]) -> None:
    """Any (timestamp, float, step) is encoded so that MLflow's own line reader and ours give it back bit for bit."""
    items: list[Any] = [x for point in points for x in point]
    data = encode_metric_lines(items)
    assert len(points) == data.count(b"\n")
    steps, values, stamps, bad = parse_metric_lines(data)
    assert [p[2] for p in points] == steps
    assert bits([p[1] for p in points]) == bits(values)
    assert [p[0] for p in points] == stamps
    assert 0 == bad
    for (timestamp, value, step), line in zip(points, data.decode("ascii").splitlines(), strict=True):
        metric = FileStore._get_metric_from_line("r", "k", line, "0")
        assert (timestamp, bits([value]), step) == (metric.timestamp, bits([metric.value]), metric.step)


@settings(deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=20))
def test_float32_values_widened_by_the_buffer_are_exact(values: list[float]) -> None:
    """Widened float32 values (what the buffer stores) survive encoding exactly, not as their short str."""
    items: list[Any] = []
    for i, value in enumerate(values):
        items += [0, value, i]
    assert bits(values) == bits(parse_metric_lines(encode_metric_lines(items))[1])


# --------------------------------------------------------------------------- parse_metric_lines


def test_parse_three_five_and_two_field_lines() -> None:
    """3-field lines, 5-field lines (dataset name and digest) and legacy 2-field lines (step 0) all parse."""
    data = b"100 0.5 1\n200 0.25 2 train abc123\n300 0.125\n"
    assert ([1, 2, 0], [0.5, 0.25, 0.125], [100, 200, 300], 0) == parse_metric_lines(data)


@pytest.mark.parametrize(
    "tail",
    [b"300 0.1", b"300 0.125 ", b"300 0.125 3", b"3", b"300 nan 4 extra and more"],
    ids=repr,
)
def test_a_torn_last_line_is_ignored(tail: bytes) -> None:
    """An incomplete last line (no newline: a live writer mid-append, or a torn tail) is ignored, not counted."""
    data = b"100 0.5 1\n200 0.25 2\n" + tail
    assert ([1, 2], [0.5, 0.25], [100, 200], 0) == parse_metric_lines(data)


@pytest.mark.parametrize(
    ("bad_line", "why"),
    [
        (b"\n", "blank line"),
        (b"300\n", "one field"),
        (b"300 0.1 2 x\n", "four fields"),
        (b"300  0.1 2\n", "double space"),
        (b"300\t0.1\t2\n", "tabs"),
        (b"300 abc 2\n", "not a number"),
        (b"300.0 0.1 2\n", "float timestamp"),
        (b"300 0.1 2.0\n", "float step"),
        (b"\x00\x00\x00\n", "NUL bytes"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_malformed_lines_are_skipped_and_counted(bad_line: bytes, why: str) -> None:
    """A malformed line in the middle is skipped and counted; the good lines around it are kept in order."""
    data = b"100 0.5 1\n" + bad_line + b"200 0.25 2\n"
    assert ([1, 2], [0.5, 0.25], [100, 200], 1) == parse_metric_lines(data), why


def test_mixed_field_counts_are_not_misaligned() -> None:
    """Lines of 2 and 4 fields (6 tokens on 2 lines) are parsed line by line, not as two 3-field lines."""
    assert ([0], [1.0], [100], 1) == parse_metric_lines(b"100 1\n200 2 5 7\n")
    assert ([3], [2.0], [1], 1) == parse_metric_lines(b"1 2 3 4 5\n6\n")


def test_crlf_and_nan_spellings_are_read_like_mlflow() -> None:
    """CRLF line ends and the NaN/Infinity spellings read back, as in MLflow's reader."""
    steps, values, stamps, bad = parse_metric_lines(b"1 NaN 0\r\n2 Infinity 1\r\n3 -Infinity 2\n")
    assert [0, 1, 2] == steps
    assert math.isnan(values[0])
    assert [math.inf, -math.inf] == values[1:]
    assert [1, 2, 3] == stamps
    assert 0 == bad


def test_empty_input() -> None:
    """An empty file, or one holding only a torn line, has no points and no bad lines."""
    assert ([], [], [], 0) == parse_metric_lines(b"")
    assert ([], [], [], 0) == parse_metric_lines(b"1700000000000 0.")


@pytest.mark.parametrize(
    "name",
    [
        "a long experiment name with spaces that PyYAML wraps onto a second line when MLflow dumps it",
        "it's a long name with a quote: that forces quoting, and it is long enough to wrap in PyYAML's dump",
    ],
)
def test_parse_meta_reads_long_values_that_pyyaml_wraps(name: str) -> None:
    """A long value MLflow's safe_dump wraps over lines reads back whole (not cut at the first line)."""
    import yaml

    text = yaml.safe_dump({"experiment_id": "1", "lifecycle_stage": "active", "name": name}, allow_unicode=True)
    assert "\n  " in text or "\n " in text  # the case under test: the value continues on another line
    assert name == parse_meta(text)["name"]


# Plain (unquoted) scalars as a hand-edited or foreign meta.yaml may hold them: Unicode digits and
# spaces, YAML 1.1 words and numbers, comments, indicators.
_PLAIN_PIECES = ["١٢٣", "٣", "0", "7", "123", "-4", "+5", "0o7", "012", "1_0", "1.5", "1e3", ".5", "yes", "Off",
                 "~", "null", "true", "実験", "\u3000", "\xa0", " ", "#", " #c", ":", ": ", "a", "-", "'", '"', "é",
                 "\u2003", "\u00b2", "Ⅻ", "x"]  # fmt: skip


@settings(deadline=None)  # the machine is shared: timings are noisy
@given(value=st.lists(st.sampled_from(_PLAIN_PIECES), min_size=1, max_size=4).map("".join))
@example(value="١٢٣")  # Arabic-Indic digits: a str to YAML (its ints are ASCII), an int to \d
@example(value="実験\u3000")  # an ideographic space: part of the name to YAML, stripped by str.strip()
@example(value="012")  # a YAML 1.1 octal int (10), not 12
def test_parse_meta_reads_any_plain_value_as_pyyaml_does(value: str) -> None:
    """Whatever a field holds unquoted, parse_meta gives what MLflow's reader (PyYAML safe_load) gives."""
    text = f"experiment_id: '1'\nname: {value}\nlifecycle_stage: active\n"
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError:
        with pytest.raises(ValueError):
            parse_meta(text)
        return
    assert expected == parse_meta(text)


@settings(deadline=None)  # the machine is shared: timings are noisy
@given(name=st.text(max_size=30))
@example(name="١٢٣")
@example(name="実験\u3000")
def test_parse_meta_reads_any_name_mlflow_dumps_as_pyyaml_does(name: str) -> None:
    """Any name as MLflow's writer (safe_dump, allow_unicode) puts it in meta.yaml reads back as PyYAML reads it."""
    text = yaml.safe_dump({"experiment_id": "1", "lifecycle_stage": "active", "name": name}, allow_unicode=True)
    assert yaml.safe_load(text) == parse_meta(text)
