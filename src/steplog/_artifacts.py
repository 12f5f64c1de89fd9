"""Artifacts as they were at the call: a snapshot taken by ``log_artifact``, placed by the sinks.

``mlflow.log_artifact`` copies synchronously, so a checkpoint re-saved right after the call
is stored as it was at the call. steplog keeps that promise without waiting for the writer:
the call copies the file or directory into a private staging folder (a copy, never a hard
link: ``torch.save`` truncates and rewrites the same inode) and queues that snapshot. The
staging folder is ``<run>/.steplog-staging/`` in the local store (same file system, so the
file sink hard-links the snapshot into ``artifacts/`` at no cost; MLflow ignores extra
entries in a run folder), or a temporary directory when the run has no local store yet.
A snapshot is deleted once no sink needs it (when its record is dropped).

The sinks never write an artifact straight to its final name: each file goes to a temp name
in the run folder and is renamed into place, so a kill mid-copy leaves no truncated artifact.

This module also remembers the artifact paths a run has logged, so that a file and a
folder of the same name (``a`` and ``a/b.txt``), which no file system can hold, are refused
at the second call instead of failing in the writer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ._errors import InvalidValueError, WriteError
from ._layout import temp_name
from ._records import ArtifactRecord

__all__ = [
    "STAGING",
    "ArtifactIndex",
    "StagedArtifact",
    "check_fits",
    "index_of",
    "is_snapshot",
    "place_file",
    "place_tree",
    "snapshot",
]

STAGING = ".steplog-staging"
"""Folder in the run directory holding artifact snapshots until the sinks have written them."""
_TEMP_PREFIX = "steplog-staging-"


class StagedArtifact(ArtifactRecord):
    """An artifact record whose ``source`` is a private snapshot (deleted when the record is dropped)."""

    __slots__ = ("__weakref__",)


class ArtifactIndex:
    """The artifact paths one run has logged: files, and the folders their '/' implies."""

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._dirs: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, files: Iterable[str], dirs: Iterable[str] = ()) -> None:
        """Record the files (and empty folders) one call writes, or raise if any clashes with another.

        Raises:
            InvalidValueError: a path would have to be both a file and a folder.
        """
        files, dirs = list(files), list(dirs)
        with self._lock:
            new_files, new_dirs = set(self._files), set(self._dirs)
            for path in files:
                _add(path, new_files, new_dirs, is_dir=False)
            for path in dirs:
                _add(path, new_files, new_dirs, is_dir=True)
            self._files, self._dirs = new_files, new_dirs


def _add(path: str, files: set[str], dirs: set[str], *, is_dir: bool) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + (1 if is_dir else 0)):
        prefix = "/".join(parts[:i])
        if prefix in files:
            raise _clash(path, prefix, "a file")
        dirs.add(prefix)
    if not is_dir:
        if path in dirs:
            raise _clash(path, path, "a folder")
        files.add(path)


def _clash(path: str, where: str, kind: str) -> InvalidValueError:
    return InvalidValueError(
        f"artifact {path!r} is not allowed: {where!r} is already logged as {kind} in this run, and on disk "
        f"{where!r} cannot be both a file and a folder (log it under another name)"
    )


try:
    _PATH_MAX = os.pathconf("/", "PC_PATH_MAX")
except (OSError, ValueError, AttributeError):  # pragma: no cover - no pathconf (Windows)
    _PATH_MAX = 260


def check_fits(paths: Iterable[str], bases: Sequence[Path]) -> None:
    """Refuse artifact paths that, below one of ``bases``, would be longer than the OS allows.

    Raises:
        InvalidValueError: a path is too long for the run's artifact directory.
    """
    for base in bases:
        room = _PATH_MAX - 2 - len(os.fsencode(base))  # a '/' and the terminating NUL
        for path in paths:
            if len(os.fsencode(path)) > room:
                raise InvalidValueError(
                    f"artifact '{path[:40]}...' is not allowed: below {base} the path would be longer than "
                    f"the {_PATH_MAX} bytes the OS allows (shorten the artifact path)"
                )


_INDEXES: weakref.WeakKeyDictionary[object, ArtifactIndex] = weakref.WeakKeyDictionary()
_INDEXES_LOCK = threading.Lock()


def index_of(run: object) -> ArtifactIndex:
    """The artifact paths ``run`` has logged (made on first use, dropped with the run)."""
    with _INDEXES_LOCK:
        index = _INDEXES.get(run)
        if index is None:
            index = _INDEXES[run] = ArtifactIndex()
        return index


def snapshot(
    source: Path,
    artifact_path: str,
    *,
    staging: Path | None,
    exclude: Sequence[Path] = (),
    index: ArtifactIndex | None = None,
    bases: Sequence[Path] = (),
) -> StagedArtifact:
    """Copy ``source`` (a file or a directory) now, and return the record of the copy.

    Args:
        source: the user's file or directory (resolved).
        artifact_path: where it goes inside the run's artifacts (checked already).
        staging: the run's staging folder in the local store, or None for a temporary directory.
        exclude: directories never copied (the tracking stores: ``log_artifact(".")`` with
            ``./mlruns`` inside copies the project without the store).
        index: the run's logged paths; the call's paths are claimed once the copy is made.
        bases: the local artifact directories the files will be written to (see :func:`check_fits`).

    Raises:
        InvalidValueError: ``source`` is a tracking store itself or not a regular file or
            directory, or a path clashes with one already logged.
        WriteError: the copy failed (reading the source or writing the snapshot).
    """
    real = Path(os.path.realpath(source))
    skip = {os.path.realpath(p) for p in exclude}
    inside_staging = False
    if staging is not None:
        staging_real = os.path.realpath(staging)
        skip.add(staging_real)
        inside_staging = (str(real) + os.sep).startswith(staging_real + os.sep)
    if str(real) in skip or inside_staging:
        raise InvalidValueError(
            f"artifact {os.fspath(source)!r} is not allowed: it is a tracking store (or steplog's staging "
            "folder), which cannot be copied into itself"
        )
    if not real.is_dir() and not real.is_file():  # a FIFO or a device (/dev/zero) would be read forever
        raise InvalidValueError(
            f"artifact {os.fspath(source)!r} is not allowed: only regular files and directories can be logged"
        )
    folder = _new_folder(staging)
    copy = folder / (real.name or "artifact")
    try:
        if real.is_dir():
            shutil.copytree(real, copy, ignore=_ignore(skip))
        else:
            shutil.copy2(real, copy)  # as MLflow does: the mode (an executable script) and times too
    except (OSError, shutil.Error) as exc:
        _discard(folder)
        raise WriteError(f"cannot copy artifact {os.fspath(source)!r} at the call: {exc}") from exc
    try:
        if copy.is_dir():
            files, dirs = _listing(copy)
            paths = [f"{artifact_path}/{f}" for f in files]
            check_fits(paths, bases)
            if index is not None:
                index.claim(paths, [artifact_path, *(f"{artifact_path}/{d}" for d in dirs)])
        else:
            check_fits([artifact_path], bases)
            if index is not None:
                index.claim([artifact_path])
    except BaseException:
        _discard(folder)
        raise
    record = StagedArtifact(artifact_path=artifact_path, source=str(copy))
    # kept at exit for the exit hook's last write; a forked child never removes its parent's snapshots
    weakref.finalize(record, _discard, folder, os.getpid()).atexit = False
    return record


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """Files and folders below ``folder`` (a snapshot: no links), relative and '/'-separated."""
    files: list[str] = []
    dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        dirs += [base + d for d in dirnames]
        files += [base + f for f in filenames]
    return files, dirs


def _ignore(skip: set[str]) -> Callable[[str, list[str]], set[str]]:
    def ignore(dirpath: str, names: list[str]) -> set[str]:
        here = os.path.realpath(dirpath)
        out: set[str] = set()
        for name in names:
            path = os.path.join(here, name)
            if path in skip or (os.path.islink(path) and os.path.realpath(path) in skip):
                out.add(name)
        return out

    return ignore


def _new_folder(staging: Path | None) -> Path:
    try:
        if staging is None:
            return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
        staging.mkdir(exist_ok=True)
        folder = staging / uuid.uuid4().hex
        folder.mkdir()
        return folder
    except OSError as exc:
        raise WriteError(f"cannot make a snapshot of the artifact in {staging}: {exc}") from exc


def _discard(folder: Path, pid: int | None = None) -> None:
    if pid is not None and pid != os.getpid():
        return
    shutil.rmtree(folder, ignore_errors=True)
    _remove_if_empty(folder.parent)


def _remove_if_empty(folder: Path) -> None:
    if folder.name == STAGING:
        try:
            folder.rmdir()
        except OSError:
            pass  # another snapshot is still waiting


# ---------------------------------------------------------------------------- the sinks' side


def is_snapshot(source: str | os.PathLike[str], staging: Path) -> bool:
    """True if ``source`` is a snapshot in ``staging`` (private to steplog: safe to hard-link)."""
    return Path(source).parent.parent == staging


def place_file(source: Path, dest: Path, temp_dir: Path, *, link: bool, fsync: bool) -> int:
    """Put a copy of ``source`` at ``dest`` through a temp name in ``temp_dir``; return the bytes.

    ``link`` hard-links instead of copying (only for a private snapshot: the store's file then
    shares its inode, which nobody else writes). A kill at any moment leaves either the old
    ``dest`` or the complete new one, never a truncated file.
    """
    tmp = temp_dir / temp_name()
    try:
        linked = False
        if link:
            try:
                os.link(source, tmp)
                linked = True
            except OSError:
                pass  # another file system, or links not supported: copy instead
        if not linked:
            shutil.copy2(source, tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        size = os.stat(tmp).st_size
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size


def place_tree(source: Path, dest: Path, temp_dir: Path, *, link: bool, fsync: bool) -> int:
    """Merge the directory ``source`` into ``dest`` file by file (each through :func:`place_file`)."""
    total = 0
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(source):
        rel = os.path.relpath(dirpath, source)
        here = dest if rel == "." else dest / rel
        for name in sorted(dirnames):
            (here / name).mkdir(exist_ok=True)
        for name in sorted(filenames):
            total += place_file(Path(dirpath) / name, here / name, temp_dir, link=link, fsync=fsync)
    return total
