"""The backlog: what the sink took from the writer and the server has not acknowledged, in order.

It lives in memory up to ``max_buffer`` metric points, then in the on-disk journal
(:mod:`steplog._journal`); the journal's lines are always older than the memory's.
Requests are cut from the front of the backlog as full as the server's limits allow,
whatever the sizes of the batches that filled it: a backlog left by an outage goes
out in full requests, back to back.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..._journal import Journal
from ..._records import ArtifactRecord
from .encode import Part, join_parts

__all__ = ["Backlog", "OutageState"]


@dataclasses.dataclass(frozen=True, slots=True)
class OutageState:
    """How the sink stands with its server (``MlflowRestSink.outage_state()``).

    ``backlog_points`` are metric points taken from the writer and not yet
    acknowledged (in memory and in the journal); ``spilled_points`` went to the
    journal; ``retries`` counts requests that failed transiently and are tried again;
    ``last_error`` says the last failure in words (None once everything was acknowledged
    after it); ``outage_seconds`` is how long the server has not answered (0 if it does).
    """

    backlog_points: int
    memory_points: int
    journal_points: int
    spilled_points: int
    acknowledged_points: int
    requests: int
    retries: int
    last_error: str | None
    outage_seconds: float
    journal: Path | None


class Backlog:
    """The ordered backlog of one run (memory first in, journal for what spilled)."""

    def __init__(self, open_journal: Callable[[], Journal]) -> None:
        self._open_journal = open_journal
        self.journal: Journal | None = None
        self._items: collections.deque[Part | ArtifactRecord] = collections.deque()
        self.memory_points = 0
        self.journal_points = 0
        self.spilled_points = 0

    @property
    def memory(self) -> bool:
        return bool(self._items)

    @property
    def points(self) -> int:
        return self.memory_points + self.journal_points

    def add(self, parts: list[Part], artifacts: list[ArtifactRecord]) -> None:
        self._items.extend(parts)
        self._items.extend(artifacts)
        self.memory_points += sum(p.points for p in parts)

    # ------------------------------------------------------------------ sending from the front

    def journal_ops(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The journal's unacknowledged lines, oldest first (none without a journal)."""
        if self.journal is None:
            return iter(())
        return self.journal.pending()

    def ack_journal(self, offset: int, points: int) -> None:
        assert self.journal is not None
        self.journal.ack(offset)
        self.journal_points = max(0, self.journal_points - points)

    def journal_done(self) -> None:
        """Everything journaled is acknowledged: the journal goes."""
        if self.journal is not None:
            self.journal.remove()
            self.journal = None
            self.journal_points = 0

    def front(self, run_id: str) -> tuple[bytes, int, int] | ArtifactRecord | None:
        """The next request of the memory backlog: ``(body, points, items)`` as full as fits, or an artifact."""
        return _front(self._items, 0, run_id)

    def pop(self, items: int, points: int) -> None:
        """The first ``items`` entries are acknowledged (or refused for good)."""
        for _ in range(items):
            self._items.popleft()
        self.memory_points -= points

    # ------------------------------------------------------------------ the journal

    def spill(self, run_id: str, end: tuple[str, int] | None = None) -> None:
        """Move the memory backlog (and the run's end, if given) to the journal, in order, as full requests."""
        if not self._items and end is None:
            return
        journal = self.journal = self.journal or self._open_journal()
        lines: list[bytes] = []
        i = 0
        while (front := _front(self._items, i, run_id)) is not None:
            if isinstance(front, ArtifactRecord):
                lines.append(journal.artifact_line(front))
                i += 1
            else:
                body, points, n = front
                lines.append(journal.batch_line(body, points))
                i += n
        if end is not None:
            lines.append(journal.end_line(*end))
        journal.append(lines)  # on failure nothing left memory: the backlog is still whole
        self._items.clear()
        self.spilled_points += self.memory_points
        self.journal_points += self.memory_points
        self.memory_points = 0

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()


def _front(
    items: collections.deque[Part | ArtifactRecord], start: int, run_id: str
) -> tuple[bytes, int, int] | ArtifactRecord | None:
    """The request that starts at ``items[start]``: as many whole parts as fit in one body, or one artifact."""
    if start >= len(items):
        return None
    first = items[start]
    if isinstance(first, ArtifactRecord):
        return first
    merged = Part()
    n = 0
    for i in range(start, len(items)):
        item = items[i]
        if isinstance(item, ArtifactRecord) or not merged.fits(item):
            break
        merged.absorb(item)
        n += 1
    return join_parts(run_id, [merged]), merged.points, n
