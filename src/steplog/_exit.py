"""Process exit: the atexit hook, the excepthook, and SIGTERM/SIGINT handling.

* atexit closes every run the user did not close, with FAILED after an uncaught
  exception, KILLED after a KeyboardInterrupt or a handled signal, else FINISHED.
  Each close is bounded by the run's ``close_timeout``.
* SIGTERM (what schedulers send): pending data is written, open runs are marked
  KILLED with an end time, then the previous handler runs; if that was the
  default, the default action is taken again, so the process ends exactly as it
  would have without steplog (same exit status).
* SIGINT: the previous handler runs (by default it raises KeyboardInterrupt, so a
  ``with`` block or the atexit hook closes the run as KILLED, and code that catches
  KeyboardInterrupt to finish gracefully can keep logging).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from ._records import RunStatus

if TYPE_CHECKING:
    from ._run import Run

__all__ = ["install_signal_handlers", "register", "unregister"]

_runs: weakref.WeakSet[Run] = weakref.WeakSet()
_lock = threading.Lock()
_exit_status: RunStatus | None = None
_installed_hooks = False
_previous_handlers: dict[int, Any] = {}
_HANDLED = (signal.SIGTERM, signal.SIGINT)


def register(run: Run) -> None:
    """Track an open run so that exit and signals close it."""
    global _installed_hooks
    with _lock:
        _runs.add(run)
        if not _installed_hooks:
            atexit.register(_close_all_at_exit)
            _wrap_excepthook()
            _installed_hooks = True


def unregister(run: Run) -> None:
    with _lock:
        _runs.discard(run)


def _open_runs() -> list[Run]:
    pid = os.getpid()
    return [run for run in list(_runs) if run._pid == pid and not run.closed]


def _close_all_at_exit() -> None:
    status = _exit_status or RunStatus.FINISHED
    for run in _open_runs():
        run._emergency_close(status)


def _wrap_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        global _exit_status
        _exit_status = RunStatus.KILLED if issubclass(exc_type, KeyboardInterrupt) else RunStatus.FAILED
        previous(exc_type, exc, tb)

    sys.excepthook = excepthook


def install_signal_handlers(*, explicit: bool = False) -> None:
    """Install the SIGTERM/SIGINT handlers once (main thread only; elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        if explicit:
            import warnings

            warnings.warn(
                "steplog: handle_signals=True has no effect outside the main thread",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    for signum in _HANDLED:
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
        if current is None:  # installed from C: leave it alone
            continue
        _previous_handlers[signum] = current
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> Any:
    global _exit_status
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    _exit_status = RunStatus.KILLED
    if signum == signal.SIGTERM or previous == signal.SIG_DFL:
        for run in _open_runs():
            run._emergency_close(RunStatus.KILLED)
    if callable(previous):
        return previous(signum, frame)
    if previous == signal.SIG_IGN:
        return None
    # the default action: restore it and deliver the signal again, so the exit status is unchanged
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None
