"""The outage journal: a crash-safe, append-only local record of what a tracking server has not acknowledged.

When an MLflow tracking server is unreachable for longer than the REST sink's
memory allowance (``max_buffer``), the sink spills its backlog here, and replays
it in order once the server is back. What is still here when the run closes is
uploaded later by ``steplog sync <journal> --to <url>``.

Layout of one run's journal (a folder named after the run id)::

    <journal_dir>/<run_id>/
        journal.jsonl   one JSON object per line: a header, then operations, in order
        acked           byte offset of the first line the server has not acknowledged
        artifacts/...   copies of the artifacts waiting to be uploaded

Lines are ``{"op": "run", ...header}`` (first line), ``{"op": "batch", "body": <a
runs/log-batch request body>, "points": n}``, ``{"op": "artifact", "path": "a/b.txt"}``
and ``{"op": "end", "status": "FINISHED", "end_time": ms}``.

Everything read back (the header's run id, each line, an artifact's path, the
acknowledged offset) is checked before it is used, and :meth:`Journal.remove`
deletes only a run-id-named folder directly inside the journal base: a journal
edited by hand or by an attacker cannot make steplog write or delete elsewhere.

The line discipline is the local store's (MLFLOW_FORMAT.md §1.13): every append
is one ``write()`` of whole lines on an ``O_APPEND`` descriptor, fsynced, cut back
on failure; a torn tail left by a crash is cut back to the last newline when
the journal is opened again. The acknowledged offset is replaced atomically and
may lag behind the server (a crash between a request and its acknowledgement):
replaying a line twice is harmless, because the server keeps one copy of an
identical point, param value or tag.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ._errors import StepLogError, WriteError
from ._layout import write_atomic
from ._records import ArtifactRecord
from ._runmeta import check_run_id, cut_torn_tail

__all__ = ["JOURNAL_FILE", "Journal", "is_journal", "journal_folders"]

JOURNAL_FILE = "journal.jsonl"
_ACKED = "acked"
_ARTIFACTS = "artifacts"
VERSION = 1


def is_journal(path: Path) -> bool:
    """True if ``path`` is one run's journal folder."""
    return (path / JOURNAL_FILE).is_file()


def journal_folders(path: Path) -> list[Path]:
    """The run journals at ``path``: the folder itself, or the run folders directly inside it."""
    if is_journal(path):
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if is_journal(p))


class Journal:
    """One run's journal folder (create with :meth:`create`, read back with :meth:`open`)."""

    def __init__(self, folder: Path, header: dict[str, Any], fd: int | None = None) -> None:
        self.folder = folder
        self.header = header
        self._fd = fd
        self._base = folder.parent

    @property
    def path(self) -> Path:
        """The ``journal.jsonl`` file."""
        return self.folder / JOURNAL_FILE

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, base: Path, header: dict[str, Any]) -> Journal:
        """Open the journal of ``header["run_id"]`` under ``base`` for appending (created if missing)."""
        run_id = check_run_id(header.get("run_id"), "the journal header")
        folder = base / run_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / JOURNAL_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise WriteError(f"cannot create the outage journal in {folder}: {exc.strerror or exc}") from exc
        journal = cls(folder, dict(header), fd)
        try:
            if cut_torn_tail(fd) == 0:
                journal.append([_line({"op": "run", "version": VERSION, **header})])
            else:
                journal.header = journal._read_header()
        except BaseException:
            journal.close()
            raise
        return journal

    @classmethod
    def open(cls, folder: Path) -> Journal:
        """Open an existing journal for replay (``steplog sync``)."""
        if not is_journal(folder):
            raise StepLogError(f"{folder} is not a steplog journal (it has no {JOURNAL_FILE})")
        try:
            fd = os.open(folder / JOURNAL_FILE, os.O_RDWR | os.O_APPEND)
            cut_torn_tail(fd)
        except OSError as exc:
            raise WriteError(f"cannot open the journal {folder}: {exc.strerror or exc}") from exc
        journal = cls(folder, {}, fd)
        journal.header = journal._read_header()
        return journal

    def _read_header(self) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            header = orjson.loads(first)
        except orjson.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("op") != "run" or "run_id" not in header:
            raise StepLogError(f"{self.path} is not a steplog journal: its first line is not a run header")
        check_run_id(header["run_id"], f"the journal {self.path}")
        return header

    def close(self) -> None:
        """Close the file descriptor (the journal stays on disk)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ writing

    def append(self, lines: list[bytes]) -> None:
        """Append whole lines with one fsynced write; on failure cut the file back (no partial line stays)."""
        if not lines:
            return
        if self._fd is None:
            raise WriteError(f"the journal {self.path} is closed")
        data = b"".join(lines)
        fd = self._fd
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise WriteError(f"cannot write the outage journal {self.path}: {exc.strerror or exc}") from exc

    def batch_line(self, body: bytes, points: int) -> bytes:
        """The line for one runs/log-batch request body (already JSON)."""
        return b'{"op":"batch","points":%d,"body":%b}\n' % (points, body)

    def artifact_line(self, record: ArtifactRecord) -> bytes:
        """Copy an artifact into the journal now and return its line (the copy exists before the line)."""
        dest = self.artifact_file(record.artifact_path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if record.data is not None:
                write_atomic(dest, record.data, fsync=True)
            elif record.source is not None and os.path.isdir(record.source):
                shutil.copytree(record.source, dest, dirs_exist_ok=True)
            elif record.source is not None:
                shutil.copyfile(record.source, dest)
        except OSError as exc:
            raise WriteError(f"cannot copy artifact {record.artifact_path!r} into the journal: {exc}") from exc
        return _line({"op": "artifact", "path": record.artifact_path})

    def end_line(self, status: str, end_time: int) -> bytes:
        """The line recording the run's final status and end time."""
        return _line({"op": "end", "status": status, "end_time": end_time})

    # ------------------------------------------------------------------ replay

    def acked(self) -> int:
        """Byte offset of the first line not acknowledged by the server."""
        try:
            text = (self.folder / _ACKED).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            return 0
        if not text:
            return 0
        if not (text.isascii() and text.isdigit()) or int(text) > self.size():
            raise StepLogError(f"{self.folder / _ACKED} holds {text[:40]!r}, not an offset inside {self.path}")
        return int(text)

    def ack(self, offset: int) -> None:
        """Record that everything before ``offset`` is acknowledged (atomic replace)."""
        try:
            write_atomic(self.folder / _ACKED, b"%d\n" % offset)
        except OSError as exc:
            raise WriteError(f"cannot update {self.folder / _ACKED}: {exc.strerror or exc}") from exc

    def pending(self, start: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(end offset, operation)`` for each line from ``start`` (default: the acknowledged offset)."""
        offset = self.acked() if start is None else start
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a torn tail (another process crashed mid-append): not a record
                offset += len(raw)
                record = _operation(raw, self.path, offset)
                if record["op"] == "run":
                    continue
                yield offset, record

    def size(self) -> int:
        """Current size of ``journal.jsonl`` in bytes."""
        return self.path.stat().st_size

    def has_pending(self) -> bool:
        """True while some line after the header is not acknowledged."""
        return any(True for _ in self.pending())

    def artifact_file(self, path: str) -> Path:
        """Where the journal keeps the copy of artifact ``path`` (a relative path without ``..``, checked)."""
        return self.folder / _ARTIFACTS / _artifact_path(path, self.path)

    def remove(self) -> None:
        """Delete the journal folder (everything in it is acknowledged).

        Only a real folder named like a run id, directly inside the journal base, is deleted.
        """
        self.close()
        folder = self.folder
        try:
            check_run_id(folder.name, f"the journal folder {folder}")
            inside = folder.resolve(strict=True).parent == self._base.resolve(strict=True)
        except (StepLogError, OSError):
            inside = False
        if not inside or folder.is_symlink() or not is_journal(folder):
            raise StepLogError(f"refusing to delete {folder}: it is not a journal folder inside {self._base}")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # the journal base, when this was its last run
        except OSError:
            pass


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


_OPS = frozenset({"run", "batch", "artifact", "end"})


def _operation(raw: bytes, path: Path, offset: int) -> dict[str, Any]:
    """One journal line, checked: a known operation with the fields its replay uses."""
    try:
        op = orjson.loads(raw)
    except orjson.JSONDecodeError:
        op = None
    ok = isinstance(op, dict) and op.get("op") in _OPS
    if ok and op["op"] == "batch":
        points = op.get("points", 0)
        ok = isinstance(op.get("body"), dict) and isinstance(points, int) and points >= 0
    elif ok and op["op"] == "artifact":
        ok = isinstance(op.get("path"), str)
    elif ok and op["op"] == "end":
        ok = isinstance(op.get("status"), str) and isinstance(op.get("end_time"), int)
    if not ok:
        raise StepLogError(f"{path} is damaged: the line ending at byte {offset} is not a journal operation")
    assert isinstance(op, dict)
    if op["op"] == "artifact":
        _artifact_path(op["path"], path)
    return op


def _artifact_path(value: str, journal: Path) -> str:
    """``value`` if it is a relative artifact path that stays inside the journal's artifacts folder."""
    parts = value.split("/")
    if (
        not value
        or value.startswith("/")
        or "\\" in value
        or "\x00" in value
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise StepLogError(f"{journal}: artifact path {value[:80]!r} is not a relative path inside the journal")
    return value
