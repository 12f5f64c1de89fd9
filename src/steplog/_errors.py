"""The exception tree of steplog.

Every error steplog raises on purpose derives from :class:`StepLogError`::

    StepLogError
    ├── InvalidKeyError       (also ValueError)              a metric/param/tag key breaks MLflow's rules
    ├── InvalidValueError     (also ValueError, TypeError)   a value, step or timestamp steplog cannot store
    │   └── ParamChangedError                                a param logged again with a different value
    ├── BufferFullError                                      the buffer is full and ``on_full="raise"``
    ├── RunStateError         (also RuntimeError)            a call that the run's state does not allow
    ├── FlushTimeoutError     (also TimeoutError)            a barrier or close ran out of time
    ├── WriteError            (also OSError)                 a background write failed (file and cause named)
    └── ServerError                                          an MLflow tracking server refused a request

Third-party exceptions are translated into this tree where they cross into
steplog's public surface, with the original kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BufferFullError",
    "FlushTimeoutError",
    "InvalidKeyError",
    "InvalidValueError",
    "ParamChangedError",
    "RunStateError",
    "ServerError",
    "StepLogError",
    "WriteError",
]


class StepLogError(Exception):
    """Raised for every error that steplog reports on purpose (the root of the tree)."""


class InvalidKeyError(StepLogError, ValueError):
    """Raised when a metric, param or tag key (or an experiment name) breaks MLflow's naming rules."""


class InvalidValueError(StepLogError, ValueError, TypeError):
    """Raised when a value, step or timestamp is not something steplog can store exactly."""


class ParamChangedError(InvalidValueError):
    """Raised when a param that is already logged is logged again with a different value."""


class BufferFullError(StepLogError):
    """Raised by a log call when the buffer holds ``max_buffer`` records and ``on_full="raise"``."""


class RunStateError(StepLogError, RuntimeError):
    """Raised when a call is not allowed in the run's current state (e.g. logging after close)."""


class FlushTimeoutError(StepLogError, TimeoutError):
    """Raised when ``flush(timeout=...)`` or ``close(timeout=...)`` runs out of time; says what is unwritten."""


class WriteError(StepLogError, OSError):
    """Raised at a barrier or at close when the background writer could not write; names the file and cause."""

    def __str__(self) -> str:
        # the message names the file and the OS error; OSError's "[Errno n] None: file" form would hide it
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ServerError(StepLogError):
    """Raised when an MLflow tracking server refuses a request for good (names its error_code and message)."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
