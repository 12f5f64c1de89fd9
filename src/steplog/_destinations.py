"""Where a run writes: its options, the tracking URI it resolves to, and the sinks for it.

``start_run`` calls :func:`make_sinks` once; nothing here runs after the run started.
Every tracking URI quoted in a message goes through :func:`redact_uri` first, so a
password in a URL never reaches a log, a traceback or ``repr(run)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Literal

from ._buffer import OnFull
from ._errors import InvalidValueError, StepLogError
from .typing import Sink

__all__ = ["Destinations", "Durability", "Options", "make_sink", "make_sinks", "redact_uri", "resolve_tracking_uri"]

Durability = Literal["os", "fsync"]

_ENV_VARS = ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")
_SUPPORTED = (
    "use a directory path, a file: URI, http(s)://host:port (an MLflow tracking server), "
    "or sqlite:///path.db (MLflow's database)"
)
# words MLflow reads as a destination, not as a folder name (mlflow.utils.uri and its tracking registry)
_MLFLOW_WORDS = frozenset({"databricks", "databricks-uc", "uc"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")  # RFC 3986; one letter is a Windows drive, not a scheme


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """A run's options (keyword arguments of :func:`steplog.start_run`), checked once."""

    flush_interval: float = 0.05
    max_buffer: int = 1_000_000
    on_full: OnFull = "block"
    durability: Durability = "os"
    handle_signals: bool | None = None
    close_timeout: float = 30.0
    start_timeout: float = 10.0
    """Seconds to reach a tracking server when the run starts (then a StepLogError)."""
    journal_dir: str | None = None
    """Where a tracking server's outage journal goes (default STEPLOG_JOURNAL_DIR or ./steplog-journal)."""
    run_id: str | None = None
    """Resume this run (default: STEPLOG_RUN_ID, then MLFLOW_RUN_ID); ``""`` starts a new run whatever they say."""
    rewind_to_step: int | None = None
    """With ``run_id``: remove every point with a step above this before logging resumes (local stores)."""
    parent_run_id: str | None = None
    """Make the run a child of this run (tag ``mlflow.parentRunId``)."""
    ranks: Literal["zero", "each", "off"] | None = None
    """Under a launcher with more than one process: ``"zero"`` (default), ``"each"`` or ``"off"``."""
    system_metrics: bool | None = None
    """Sample CPU, memory, disk, network and GPUs (default: STEPLOG_SYSTEM_METRICS, then
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING)."""
    system_metrics_interval: float = 10.0
    """Seconds between two system-metric samples."""

    def __post_init__(self) -> None:
        if not (isinstance(self.flush_interval, (int, float)) and self.flush_interval > 0):
            raise InvalidValueError(f"flush_interval must be a positive number of seconds, not {self.flush_interval!r}")
        if not (isinstance(self.max_buffer, int) and self.max_buffer > 0):
            raise InvalidValueError(f"max_buffer must be a positive int, not {self.max_buffer!r}")
        if self.on_full not in ("block", "drop", "raise"):
            raise InvalidValueError(f"on_full must be 'block', 'drop' or 'raise', not {self.on_full!r}")
        if self.durability not in ("os", "fsync"):
            raise InvalidValueError(f"durability must be 'os' or 'fsync', not {self.durability!r}")
        if not (isinstance(self.close_timeout, (int, float)) and self.close_timeout > 0):
            raise InvalidValueError(f"close_timeout must be a positive number of seconds, not {self.close_timeout!r}")
        if not (isinstance(self.start_timeout, (int, float)) and self.start_timeout > 0):
            raise InvalidValueError(f"start_timeout must be a positive number of seconds, not {self.start_timeout!r}")
        if not any(self.handle_signals is choice for choice in (None, True, False)):  # "no" is truthy
            raise InvalidValueError(
                f"handle_signals must be True, False or None (the default: in the main thread), "
                f"not {self.handle_signals!r}"
            )
        self._check_long_jobs()

    def _check_long_jobs(self) -> None:
        from ._resume import check_run_id
        from ._validation import INT64_MAX

        if self.run_id:  # "" means a new run, whatever STEPLOG_RUN_ID / MLFLOW_RUN_ID say
            check_run_id(self.run_id)
        if self.parent_run_id is not None:
            check_run_id(self.parent_run_id, "parent_run_id")
        if self.rewind_to_step is not None:
            step = self.rewind_to_step
            if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= INT64_MAX):
                raise InvalidValueError(f"rewind_to_step must be a step (an int >= 0), not {step!r}")
        if self.ranks not in (None, "zero", "each", "off"):
            raise InvalidValueError(f"ranks must be 'zero', 'each' or 'off', not {self.ranks!r}")
        if self.system_metrics not in (None, True, False):
            raise InvalidValueError(f"system_metrics must be True or False, not {self.system_metrics!r}")
        interval = self.system_metrics_interval
        if not (isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0):
            raise InvalidValueError(f"system_metrics_interval must be a positive number of seconds, not {interval!r}")

    @classmethod
    def from_kwargs(cls, options: dict[str, object]) -> Options:
        """Options from ``start_run``'s keyword arguments; TypeError names unknown ones."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"start_run() got unknown options: {', '.join(sorted(unknown))}")
        return cls(**options)  # type: ignore[arg-type]  # each value is checked in __post_init__


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its userinfo replaced by ``***``, whatever characters it holds.

    A password may hold ``#``, ``?``, ``/`` or ``@`` unencoded, which URL parsers read as the
    end of the authority; so the userinfo here runs to the *last* ``@`` of the URI. This may
    hide more than the password in a URL whose path holds an ``@`` (never less).
    """
    scheme = _SCHEME.match(uri)
    start = scheme.end() if scheme else 0
    if uri.startswith("//", start):
        start += 2
    at = uri.rfind("@", start)
    if at < 0:
        return uri
    userinfo = uri[start:at]
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return uri
    return f"{uri[:start]}{user}:***{uri[at:]}"


def resolve_tracking_uri(tracking_uri: str | os.PathLike[str] | None) -> str:
    """The destination a run writes to: the argument, else STEPLOG_TRACKING_URI, MLFLOW_TRACKING_URI, ./mlruns."""
    if tracking_uri is None:
        tracking_uri = next((os.environ[name] for name in _ENV_VARS if os.environ.get(name)), "./mlruns")
    return os.fspath(tracking_uri)


def _source(uri: str) -> str:
    """`` (from $VAR)`` when ``uri`` came from an environment variable, so the user knows where to fix it."""
    return next((f" (from ${name})" for name in _ENV_VARS if os.environ.get(name) == uri), "")


def _refuse(uri: str, why: str) -> InvalidValueError:
    return InvalidValueError(f"tracking_uri {redact_uri(uri)!r}{_source(uri)} is not supported: {_SUPPORTED}; {why}")


def make_sink(uri: str, options: Options) -> Sink:
    """The sink for one tracking URI: a local path or ``file:`` URI, or ``http(s)://``.

    Raises:
        InvalidValueError: a word or scheme MLflow gives a meaning that steplog does not serve
            (``databricks``, ``uc``, ``postgresql://...``, an empty string, ...).
    """
    if not isinstance(uri, str):
        raise InvalidValueError(f"tracking_uri must be a str or a path, not {type(uri).__name__}")
    if not uri.strip():
        raise _refuse(uri, "an empty tracking_uri would write the store into the current directory")
    if uri.lower() in _MLFLOW_WORDS:
        raise _refuse(uri, f"MLflow reads {uri!r} as a Databricks workspace, not as a folder")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else ""
    if scheme in ("http", "https"):
        try:
            from .sinks.mlflow_rest import MlflowRestSink
        except ImportError as exc:
            raise StepLogError(
                f"tracking_uri {redact_uri(uri)!r} needs the REST sink's dependencies: "
                f"pip install 'steplog[rest]' ({exc})"
            ) from exc
        return MlflowRestSink(
            uri, max_buffer=options.max_buffer, journal_dir=options.journal_dir, start_timeout=options.start_timeout
        )
    if scheme == "sqlite":
        return _sqlite_sink(uri, options)
    if scheme and scheme != "file":
        raise _refuse(uri, f"steplog does not write to {scheme}: URIs")
    from .sinks.mlruns import MlrunsSink

    return MlrunsSink(uri, durability=options.durability)


def _sqlite_sink(uri: str, options: Options) -> Sink:
    """MLflow's own database (``sqlite:///relative.db``, ``sqlite:////abs.db``), written with stdlib sqlite3."""
    from .sinks.sqlite import SqliteSink

    return SqliteSink(uri, durability=options.durability)


@dataclasses.dataclass(frozen=True, slots=True)
class Destinations:
    """What :func:`make_sinks` chose for a run."""

    sinks: list[Sink]
    uri: str
    """The first tracking URI as given (before the run starts, ``run.tracking_uri``), or the first sink's type."""
    where: str
    """Every destination in words for ``repr(run)``, passwords hidden: ``http://u:***@host + MemorySink``."""


def make_sinks(
    tracking_uri: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    sinks: Sequence[Sink] | None,
    options: Options,
) -> Destinations:
    """Every sink a run writes to, and how to name them.

    A tracking server comes first (it assigns the run id, and local stores join the run under
    it); the URI's sink is left out when only ``sinks`` are given.

    Raises:
        InvalidValueError: no destination at all (``sinks=[]``, ``tracking_uri=[]``), or a URI refused
            by :func:`make_sink`.
    """
    if isinstance(tracking_uri, (list, tuple)):
        uris = [resolve_tracking_uri(u) for u in tracking_uri]
    elif tracking_uri is None and sinks is not None:
        uris = []  # only the sinks given
    else:
        uris = [resolve_tracking_uri(tracking_uri)]  # type: ignore[arg-type]  # a str or a path here
    uris.sort(key=lambda u: not u.lower().startswith(("http://", "https://")))
    extra = list(sinks or ())
    if not uris and not extra:
        raise InvalidValueError(
            "start_run() has no destination to write to (sinks=[] or tracking_uri=[]): give a "
            "tracking_uri, leave sinks out to write ./mlruns, or pass at least one sink"
        )
    made = [make_sink(uri, options) for uri in uris]
    names = [redact_uri(uri) for uri in uris] + [type(sink).__name__ for sink in extra]
    return Destinations(sinks=made + extra, uri=uris[0] if uris else names[0], where=" + ".join(names))
