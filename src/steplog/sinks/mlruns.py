"""The local MLflow file store ("mlruns"), written exactly as MLflow 3.17 reads it.

Line discipline (MLFLOW_FORMAT.md §1.13): a key's batch is one ``write()`` of whole
lines on an ``O_APPEND`` descriptor; a failed or short write is cut back to the
previous size, so no partial line ever stays; a line ends at every 4 KiB offset of a
metric file (padded with trailing spaces, which readers strip), so a write the kernel
cuts at a page boundary on SIGKILL still leaves whole lines; a metric file is created only with
its first lines (written to a temporary file in the run directory, then renamed);
a file reopened later has any torn tail cut back to its last newline; meta files
are replaced atomically. Identical points (same key, timestamp, step and value)
are written once, so ``mlflow migrate-filestore`` accepts the store.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from .._artifacts import STAGING, is_snapshot, place_file, place_tree
from .._encode import encode_columns
from .._errors import InvalidKeyError, WriteError
from .._layout import (
    DEFAULT_EXPERIMENT_ID,
    DEFAULT_EXPERIMENT_NAME,
    META,
    RESERVED_ROOT_FOLDERS,
    RUN_DIRS,
    dump_meta,
    encode_values,
    experiment_meta,
    file_uri,
    new_experiment_id,
    new_run_id,
    parse_meta,
    run_meta,
    temp_name,
    uri_to_path,
    write_atomic,
)
from .._records import ArtifactRecord, RunInfo, RunStatus
from .._runmeta import cut_torn_tail, system_tags
from .._threads import in_daemon_thread
from .._validation import (
    check_experiment_id,
    check_experiment_name,
    check_key,
    check_run_id,
    check_run_name,
    check_tag_value,
)
from ..typing import Batch, RunRequest

__all__ = ["MlrunsSink"]

_LINE = b"%d %b %d\n"
# Items per C-level call when encoding (1024 points, ~0.1 ms): each such call holds the interpreter
# lock throughout, so an event loop or training loop sharing it waits at most that long at a time.
_CHUNK = 3 * 1024


def _lines(items: list[Any]) -> tuple[bytes, bytes]:
    """The metric lines of interleaved ``[ts, value, step, ...]`` items, and the last value's text.

    Encoded column-wise by :func:`steplog._encode.encode_columns` (a few C-level calls for the
    whole chunk, byte for byte the per-point encoding).
    """
    return encode_columns(items[0::3], items[1::3], items[2::3]), encode_values([items[-2]])[0]


def _all_distinct(steps: list[int]) -> bool:
    """True if no step occurs twice (checked a chunk at a time, for the reason given at ``_CHUNK``)."""
    if len(steps) <= _CHUNK:
        return len(set(steps)) == len(steps)
    seen: set[int] = set()
    for i in range(0, len(steps), _CHUNK):
        seen.update(steps[i : i + _CHUNK])
    return len(seen) == len(steps)


# Values MLflow's SQL store cannot tell apart (MLFLOW_FORMAT.md §4: -0.0 becomes 0.0, ±inf is clamped
# to ±max float): two such points at one (key, step, timestamp) break migrate-filestore's UNIQUE
# constraint just like identical ones, so they count as identical here.
# Distinct values remembered per key at one (step, timestamp): millions of points logged at one
# step and stamp must not keep millions of values; an identical point within the last _SEEN_MAX
# distinct ones (a repeated call, a resent batch) is still dropped.
_SEEN_MAX = 256

_SQL_SAME = {b"-0.0": b"0.0", b"inf": b"1.7976931348623157e+308", b"-inf": b"-1.7976931348623157e+308"}


class _MetricFile:
    __slots__ = ("fd", "path", "size")

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd = fd
        self.path = path
        self.size = size


class MlrunsSink:
    """Writes one run into a local mlruns directory.

    Args:
        root: the store's root directory (``./mlruns``) or a ``file:`` URI.
        durability: ``"os"`` hands each write to the OS; ``"fsync"`` also fsyncs what
            each write touched before it counts as written.
        max_open_files: metric files kept open at once (least recently used are closed).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durability: Literal["os", "fsync"] = "os",
        max_open_files: int = 128,
    ) -> None:
        self.root = uri_to_path(os.fspath(root)).absolute()
        self._fsync = durability == "fsync"
        self._max_open = max(1, max_open_files)
        self._files: collections.OrderedDict[str, _MetricFile] = collections.OrderedDict()
        self._created: set[str] = set()
        self._recent: dict[str, tuple[Any, dict[bytes, None]]] = {}
        self._lock = threading.Lock()
        self._meta: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.bytes_written = 0
        self.duplicates_skipped = 0

    # ------------------------------------------------------------------ open

    async def open(self, request: RunRequest) -> RunInfo:
        return await in_daemon_thread(lambda: self.open_sync(request))

    def open_sync(self, request: RunRequest) -> RunInfo:
        """Create the experiment if needed and the run (directories, meta, system tags)."""
        root = self.root
        # Everything that becomes a path or a file's content is checked before anything is created:
        # the run id may be a server's answer (a hostile one could send "../../x"), and a name that
        # UTF-8 cannot encode would fail halfway through, leaving a half-made run.
        if request.run_id is not None:
            check_run_id(request.run_id, "the run request (the tracking server's runs/create answer)")
        if request.experiment_id is not None:
            check_experiment_id(request.experiment_id, "the run request")
        check_experiment_name(request.experiment_name)
        check_run_name(request.run_name)
        for key, value in request.tags.items():
            check_tag_value(check_key(key, "tag"), value)
        try:
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root):
                (root / ".trash").mkdir(exist_ok=True)
                if not any(_is_experiment_dir(p) for p in root.iterdir()):
                    self._write_experiment(DEFAULT_EXPERIMENT_ID, DEFAULT_EXPERIMENT_NAME)
                experiment_id = request.experiment_id or self._find_experiment(request.experiment_name)
                if experiment_id is None:
                    experiment_id = new_experiment_id()
                    while (root / experiment_id).exists():
                        experiment_id = new_experiment_id()
                    self._write_experiment(experiment_id, request.experiment_name)
        except OSError as exc:
            raise _write_error(root, exc, "cannot create the experiment in") from exc
        meta_path = root / experiment_id / META
        try:
            exp_meta = parse_meta(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WriteError(f"cannot read {meta_path}: {exc}") from exc
        run_id = request.run_id or new_run_id()
        run_dir = root / experiment_id / run_id
        artifact_location = str(exp_meta.get("artifact_location") or file_uri(root / experiment_id))
        artifact_uri = f"{artifact_location.rstrip('/')}/{run_id}/artifacts"
        try:
            run_dir.mkdir(parents=False, exist_ok=bool(request.run_id))
            for name in RUN_DIRS:
                (run_dir / name).mkdir(exist_ok=True)
            self._meta = run_meta(
                run_id=run_id,
                experiment_id=experiment_id,
                run_name=request.run_name,
                artifact_uri=artifact_uri,
                user_id=request.user_id,
                start_time=request.start_time,
                end_time=None,
                status=int(RunStatus.RUNNING),
            )
            self.run_dir = run_dir
            write_atomic(run_dir / META, dump_meta(self._meta).encode(), fsync=self._fsync)
            tags = system_tags(request.user_id, request.run_name, request.tags)
            for key, value in tags.items():
                self._write_value("tags", key, value)
        except OSError as exc:
            raise _write_error(run_dir, exc, "cannot create the run in") from exc
        return RunInfo(
            run_id=run_id,
            experiment_id=experiment_id,
            experiment_name=request.experiment_name,
            run_name=request.run_name,
            artifact_uri=artifact_uri,
            tracking_uri=file_uri(root),
            start_time=request.start_time,
            user_id=request.user_id,
        )

    def _find_experiment(self, name: str) -> str | None:
        for base in (self.root, self.root / ".trash"):
            if not base.is_dir():
                continue
            for entry in sorted(base.iterdir()):
                if not _is_experiment_dir(entry):
                    continue
                try:
                    meta = parse_meta((entry / META).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if meta.get("name") == name:
                    if base != self.root or meta.get("lifecycle_stage") == "deleted":
                        raise InvalidKeyError(
                            f"experiment {name!r} is deleted (id {entry.name}): restore it "
                            "(mlflow experiments restore) or log to another experiment name"
                        )
                    return entry.name
        return None

    def _write_experiment(self, experiment_id: str, name: str) -> None:
        folder = self.root / experiment_id
        folder.mkdir(exist_ok=True)
        now = int(time.time() * 1000)
        meta = experiment_meta(experiment_id, name, file_uri(folder), now)
        write_atomic(folder / META, dump_meta(meta).encode(), fsync=self._fsync)

    # ------------------------------------------------------------------ write

    async def write(self, batch: Batch) -> None:
        await in_daemon_thread(lambda: self.write_sync(batch))

    def write_sync(self, batch: Batch) -> None:
        """Write a batch; each finished entry is marked in ``batch.done`` (a retry skips it)."""
        with self._lock:
            done = batch.done
            for key, items in batch.metrics:
                if ("metric", key) in done:
                    continue
                fd = self._write_metric(key, items)
                if fd is not None and self._fsync:
                    # now, while the descriptor is surely open (the open-file cap may close it later)
                    self._fsync_metric(key, fd)
                done.add(("metric", key))
            for key, text in batch.params:
                if ("param", key) not in done:
                    self._write_value("params", key, text)
                    done.add(("param", key))
            for key, text in batch.tags:
                if ("tag", key) not in done:
                    self._write_value("tags", key, text)
                    if key == "mlflow.runName":
                        self._meta["run_name"] = text
                        self._write_meta()
                    done.add(("tag", key))
            # One path may come several times in a batch (a file logged again, folders merged): each is
            # written in order, and the path counts as done only after its last record, so that a
            # retry after a failure in between writes them all again instead of skipping the rest.
            last = {record.artifact_path: i for i, record in enumerate(batch.artifacts)}
            for i, record in enumerate(batch.artifacts):
                if ("artifact", record.artifact_path) not in done:
                    self._write_artifact(record)
                    if last[record.artifact_path] == i:
                        done.add(("artifact", record.artifact_path))

    def _encode(self, key: str, items: list[Any]) -> bytes:
        """Lines for a key's items, without points identical to one already written or queued."""
        steps = items[2::3]
        recent = self._recent.get(key)
        if _all_distinct(steps) and (recent is None or recent[0] != (steps[0], items[0])):
            # no step repeats, so no two points can be equal: format them all
            if len(items) <= _CHUNK:
                data, last = _lines(items)
            else:
                parts = [_lines(items[i : i + _CHUNK]) for i in range(0, len(items), _CHUNK)]
                data, last = b"".join(part for part, _last in parts), parts[-1][1]
            self._recent[key] = ((steps[-1], items[-3]), {_SQL_SAME.get(last, last): None})
            return data
        stamps = items[0::3]
        texts = encode_values(items[1::3])
        # slow path: some step repeats; drop points equal to one of the same (step, timestamp)
        # (the values remembered are bounded: the last _SEEN_MAX distinct ones at the current stamp)
        current, seen = recent if recent is not None else (None, {})
        keep: list[Any] = []
        for ts, text, step in zip(stamps, texts, steps, strict=True):
            stamp = (step, ts)
            ident = _SQL_SAME.get(text, text)
            if stamp != current:
                current, seen = stamp, {}
            elif ident in seen:
                self.duplicates_skipped += 1
                continue
            seen[ident] = None
            if len(seen) > _SEEN_MAX:
                del seen[next(iter(seen))]
            keep += (ts, text, step)
        self._recent[key] = (current, seen)
        return (_LINE * (len(keep) // 3)) % tuple(keep)

    def _write_metric(self, key: str, items: list[Any]) -> int | None:
        recent = self._recent.get(key)
        try:
            return self._write_metric_once(key, items)
        except BaseException:
            # the writer retries these same items: forget that they were seen (or the retry would
            # drop them as duplicates), and reopen the file next time (cutting any tail a failed
            # cut-back left behind)
            if recent is None:
                self._recent.pop(key, None)
            else:
                self._recent[key] = recent
            handle = self._files.pop(key, None)
            if handle is not None:
                try:
                    os.close(handle.fd)
                except OSError:
                    pass
            raise

    def _write_metric_once(self, key: str, items: list[Any]) -> int | None:
        data = self._encode(key, items)
        if not data:
            return None
        assert self.run_dir is not None
        handle = self._files.get(key)
        if handle is not None:
            self._files.move_to_end(key)
        elif key in self._created or (self.run_dir / "metrics" / key).exists():
            handle = self._reopen(key)
        else:
            return self._create_metric(key, data)
        self.bytes_written += _append(handle, data)
        return handle.fd

    def _create_metric(self, key: str, data: bytes) -> int:
        """Create the metric file together with its first lines (never an empty metric file)."""
        assert self.run_dir is not None
        final = self.run_dir / "metrics" / key
        tmp = self.run_dir / temp_name()
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as exc:
            raise _write_error(final, exc) from exc
        handle = _MetricFile(fd, final, 0)
        try:
            written = _append(handle, data)
            os.rename(tmp, final)
        except BaseException as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, WriteError):
                raise _write_error(final, exc) from exc
            raise
        self._created.add(key)
        self._remember(key, handle)
        self.bytes_written += written
        return fd

    def _reopen(self, key: str) -> _MetricFile:
        """Open an existing metric file for appending, cutting a torn tail back to its last newline."""
        assert self.run_dir is not None
        path = self.run_dir / "metrics" / key
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            size = cut_torn_tail(fd)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        handle = _MetricFile(fd, path, size)
        self._created.add(key)
        self._remember(key, handle)
        return handle

    def _fsync_metric(self, key: str, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            assert self.run_dir is not None
            raise _write_error(self.run_dir / "metrics" / key, exc) from exc

    def _remember(self, key: str, handle: _MetricFile) -> None:
        self._files[key] = handle
        while len(self._files) > self._max_open:
            _old_key, old = self._files.popitem(last=False)
            os.close(old.fd)

    def _write_value(self, folder: str, key: str, text: str) -> None:
        assert self.run_dir is not None
        path = self.run_dir / folder / key
        data = text.encode("utf-8")
        try:
            if folder == "params" and path.exists() and path.read_bytes() == data:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, fsync=self._fsync, temp_dir=self.run_dir)  # not in params/ or tags/
        except OSError as exc:
            raise _write_error(path, exc) from exc
        self.bytes_written += len(data)

    def _write_artifact(self, record: ArtifactRecord) -> None:
        """Put an artifact in place; every file goes through a temp name in the run folder, then a rename."""
        run_dir = self.run_dir
        assert run_dir is not None
        root = (run_dir / "artifacts").resolve()
        dest = (root / record.artifact_path).resolve()
        if dest != root and root not in dest.parents:  # validated at the call; checked again here
            raise WriteError(f"artifact path {record.artifact_path!r} escapes the run's artifact directory")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if record.data is not None:
                write_atomic(dest, record.data, fsync=self._fsync, temp_dir=run_dir)
                self.bytes_written += len(record.data)
            elif record.source is not None:
                source = Path(record.source)
                # a snapshot taken at the call is private to steplog: hard-link it, at no cost
                link = is_snapshot(source, run_dir / STAGING)
                place = place_tree if source.is_dir() else place_file
                self.bytes_written += place(source, dest, run_dir, link=link, fsync=self._fsync)
        except OSError as exc:
            raise _write_error(dest, exc) from exc

    def _write_meta(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / META
        try:
            write_atomic(path, dump_meta(self._meta).encode(), fsync=self._fsync)
        except OSError as exc:
            raise _write_error(path, exc) from exc

    # ------------------------------------------------------------------ close

    async def close(self, status: RunStatus, end_time: int) -> None:
        await in_daemon_thread(lambda: self.close_sync(status, end_time))

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        """Write the final status and end time, then close every file."""
        with self._lock:
            try:
                if self.run_dir is not None:
                    self._meta["status"] = int(status)
                    self._meta["end_time"] = end_time
                    self._write_meta()
            finally:
                while self._files:
                    _key, handle = self._files.popitem()
                    os.close(handle.fd)

    # ------------------------------------------------------------------ long jobs (steplog._jobs)

    def experiment_for(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (under the store's lock, as in :meth:`open_sync`)."""
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root):
                (root / ".trash").mkdir(exist_ok=True)
                if not any(_is_experiment_dir(p) for p in root.iterdir()):
                    self._write_experiment(DEFAULT_EXPERIMENT_ID, DEFAULT_EXPERIMENT_NAME)
                experiment_id = self._find_experiment(name)
                if experiment_id is None:
                    experiment_id = new_experiment_id()
                    while (root / experiment_id).exists():
                        experiment_id = new_experiment_id()
                    self._write_experiment(experiment_id, name)
        except OSError as exc:
            raise WriteError(f"cannot create the experiment in {root}: {exc}") from exc
        return experiment_id


# ---------------------------------------------------------------------------- helpers


_ALIGN = 4096
"""No metric line straddles a multiple of this file offset (see :func:`_align_lines`)."""
_MAX_LINE = 66
"""The longest line steplog writes: a 19-digit timestamp, a 24-character value, a 20-character step."""


def _align_lines(data: bytes, start: int) -> bytes:
    """Pad lines with trailing spaces so that a line ends at every 4 KiB boundary of the file.

    Linux copies a ``write()`` into the page cache one page (or folio) at a time and checks
    for a fatal signal before each, so SIGKILL (the OOM killer, a scheduler) can cut an
    append at any page boundary it crosses: the file would end in a torn line. With a line
    ending at every such boundary a cut append still leaves only whole lines. A batch that
    ends just short of a boundary is padded up to it, so the next batch's first line cannot
    straddle it either. MLflow's reader (and steplog's) strips each line, so the spaces read
    back as nothing; they cost about 1% of the file.

    Args:
        data: whole lines, ending with a newline.
        start: the file offset the data will be written at.
    """
    end = start + len(data)
    if (start // _ALIGN + 1) * _ALIGN - end >= _MAX_LINE:
        return data  # no boundary within reach: the usual case for small batches
    out: list[bytes] = []
    cur, pos, n = start, 0, len(data)
    while True:
        room = (cur // _ALIGN + 1) * _ALIGN - cur  # bytes until the next boundary
        left = n - pos
        if left <= room:
            gap = room - left
            if 0 < gap < _MAX_LINE and left:  # end on the boundary: the next batch starts on it
                out += (data[pos : n - 1], b" " * gap, b"\n")
            else:
                out.append(data[pos:])
            return b"".join(out)
        cut = data.rfind(b"\n", pos, pos + room)
        if cut < 0:
            # the first line straddles the boundary (the file was not written this way): keep it as is
            nl = data.index(b"\n", pos + room)
            out.append(data[pos : nl + 1])
            cur += nl + 1 - pos
            pos = nl + 1
            continue
        out += (data[pos:cut], b" " * (pos + room - cut - 1), b"\n")
        cur += room
        pos = cut + 1


def _append(handle: _MetricFile, data: bytes) -> int:
    """Append whole lines with one write; on any failure cut the file back so no partial line stays.

    Returns the bytes written (the lines, aligned by :func:`_align_lines`).
    """
    data = _align_lines(data, handle.size)
    try:
        written = os.write(handle.fd, data)
        if written != len(data):
            # a short write on a regular file means the disk is full; finish or undo
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(handle.fd, view) :]
    except OSError as exc:
        try:
            os.ftruncate(handle.fd, handle.size)
        except OSError:
            pass
        raise _write_error(handle.path, exc) from exc
    handle.size += len(data)
    return len(data)


def _write_error(path: Path, exc: OSError, what: str = "cannot write") -> WriteError:
    """A WriteError naming the path and the cause, with the OS error's ``errno`` (and it as ``__cause__``)."""
    name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
    where = str(path) if exc.filename is None or str(exc.filename) == str(path) else f"{path} ({exc.filename})"
    err = WriteError(f"{what} {where}: {exc.strerror or exc}{f' ({name})' if name else ''}")
    err.errno = exc.errno
    err.filename = str(path)
    return err


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _is_experiment_dir(path: Path) -> bool:
    return path.name not in RESERVED_ROOT_FOLDERS and path.is_dir() and (path / META).is_file()


class _locked:
    """An exclusive ``flock`` on a directory, so concurrent processes do not create one experiment twice."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._folder, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
