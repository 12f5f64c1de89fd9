"""What the reading commands share: opening a store (local or a server), naming a run, formatting.

A store is found as ``start_run`` finds it: ``--uri``, else ``STEPLOG_TRACKING_URI``,
then ``MLFLOW_TRACKING_URI``, then ``./mlruns``, and opened with ``steplog.Store``: a ``sqlite:`` URI reads MLflow's
database, an ``http(s)://`` URI a tracking server with read-only REST calls
(:class:`steplog._rest_reader.RestStore`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from .._layout import TMP_PREFIX, uri_to_path
from .._records import MetricPoint, RunStatus
from .._rest_reader import RemoteRun, RestStore
from .._run import resolve_tracking_uri
from ..store import History, RunData, Store, StoreError
from . import CommandError

__all__ = [
    "URI_HELP",
    "AnyRun",
    "AnyStore",
    "artifact_sizes",
    "close_stores",
    "duration",
    "fmt_size",
    "fmt_time",
    "fmt_value",
    "get_run",
    "history",
    "natural_key",
    "open_store",
    "print_lines",
    "short_ids",
    "table",
]

URI_HELP = (
    "the store: a directory, a file: URI, MLflow's database sqlite:///path.db, or a tracking server "
    "http(s)://host:port read over REST "
    "(default: STEPLOG_TRACKING_URI, MLFLOW_TRACKING_URI, ./mlruns)"
)
LATEST = "latest"
"""Wherever a run id is taken, this word names the newest run (by start time)."""

AnyStore = Store | RestStore
AnyRun = RunData | RemoteRun


_OPENED: list[RestStore] = []


def open_store(uri: str | None) -> AnyStore:
    """The store ``--uri`` names (or the default one); a server's connection is closed by :func:`close_stores`."""
    text = resolve_tracking_uri(uri)
    try:
        store: AnyStore = Store(text)  # a directory, sqlite:, or a server (a RestStore)
    except StoreError as exc:
        hint = "" if uri is not None else "; pass --uri PATH or set STEPLOG_TRACKING_URI"
        raise CommandError(f"{exc}{hint}") from None
    if isinstance(store, RestStore):
        _OPENED.append(store)
    return store


def close_stores() -> None:
    """Close the connections the command opened (``main`` calls it when a command ends)."""
    while _OPENED:
        _OPENED.pop().close()


def get_run(store: AnyStore, ref: str) -> AnyRun:
    """The run named by ``ref``: an id, a unique prefix of one, or ``latest`` (the newest run)."""
    try:
        if ref == LATEST:
            runs = store.runs()
            if not runs:
                raise CommandError(f"no runs in {store.root}: `latest` names the newest run")
            return runs[0]
        return store.get_run(ref)
    except StoreError as exc:
        raise CommandError(str(exc)) from None


def history(store: AnyStore, run: AnyRun, key: str) -> History:
    """The full history of ``key`` in ``run``."""
    if isinstance(store, RestStore):
        remote = run if isinstance(run, RemoteRun) else store.get_run(run.run_id)
        return store.metric_history(remote, key)
    return store.metric_history(run if isinstance(run, RunData) else run.run_id, key)


def artifact_sizes(store: AnyStore, run: AnyRun) -> list[tuple[str, int | None]] | None:
    """``(path, size in bytes)`` of each artifact file of the run; None when they are elsewhere (s3://, ...)."""
    if isinstance(store, RestStore):
        remote = run if isinstance(run, RemoteRun) else store.get_run(run.run_id)
        try:
            return [(a.path, a.size) for a in store.artifacts(remote)]
        except StoreError:
            return None
    assert isinstance(run, RunData)
    uri = run.artifact_uri
    if uri and not uri.startswith("file:") and "://" in uri:
        return None
    folder = uri_to_path(uri) if uri else run.path / "artifacts"
    out: list[tuple[str, int | None]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _leftover(d))
        for name in filenames:
            if _leftover(name):
                continue  # an interrupted copy's temp file: not an artifact (fsck reports it)
            path = Path(dirpath, name)
            try:
                size: int | None = path.stat().st_size
            except OSError:
                size = None
            out.append((path.relative_to(folder).as_posix(), size))
    return sorted(out, key=lambda item: natural_key(item[0]))


def _leftover(name: str) -> bool:
    return name.startswith(TMP_PREFIX.rstrip("-")) or name == ".steplog-staging"


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(text: str) -> tuple[tuple[int, str, int], ...]:
    """Sort key putting ``grad_norm/2`` before ``grad_norm/10`` (digit runs compare as numbers)."""
    return tuple(
        (1, "", int(part)) if i % 2 else (0, part, 0) for i, part in enumerate(_DIGITS.split(text)) if part or i % 2
    )


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(ms: int | None) -> str:
    if ms is None or ms < 0:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def fmt_value(value: float) -> str:
    return f"{value:.6g}"


def fmt_size(size: int | None) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 kB``, ``12.0 MB``."""
    if size is None:
        return "?"
    if size < 1000:
        return f"{size} B"
    amount = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        amount /= 1000
        if amount < 1000 or unit == "TB":
            break
    return f"{amount:.1f} {unit}"


def duration(run: AnyRun) -> str:
    if run.start_time is None:
        return "-"
    if run.end_time is None:
        return fmt_duration(int(time.time() * 1000) - run.start_time) if run.status == RunStatus.RUNNING else "-"
    return fmt_duration(run.end_time - run.start_time)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> list[str]:
    """Aligned text columns (numbers right-aligned where ``right`` says so)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = list(right) + [False] * (len(headers) - len(right))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def short_ids(run_ids: Sequence[str], least: int = 8) -> dict[str, str]:
    """The shortest prefixes (at least ``least`` characters) that tell the given runs apart."""
    n = least
    while n < 32 and len({r[:n] for r in run_ids}) < len(set(run_ids)):
        n += 2
    return {r: r[:n] for r in run_ids}


def print_lines(lines: Sequence[str], out: TextIO | None = None) -> None:
    (out or sys.stdout).write("".join(f"{line}\n" for line in lines))


def latest_of(latest: Mapping[str, MetricPoint], key: str) -> MetricPoint | None:
    return latest.get(key)
