"""A run's lifecycle: its states and the one parser of run statuses.

``RunState`` is the run's own state machine (``new -> running -> closing -> closed``,
or ``new -> closing`` for a run closed before its writer started); every change goes
through :meth:`RunState.check_transition`, so an impossible move is a bug caught at once.

:func:`parse_status` is the package's one reader of a status given by a user
(``"FINISHED"``, ``"failed"``, ``RunStatus.KILLED``); :func:`exit_status` says
which status a context exit implies.
"""

from __future__ import annotations

import enum

from ._errors import InvalidValueError
from ._records import RunStatus

__all__ = ["END_STATUSES", "RunState", "exit_status", "parse_status"]


class RunState(enum.Enum):
    """Where a :class:`~steplog.Run` is in its life (shown by ``repr(run)``)."""

    NEW = "new"
    """Created inside an event loop and not entered yet: log calls wait in the buffer."""
    RUNNING = "running"
    """The writer is running; everything is allowed."""
    CLOSING = "closing"
    """A close is writing what is left; barriers wait for its outcome."""
    CLOSED = "closed"
    """Ended: log calls raise RunStateError, barriers report what close could not write."""

    def check_transition(self, new: RunState) -> RunState:
        """Return ``new`` if a run may go from this state to it (else an AssertionError: a steplog bug)."""
        if new not in _ALLOWED[self]:
            raise AssertionError(f"steplog bug: a run cannot go from {self.value} to {new.value}")
        return new


_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.NEW: frozenset({RunState.RUNNING, RunState.CLOSING}),
    RunState.RUNNING: frozenset({RunState.CLOSING}),
    RunState.CLOSING: frozenset({RunState.CLOSED}),
    RunState.CLOSED: frozenset(),
}

_STATUS_NAMES = {s.name: s for s in RunStatus}
END_STATUSES = (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED)


def parse_status(status: str | RunStatus, allowed: tuple[RunStatus, ...] = tuple(RunStatus)) -> RunStatus:
    """The :class:`RunStatus` for a name (any case) or a RunStatus among ``allowed``; InvalidValueError otherwise."""
    if isinstance(status, RunStatus):
        found: RunStatus | None = status
    else:
        found = _STATUS_NAMES.get(status.upper()) if isinstance(status, str) else None
    if found is not None and found in allowed:
        return found
    names = ", ".join(s.name for s in allowed)
    raise InvalidValueError(f"status {status!r} is not allowed: use one of {names}")


def exit_status(
    exc_type: type[BaseException] | None, exc: BaseException | None = None, *, signalled: bool = False
) -> RunStatus:
    """The status a run gets when its context exits with ``exc`` (None: a normal exit)."""
    if signalled:
        return RunStatus.KILLED  # a handled SIGTERM/SIGINT ended the run, however the code unwound
    if exc_type is None:
        return RunStatus.FINISHED
    if issubclass(exc_type, SystemExit):
        code = getattr(exc, "code", None)
        return RunStatus.FINISHED if code is None or code == 0 else RunStatus.FAILED
    if issubclass(exc_type, Exception):
        return RunStatus.FAILED
    # KeyboardInterrupt, and cancellation (asyncio.CancelledError, trio.Cancelled): stopped from outside
    return RunStatus.KILLED
