"""``steplog fsck [--repair] [STORE]``: find (and safely repair) what breaks MLflow's reader in an mlruns store.

Works on any MLflow file store, steplog's or MLflow's own. What it looks for
(MLFLOW_FORMAT.md §1.5, §1.7, §1.13, §4):

* torn tails: a metric file whose last line has no newline (a write cut by a crash);
  MLflow reads it as a wrong point or fails for the whole experiment. Repair: cut the
  file back to its last newline.
* unreadable lines: lines MLflow's reader rejects (wrong field count, non-numbers, float
  steps). They break ``get_run`` and ``search_runs``. Repair: drop them.
* duplicate points: the same ``timestamp value step`` line twice in one file, which makes
  ``mlflow migrate-filestore`` fail. Repair: keep the first.
* empty metric files: ``get_run`` fails on them. Repair: delete (they hold no data).
* broken meta files: an experiment or run ``meta.yaml`` that is missing, unparseable or
  lacks what the reader requires. Repair only what is certain: a run's ``run_id`` and
  ``experiment_id`` (from its folders), a missing ``end_time`` (null), a status written
  as a name (its integer), a missing ``artifact_uri``, missing ``metrics/ params/
  artifacts/`` folders. Anything else is reported, not guessed.
* stray steplog temp files (``.steplog-tmp*``) left by a crash between write and rename, and
  leftovers of an interrupted artifact copy inside a run (a ``.steplog-tmp*`` file or folder
  under ``artifacts/``, or a ``.steplog-staging`` folder): partial data MLflow would list as
  artifacts. Repair: delete those older than a minute (a younger one may belong to a live run).

Repair rewrites files atomically (temp file, then rename), so run it when no process
is writing to the store. The exit status is 0 when no problem remains, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._layout import (
    META,
    RESERVED_EXPERIMENT_FOLDERS,
    RESERVED_ROOT_FOLDERS,
    TMP_PREFIX,
    dump_meta,
    file_uri,
    iter_files,
    parse_meta,
    uri_to_path,
    write_atomic,
)
from .._records import RunStatus

__all__ = ["Finding", "check_store", "register"]

_TMP_GRACE_SECONDS = 60.0
_STATUS_CODES = {s.name: int(s) for s in RunStatus}
_STATUS_CHOICES = ", ".join(f"{code} ({name})" for name, code in _STATUS_CODES.items())
_STAGING_DIR = ".steplog-staging"
"""A folder of this name inside a run holds artifact copies not yet moved to their final names."""
_TMP_STEM = TMP_PREFIX.rstrip("-")
"""Any file or folder inside a run whose name starts with this is an interrupted write's leftover."""
_EXPERIMENT_REQUIRED = ("experiment_id", "name", "artifact_location", "lifecycle_stage")
_RUN_REQUIRED = ("run_id", "experiment_id", "user_id", "start_time")


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a store, and what ``--repair`` did about it."""

    path: Path
    problem: str
    repaired: str | None = None
    """What the repair changed (None: not repaired, the problem remains)."""


def check_store(root: Path, *, repair: bool = False, now: float | None = None) -> list[Finding]:
    """Check every experiment and run of the store at ``root``; repair what is safe when ``repair``."""
    now = time.time() if now is None else now
    findings: list[Finding] = []
    for base in (root, root / ".trash"):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and entry.name not in RESERVED_ROOT_FOLDERS:
                findings += _check_experiment(entry, repair=repair, now=now)
    return findings


def _check_experiment(folder: Path, *, repair: bool, now: float) -> list[Finding]:
    findings: list[Finding] = []
    meta_path = folder / META
    meta, problem = _read_meta(meta_path)
    if problem is None:
        missing = [k for k in _EXPERIMENT_REQUIRED if meta.get(k) in (None, "")]
        if missing:
            problem = f"experiment meta.yaml lacks {', '.join(missing)}: MLflow cannot list any experiment"
        elif str(meta["experiment_id"]) != folder.name:
            problem = (
                f"experiment meta.yaml says experiment_id {meta['experiment_id']!r} but the folder is "
                f"{folder.name!r}: MLflow ignores the experiment"
            )
    if problem is not None:
        if not (meta_path.exists() or any(folder.glob(f"*/{META}"))):
            return []  # not an experiment at all (some other folder in the store root)
        findings.append(Finding(meta_path, problem))
    artifact_location = str(meta.get("artifact_location") or file_uri(folder)) if problem is None else file_uri(folder)
    findings += _stray_temp_files(folder, repair=repair, now=now, recursive=False)
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name not in RESERVED_EXPERIMENT_FOLDERS:
            findings += _check_run(entry, artifact_location, repair=repair, now=now)
    return findings


def _check_run(run_dir: Path, artifact_location: str, *, repair: bool, now: float) -> list[Finding]:
    findings: list[Finding] = []
    meta_path = run_dir / META
    if not meta_path.exists() and not any((run_dir / name).is_dir() for name in ("metrics", "params", "tags")):
        return []  # not a run folder
    if not meta_path.exists() and _holds_nothing(run_dir):
        return [_empty_run_folder(run_dir, repair=repair)]
    findings += _check_run_meta(run_dir, artifact_location, repair=repair)
    findings += _dead_writer(run_dir, repair=repair)
    findings += _leftovers(run_dir, repair=repair, now=now)
    metrics = run_dir / "metrics"
    if metrics.is_dir():
        for _key, path in sorted(iter_files(metrics)):
            if path.name.startswith(TMP_PREFIX):
                continue  # reported with the stray temp files
            findings += _check_metric_file(path, run_dir, repair=repair)
    return findings


def _holds_nothing(folder: Path) -> bool:
    """True if ``folder`` holds only empty folders: no file and no symlink anywhere below it."""
    for _dirpath, dirnames, filenames in os.walk(folder):
        if filenames or any(os.path.islink(os.path.join(_dirpath, name)) for name in dirnames):
            return False
    return True


def _empty_run_folder(run_dir: Path, *, repair: bool) -> Finding:
    """A run folder a start killed before its meta.yaml left: empty folders only, which MLflow skips."""
    repaired = None
    if repair:
        for dirpath, _dirnames, _filenames in sorted(os.walk(run_dir), key=lambda walked: -len(walked[0])):
            os.rmdir(dirpath)  # empty by the check above; rmdir refuses anything else
        repaired = "removed"
    return Finding(
        run_dir,
        "empty run folder without meta.yaml, left by a run start that was killed before it wrote its meta.yaml "
        "(MLflow skips it; nothing was logged to it); --repair removes it",
        repaired,
    )


def _check_run_meta(run_dir: Path, artifact_location: str, *, repair: bool) -> list[Finding]:
    meta_path = run_dir / META
    meta, problem = _read_meta(meta_path)
    if problem is not None:
        return [Finding(meta_path, f"run {problem}: MLflow cannot read this run (and search fails for its experiment)")]
    findings: list[Finding] = []
    fixes: dict[str, Any] = {}
    notes: list[str] = []
    missing = [k for k in _RUN_REQUIRED if meta.get(k) in (None, "") and k not in ("run_id", "experiment_id")]
    if missing:
        findings.append(Finding(meta_path, f"run meta.yaml lacks {', '.join(missing)}: MLflow cannot read this run"))
    if str(meta.get("run_id")) != run_dir.name:
        fixes["run_id"] = run_dir.name
        notes.append(f"run_id {meta.get('run_id')!r} -> {run_dir.name!r}")
    if str(meta.get("experiment_id")) != run_dir.parent.name:
        fixes["experiment_id"] = run_dir.parent.name
        notes.append(f"experiment_id {meta.get('experiment_id')!r} -> {run_dir.parent.name!r}")
    if "end_time" not in meta:
        fixes["end_time"] = None
        notes.append("end_time missing -> null")
    status = meta.get("status")
    if isinstance(status, str) and status.strip().upper() in _STATUS_CODES:
        fixes["status"] = _STATUS_CODES[status.strip().upper()]
        notes.append(f"status {status!r} -> {fixes['status']}")
    elif "status" in meta and not (type(status) is int and status in _STATUS_CODES.values()):
        findings.append(
            Finding(
                meta_path,
                f"run status {status!r} is not one of MLflow's statuses, so MLflow cannot read this run and "
                f"fsck cannot tell which it was: edit {meta_path} and set `status:` to {_STATUS_CHOICES} "
                "(3 if the run completed, 4 if it failed, 5 if it was stopped), then run fsck again",
            )
        )
    if meta.get("lifecycle_stage") not in (None, "active", "deleted"):
        findings.append(
            Finding(
                meta_path,
                f"run lifecycle_stage {meta.get('lifecycle_stage')!r} breaks search_runs: edit {meta_path} and set "
                "`lifecycle_stage:` to active (or deleted, to hide the run)",
            )
        )
    if not meta.get("artifact_uri"):
        fixes["artifact_uri"] = f"{artifact_location.rstrip('/')}/{run_dir.name}/artifacts"
        notes.append("artifact_uri missing -> set")
    if fixes:
        problem = "run meta.yaml does not match what MLflow requires: " + "; ".join(notes)
        repaired = None
        if repair:
            write_atomic(meta_path, dump_meta({**meta, **fixes}).encode())
            repaired = "rewrote meta.yaml: " + "; ".join(notes)
        findings.append(Finding(meta_path, problem, repaired))
    for name in ("metrics", "params", "artifacts"):
        folder = run_dir / name
        if not folder.is_dir():
            repaired = None
            if repair:
                folder.mkdir()
                repaired = f"created {name}/"
            findings.append(Finding(folder, f"{name}/ is missing: MLflow says the run does not exist", repaired))
    return findings


def _check_metric_file(path: Path, run_dir: Path, *, repair: bool) -> list[Finding]:
    data = path.read_bytes()
    if not data:
        repaired = None
        if repair:
            path.unlink()
            repaired = "deleted the empty file"
        return [Finding(path, "empty metric file: MLflow's get_run and search fail on it", repaired)]
    findings: list[Finding] = []
    body = data
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        torn = data[cut:]
        body = data[:cut]
        repaired = None
        if repair:
            _truncate(path, cut)
            repaired = f"cut {len(torn)} bytes back to the last whole line"
        findings.append(Finding(path, f"torn last line {torn[:40]!r} (no newline)", repaired))
    lines = body.split(b"\n")[:-1]
    keep: list[bytes] = []
    seen: set[bytes] = set()
    bad: list[int] = []
    duplicates = 0
    for number, padded in enumerate(lines, start=1):
        line = padded.strip()  # the sink pads lines to page boundaries; MLflow strips them too
        if not _readable(line):
            bad.append(number)
            continue
        if line in seen:
            duplicates += 1
            continue
        seen.add(line)
        keep.append(line)
    if bad or duplicates:
        problems = []
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            problems.append(f"{len(bad)} unreadable lines (line {shown}): MLflow fails on this run and its experiment")
        if duplicates:
            problems.append(f"{duplicates} duplicate points: mlflow migrate-filestore fails on them")
        repaired = None
        if repair:
            if keep:
                write_atomic(path, b"".join(line + b"\n" for line in keep), temp_dir=run_dir)
                dropped = f"{len(bad)} unreadable and {duplicates} duplicates dropped"
                repaired = f"rewrote the file with {len(keep)} lines ({dropped})"
            else:
                path.unlink()
                repaired = "deleted the file (no readable line)"
        findings.append(Finding(path, "; ".join(problems), repaired))
    return findings


def _readable(line: bytes) -> bool:
    """True if MLflow's reader accepts the line (2, 3 or 5 space-separated fields; int ts and step, float value)."""
    fields = line.strip().split(b" ")
    if len(fields) not in (2, 3, 5) or b"" in fields:
        return False
    try:
        int(fields[0])
        float(fields[1])
        if len(fields) > 2:
            int(fields[2])
    except ValueError:
        return False
    return True


def _stray_temp_files(folder: Path, *, repair: bool, now: float, recursive: bool) -> Iterator[Finding]:
    pattern = f"**/{TMP_PREFIX}*" if recursive else f"{TMP_PREFIX}*"
    for path in sorted(folder.glob(pattern)):
        if not path.is_file():
            continue
        age = now - path.stat().st_mtime
        repaired = None
        if repair and age >= _TMP_GRACE_SECONDS:
            path.unlink()
            repaired = "deleted"
        note = "" if age >= _TMP_GRACE_SECONDS else f" ({age:.0f} s old: may belong to a live run, left alone)"
        yield Finding(path, f"stray steplog temp file left by an interrupted write{note}", repaired)


def _leftovers(run_dir: Path, *, repair: bool, now: float) -> Iterator[Finding]:
    """Temp files and staging folders an interrupted write or artifact copy left inside a run.

    A leftover under ``artifacts/`` (or a staging folder) is a partial artifact copy: the run's
    artifact is missing or stale, and MLflow would list the temp file as an artifact. Those younger
    than a minute may belong to a live run and are left alone.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for name in list(dirnames):
            if name == _STAGING_DIR or name.startswith(_TMP_STEM):
                found.append(Path(dirpath, name))
                dirnames.remove(name)  # reported whole; nothing below it is walked
        found.extend(Path(dirpath, name) for name in filenames if name.startswith(_TMP_STEM))
    artifacts = run_dir / "artifacts"
    for path in sorted(found):
        age = now - _newest_mtime(path)
        young = age < _TMP_GRACE_SECONDS
        is_dir = path.is_dir() and not path.is_symlink()
        if is_dir or path.is_relative_to(artifacts):
            what = (
                f"leftover {'staging folder' if is_dir else 'temp file'} of an interrupted artifact copy (partial data)"
            )
            todo = "; --repair removes it, then log the artifact again if the run lacks it"
        else:
            what, todo = "stray steplog temp file left by an interrupted write", ""
        note = f" ({age:.0f} s old: may belong to a live run, left alone)" if young else todo
        repaired = None
        if repair and not young:
            if is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()  # a symlink is removed itself, never what it points to
            repaired = "deleted"
        yield Finding(path, f"{what}{note}", repaired)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of a file, or of a folder and everything in it."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for dirpath, _dirnames, filenames in os.walk(path):
            for name in filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except OSError:
                    continue
    return newest


def _read_meta(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, "meta.yaml is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"meta.yaml cannot be read ({exc})"
    if not text.strip():
        return {}, "meta.yaml is empty"
    try:
        meta = parse_meta(text)
    except Exception as exc:  # any parse failure (PyYAML's included) is the finding itself
        return {}, f"meta.yaml cannot be parsed ({exc})"
    if not isinstance(meta, dict) or not meta:
        return {}, "meta.yaml is not a mapping"
    return meta, None


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# ---------------------------------------------------------------------------- the command


def register(subparsers: Any) -> None:
    """Add ``steplog fsck`` to the command line."""
    parser = subparsers.add_parser(
        "fsck",
        help="check an mlruns store for what breaks MLflow's reader (and --repair it)",
        description="Find torn metric lines, unreadable lines, duplicate points, empty metric files, broken "
        "meta.yaml files, stray steplog temp files, interrupted artifact copies (.steplog-tmp* files, "
        ".steplog-staging folders) and RUNNING runs whose writer died, in an MLflow file store (steplog's "
        "or MLflow's own). "
        "With --repair, fix what is safe and say what changed; run it when nothing writes to the store. "
        "Exit status: 0 when no problem remains, 1 otherwise.",
    )
    parser.add_argument(
        "store",
        nargs="?",
        default=None,
        help="the store (default: STEPLOG_TRACKING_URI, MLFLOW_TRACKING_URI, ./mlruns)",
    )
    parser.add_argument("--repair", action="store_true", help="repair what can be repaired safely")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .._run import resolve_tracking_uri
    from . import CommandError

    uri = resolve_tracking_uri(args.store)
    if uri.lower().startswith(("http://", "https://")):
        raise CommandError(f"{uri} is a tracking server: fsck checks a local mlruns directory", status=2)
    root = uri_to_path(uri)
    if not root.is_dir():
        raise CommandError(f"no store at {root}: give the path of an mlruns directory", status=2)
    findings = check_store(root, repair=args.repair)
    for finding in findings:
        if finding.repaired is not None:
            print(f"repaired {finding.path}: {finding.problem} -> {finding.repaired}")
        else:
            print(f"problem  {finding.path}: {finding.problem}")
    remaining = sum(f.repaired is None for f in findings)
    repaired = len(findings) - remaining
    if not findings:
        print(f"{root}: no problems found")
    else:
        hint = "" if args.repair or not remaining else " (steplog fsck --repair fixes what is safe)"
        print(f"{root}: {len(findings)} problems, {repaired} repaired, {remaining} remaining{hint}")
    return 1 if remaining else 0


def _dead_writer(run_dir: Path, *, repair: bool) -> Iterator[Finding]:
    """A RUNNING run whose writer died without closing (its heartbeat says so): ended KILLED by --repair."""
    from .._heartbeat import FILE, describe_death, last_write_ms, liveness

    if liveness(run_dir) is not False:
        return
    meta_path = run_dir / META
    repaired = None
    if repair:
        end = last_write_ms(run_dir)
        meta = parse_meta(meta_path.read_text(encoding="utf-8"))
        meta["status"] = int(RunStatus.KILLED)
        meta["end_time"] = end
        write_atomic(meta_path, dump_meta(meta).encode())
        (run_dir / FILE).unlink(missing_ok=True)
        repaired = f"ended the run KILLED at its last write ({end} ms)"
    yield Finding(meta_path, f"the run is RUNNING but its writer is dead ({describe_death(run_dir)})", repaired)
