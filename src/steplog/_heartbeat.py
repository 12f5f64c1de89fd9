"""Telling a dead writer from a live one: a heartbeat file the writer's side refreshes.

While a run writes to a local store, a small thread (never the hot path) rewrites
``<run>/.steplog-heartbeat`` every :data:`INTERVAL` seconds with the host, the process id, the
process's start time and the current time. MLflow's reader ignores the file (it reads only
``meta.yaml`` and the ``metrics``/``params``/``tags``/``artifacts`` folders).

Readers call :func:`liveness`: a RUNNING run whose heartbeat comes from a process of this host
that no longer exists is dead at once; one whose heartbeat is older than :data:`STALE_AFTER`
seconds is dead wherever it ran. A run without a heartbeat file (written by MLflow, or by an
older steplog) is neither (None). :func:`last_write_ms` is the time ``steplog fsck --repair``
gives a dead run as its end.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from ._layout import META, write_atomic

__all__ = [
    "FILE",
    "INTERVAL",
    "STALE_AFTER",
    "Heartbeat",
    "describe_death",
    "is_dead",
    "last_write_ms",
    "liveness",
    "read_heartbeat",
    "status_word",
]

FILE = ".steplog-heartbeat"
INTERVAL = 2.0
"""Seconds between two heartbeats."""
STALE_AFTER = 30.0
"""A heartbeat older than this means the writer is gone (for a writer on another host)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[-1].split()[19].decode()


def _machine() -> str | None:
    """This boot of this kernel and this process's pid namespace: where a pid means the same process.

    Two containers may share a host name; a pid is only looked up where both agree.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"


class Heartbeat:
    """Refreshes a run folder's heartbeat file on a daemon thread until :meth:`stop`."""

    def __init__(self, run_dir: Path, interval: float = INTERVAL) -> None:
        self._path = run_dir / FILE
        self._run_dir = run_dir
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._fields = {
            "host": socket.gethostname(),
            "pid": self._pid,
            "pid_start": _process_start(self._pid),
            "machine": _machine(),
        }

    def start(self) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="steplog-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        data = json.dumps({**self._fields, "time_ms": time.time_ns() // 1_000_000}).encode()
        try:
            write_atomic(self._path, data, temp_dir=self._run_dir)
        except OSError:
            pass  # a full or vanished disk: the metric writes report it; readers see the heartbeat age

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if os.getpid() != self._pid:
                return
            self._beat()

    def stop(self) -> None:
        """Stop beating and remove the file (the run's meta now says how it ended)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        try:
            self._path.unlink()
        except OSError:
            pass


def read_heartbeat(run_dir: Path) -> dict[str, object] | None:
    """The run's last heartbeat (host, pid, pid_start, time_ms), or None when it has none."""
    try:
        data = json.loads((run_dir / FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("time_ms"), int) else None


def liveness(run_dir: Path, *, now_ms: int | None = None, stale_after: float = STALE_AFTER) -> bool | None:
    """True if a RUNNING run's writer is alive, False if it is dead, None when this cannot be told.

    Only a run whose ``meta.yaml`` says RUNNING and which has a heartbeat file is judged.
    """
    from ._layout import parse_meta

    try:
        meta = parse_meta((run_dir / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if meta.get("status") not in (1, "1", "RUNNING") or meta.get("end_time") is not None:
        return None
    beat = read_heartbeat(run_dir)
    if beat is None:
        return None
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    machine = beat.get("machine")
    same_place = beat.get("host") == socket.gethostname() and machine is not None and machine == _machine()
    if same_place and isinstance(beat.get("pid"), int):
        pid = int(beat["pid"])  # type: ignore[call-overload]
        started = _process_start(pid)
        if started is None or (beat.get("pid_start") is not None and started != beat.get("pid_start")):
            return False  # that process is gone (or its pid now belongs to another process)
        if pid == os.getpid():
            return True
    age_ms = now - int(beat["time_ms"])  # type: ignore[call-overload]
    return bool(age_ms <= stale_after * 1000)


def last_write_ms(run_dir: Path) -> int:
    """The time of a run's last write: its last heartbeat, or the newest file under it."""
    newest = 0.0
    for dirpath, _dirs, files in os.walk(run_dir):
        for name in files:
            if name == FILE:
                continue
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    beat = read_heartbeat(run_dir)
    beat_ms = int(beat["time_ms"]) if beat is not None else 0  # type: ignore[call-overload]
    return max(beat_ms, int(newest * 1000))


def is_dead(run: object) -> bool:
    """True for a reader's run (``RunData``) that is RUNNING while its writer is gone."""
    path = getattr(run, "path", None)
    return isinstance(path, Path) and liveness(path) is False


def status_word(run: object) -> str:
    """A run's status for the command line: ``RUNNING (dead)`` for a writer that died without closing."""
    name = str(getattr(getattr(run, "status", None), "name", "?"))
    return f"{name} (dead)" if is_dead(run) else name


def describe_death(run_dir: Path) -> str:
    """Why the run's writer is judged dead, in words (host, pid, heartbeat age)."""
    beat = read_heartbeat(run_dir)
    if beat is None:
        return "no heartbeat"
    age = (time.time_ns() // 1_000_000 - int(beat["time_ms"])) / 1000  # type: ignore[call-overload]
    return f"process {beat.get('pid')} on {beat.get('host')} gone; last heartbeat {age:.0f} s ago"
