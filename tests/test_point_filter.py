"""The file sink's identical-point filter: bounded memory at one (step, timestamp), duplicates still dropped."""

from __future__ import annotations

from pathlib import Path

import anyio

from steplog.sinks.mlruns import _SEEN_MAX, MlrunsSink
from steplog.typing import Batch, RunRequest


def _request() -> RunRequest:
    return RunRequest(experiment_name="filter", run_name="r", tags={}, start_time=1, user_id="u")


def test_points_at_one_step_and_stamp_keep_a_bounded_filter(tmp_path: Path) -> None:
    """200,000 distinct values at one (step, timestamp) leave at most _SEEN_MAX values in the filter (it kept all)."""
    sink = MlrunsSink(tmp_path / "mlruns")
    anyio.run(sink.open, _request())
    for chunk in range(4):
        items: list[object] = []
        for i in range(50_000):
            items += (1000, float(chunk * 50_000 + i), 7)
        sink.write_sync(Batch(metrics=[("x", items)]))
    _stamp, seen = sink._recent["x"]
    assert len(seen) <= _SEEN_MAX
    lines = (sink.run_dir / "metrics" / "x").read_text().splitlines()  # type: ignore[operator]
    assert len(lines) == 200_000


def test_identical_consecutive_points_are_still_dropped(tmp_path: Path) -> None:
    """A repeated point at the same (step, timestamp), in one batch or the next, is written once."""
    sink = MlrunsSink(tmp_path / "mlruns")
    anyio.run(sink.open, _request())
    sink.write_sync(Batch(metrics=[("x", [1000, 1.0, 7, 1000, 1.0, 7, 1000, 2.0, 7])]))
    sink.write_sync(Batch(metrics=[("x", [1000, 2.0, 7, 1000, 3.0, 7])]))
    lines = (sink.run_dir / "metrics" / "x").read_text().splitlines()  # type: ignore[operator]
    assert lines == ["1000 1.0 7", "1000 2.0 7", "1000 3.0 7"]
    assert sink.duplicates_skipped == 2
