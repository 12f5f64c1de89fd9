"""Process exit: the atexit hook, the excepthook, and SIGTERM/SIGINT handling.

* atexit closes every run the user did not close, with FAILED after an uncaught
  exception, KILLED after a KeyboardInterrupt or a handled signal, else FINISHED.
  Each close is bounded by the run's ``close_timeout``, even with a stuck sink.
* SIGTERM (what schedulers send): pending data is written first. If the previous
  handler was the default action, open runs are then closed as KILLED with an end
  time and the signal is delivered again with the default action, so the process
  ends exactly as it would have without steplog (same exit status, ``-15``). If the
  user installed a handler before steplog, it runs next, with the runs still open:
  a handler that raises (``sys.exit``) closes them through ``with``/atexit as KILLED,
  and a handler that only sets a flag for a graceful stop lets the loop keep logging.
* SIGINT: the previous handler runs (by default it raises KeyboardInterrupt, so a
  ``with`` block or the atexit hook closes the run as KILLED, and code that catches
  KeyboardInterrupt to finish gracefully can keep logging).
* A signal set to SIG_IGN before steplog stays ignored: steplog installs nothing
  for it, so the process goes on exactly as it would have.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any, Protocol

from ._records import RunStatus

__all__ = ["ExitTarget", "install_signal_handlers", "register", "signalled", "unregister"]


class ExitTarget(Protocol):
    """What exit and signal handling need of an open run (a run hands one over when it starts)."""

    @property
    def pid(self) -> int:
        """The process that started the run (a forked child never closes its parent's run)."""
        ...

    @property
    def closed(self) -> bool: ...

    def mark_signalled(self) -> None:
        """However the run's code unwinds from here, the run ends KILLED."""
        ...

    def emergency_close(self, status: RunStatus) -> None:
        """Write what is pending and record ``status``: bounded, never raises."""
        ...

    def emergency_flush(self, timeout: float) -> None:
        """Write what is pending within ``timeout`` seconds, leaving the run open."""
        ...


# strong references: a run the user dropped without closing must still be closed (and written) at exit
_runs: set[ExitTarget] = set()
_lock = threading.Lock()
_exit_status: RunStatus | None = None
_signalled = False
_installed_hooks = False
_previous_handlers: dict[int, Any] = {}
_HANDLED = (signal.SIGTERM, signal.SIGINT)
_SIGNAL_FLUSH_TIMEOUT = 10.0
"""The most seconds a SIGTERM handler spends writing a run's pending data before chaining."""


def register(run: ExitTarget) -> None:
    """Track an open run so that exit and signals close it."""
    global _installed_hooks
    with _lock:
        _runs.add(run)
        if not _installed_hooks:
            atexit.register(_close_all_at_exit)
            _wrap_excepthook()
            _installed_hooks = True


def unregister(run: ExitTarget) -> None:
    """Stop tracking a run (it is closed)."""
    with _lock:
        _runs.discard(run)


def signalled() -> bool:
    """True once steplog handled SIGTERM or SIGINT in this process (runs then end as KILLED)."""
    return _signalled


def _open_runs() -> list[ExitTarget]:
    pid = os.getpid()
    return [run for run in list(_runs) if run.pid == pid and not run.closed]


def _close_all_at_exit() -> None:
    status = _exit_status or RunStatus.FINISHED
    for run in _open_runs():
        run.emergency_close(status)


def _wrap_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        global _exit_status
        if _exit_status is None:  # a handled signal already decided KILLED
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
        if current == signal.SIG_IGN:  # the process chose to ignore it: so does steplog
            continue
        _previous_handlers[signum] = current
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> Any:
    global _exit_status, _signalled
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    _exit_status = RunStatus.KILLED
    _signalled = True
    for run in _open_runs():
        run.mark_signalled()  # however its code unwinds now, the run ends KILLED
    if previous == signal.SIG_DFL:
        # the process is about to end: write what is pending, record KILLED, then die as before
        for run in _open_runs():
            run.emergency_close(RunStatus.KILLED)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return None
    if signum == signal.SIGTERM:
        # the user's handler decides what happens next; whatever it does, pending data is on disk first
        for run in _open_runs():
            run.emergency_flush(_SIGNAL_FLUSH_TIMEOUT)
    if callable(previous):
        loop = _asyncio_loop_here()
        if loop is not None:
            # Raised from here, the handler's exception (sys.exit, say) would surface in whatever
            # bytecode the loop was running, anyio's cancel-scope bookkeeping included, and
            # corrupt it; from a loop callback asyncio unwinds it cleanly, one iteration later.
            loop.call_soon_threadsafe(previous, signum, frame)
            return None
        return previous(signum, frame)
    return None


def _asyncio_loop_here() -> Any:
    """The asyncio event loop running on this thread, if any (a signal handler runs on the main thread)."""
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
