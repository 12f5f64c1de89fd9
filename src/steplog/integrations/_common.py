"""What every framework integration shares: a lazily started run, on the ranks the core picks, and safe input.

A framework hands a logger whatever its users put in their hyperparameters and metric dicts:
nested dicts, ``Namespace`` objects, 20 kB reprs, keys with ``@`` or ``=``, strings and ``None``
among the metrics. MLflow refuses some of these; steplog refuses them too, with an exception,
which is right for a user calling ``run.log_metric`` but wrong inside a framework's training loop,
where a logging refusal must never stop training. :class:`Guard` turns every such case into a
value MLflow stores (a cut param, a mapped key) or a skipped item, with one warning per key.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._errors import InvalidKeyError, InvalidValueError, ParamChangedError, RunStateError, StepLogError
from .._validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, check_key

if TYPE_CHECKING:
    from .._jobs import JobPlan, RanksMode
    from .._ranks import Ranks
    from .._run import Run

__all__ = ["Guard", "IntegrationWarning", "RunHandle", "flatten", "local_store_dir"]


class IntegrationWarning(UserWarning):
    """Warned by a framework integration when it changed or skipped something so training goes on."""


# Characters MLflow allows in keys (plus the colon off Windows); everything else becomes '_'.
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def flatten(params: Any, sep: str = "/") -> dict[str, Any]:
    """Flatten nested mappings (and ``argparse.Namespace`` / dataclass instances) into one level.

    ``{"model": {"lr": 0.1}}`` becomes ``{"model/lr": 0.1}``; other values are kept as they are.
    """
    out: dict[str, Any] = {}
    if params is None:
        return out

    def as_mapping(value: Any) -> Mapping[Any, Any] | None:
        if isinstance(value, Mapping):
            return value
        if isinstance(value, argparse.Namespace):
            return vars(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return None

    def walk(prefix: str, value: Any, depth: int) -> None:
        mapping = as_mapping(value) if depth < 32 else None  # a self-referencing dict stops here
        if mapping is None or (not mapping and prefix):
            out[prefix] = value
            return
        for key, item in mapping.items():
            walk(f"{prefix}{sep}{key}" if prefix else str(key), item, depth + 1)

    top = as_mapping(params)
    if top is None:
        raise InvalidValueError(
            f"hyperparameters of type {type(params).__name__} are not allowed: pass a dict, Namespace or dataclass"
        )
    walk("", top, 0)
    return out


def local_store_dir(tracking_uri: str | os.PathLike[str] | None) -> str | None:
    """The local directory a tracking URI names, or None for a server (resolved as ``start_run`` does)."""
    from .._run import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    lowered = uri.lower()
    if lowered.startswith(("http://", "https://")):
        return None
    if lowered.startswith("file:"):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(uri).path)
        return os.path.abspath(path)
    if ":" in uri.partition("/")[0] and len(uri.partition(":")[0]) > 1:  # another scheme: not a directory
        return None
    return os.path.abspath(uri)


class Guard:
    """Makes framework input storable, warning once per key for what it had to change or skip.

    Args:
        framework: named in warnings ("Lightning", "Transformers", ...).
    """

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self._metric_keys: dict[str, str] = {}  # key as given -> key stored ("" = skipped)
        self._warned: set[tuple[str, str]] = set()

    def warn_once(self, what: str, key: str, message: str) -> None:
        """Warn ``message`` once per (kind of problem, key)."""
        if (what, key) in self._warned:
            return
        self._warned.add((what, key))
        warnings.warn(f"steplog ({self.framework}): {message}", IntegrationWarning, stacklevel=3)

    def key(self, key: Any, kind: str) -> str:
        """``key`` as MLflow stores it: forbidden characters become '_', over-long keys are cut ("" = unusable)."""
        text = key if isinstance(key, str) else str(key)
        try:
            return check_key(text, kind)
        except InvalidKeyError:
            pass
        mapped = _BAD_KEY_CHARS.sub("_", text)
        if os.name == "nt":
            mapped = mapped.replace(":", "_")
        mapped = "/".join(part if part not in (".", "..") else "_" for part in mapped.split("/") if part)
        mapped = mapped[:MAX_ENTITY_KEY_LENGTH].rstrip("/")
        try:
            check_key(mapped, kind)
        except InvalidKeyError:
            self.warn_once("key", text, f"{kind} key {text!r} cannot be stored by MLflow and is skipped")
            return ""
        self.warn_once(
            "key",
            text,
            f"{kind} key {text!r} is stored as {mapped!r}: MLflow keys may contain only letters, digits, "
            "'_', '-', '.', ' ', ':' and '/', and at most 250 characters",
        )
        return mapped

    def param_value(self, key: str, value: Any, limit: int = MAX_PARAM_VAL_LENGTH, kind: str = "param") -> str:
        """``str(value)``, cut to MLflow's limit with one warning naming the key."""
        try:
            text = str(value)  # None as "None", as MLflow's own framework loggers store it
        except Exception as exc:  # a user object whose __str__ raises must not stop training
            self.warn_once(
                f"str {kind}", key, f"{kind} {key!r} could not be converted to text ({exc!r}) and is skipped"
            )
            return ""
        if len(text) > limit:
            self.warn_once(
                f"long {kind}",
                key,
                f"{kind} {key!r} is {len(text)} characters long; MLflow keeps at most {limit}, so it is cut",
            )
            text = text[:limit]
        return text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes '?'

    def params(self, params: Any) -> dict[str, str]:
        """Flattened (with '/'), keys mapped, values as text and cut to MLflow's 6000 characters."""
        out: dict[str, str] = {}
        for key, value in flatten(params).items():
            stored = self.key(key, "param")
            if stored:
                out[stored] = self.param_value(key, value)
        return out

    def tags(self, tags: Mapping[Any, Any]) -> dict[str, str]:
        """Tags with keys mapped and values cut to MLflow's 8000 characters."""
        out: dict[str, str] = {}
        for key, value in tags.items():
            stored = self.key(key, "tag")
            if stored:
                out[stored] = self.param_value(stored, value, MAX_TAG_VAL_LENGTH, "tag")
        return out

    def metrics(self, metrics: Mapping[Any, Any]) -> dict[str, Any]:
        """The numeric items of ``metrics`` under storable keys; anything else skipped with one warning."""
        out: dict[str, Any] = {}
        keys = self._metric_keys
        for key, value in metrics.items():
            stored = keys.get(key)
            if stored is None:
                stored = keys[key] = self.key(key, "metric")
            if not stored:
                continue
            cls = value.__class__
            if cls is float:
                out[stored] = value
            elif cls is int:
                out[stored] = float(value)
            elif self._numeric(stored, value):
                out[stored] = value
        return out

    def _numeric(self, key: str, value: Any) -> bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            reason = "a boolean"
        elif isinstance(value, numbers.Real):
            return True
        elif hasattr(value, "item") and getattr(value, "shape", None) in ((), (1,)):
            return True  # a 0-d or one-element tensor/array: steplog reads it (off the hot path for device tensors)
        else:
            reason = f"of type {type(value).__name__}"
        self.warn_once("value", key, f"metric {key!r} is {reason}, not a number, and is skipped")
        return False


_MAX_RUN_NAME_LENGTH = 250  # what start_run accepts (a framework may hand over a longer one)

# Options that only make sense when a run is first opened: reopening the same run after the
# framework ended it must not rewind its history again.
_FIRST_OPEN_ONLY = ("rewind_to_step",)


class RunHandle:
    """A steplog run started on first use, on the process steplog's core says writes, and ended once.

    Which process writes is decided as :func:`steplog.start_run` decides it (``ranks=`` and the
    launcher's environment, see ``steplog._jobs``): the plan is made here, at construction, so a
    bad ``ranks``, a job ``ranks="each"`` cannot identify, or ``run_id`` with ``ranks="each"`` fails
    before training starts, and a process that writes nothing never starts a run (no writer thread).

    Args:
        experiment: experiment name.
        run_name, tracking_uri, tags: as :func:`steplog.start_run`.
        run_id: resume this run (default, as ``start_run``: ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``).
        ranks: ``"zero"``, ``"each"`` or ``"off"``, as ``start_run`` (default: the core's default).
        options: other ``start_run`` options (checked here, so a typo fails before training starts).
    """

    def __init__(
        self,
        guard: Guard,
        experiment: str,
        *,
        run_name: str | None = None,
        tracking_uri: str | os.PathLike[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        ranks: RanksMode | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        from .._destinations import Options
        from .._run import _plan_job, _resume_spec
        from .._validation import check_experiment_name

        self.guard = guard
        self.experiment = check_experiment_name(experiment)
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags = guard.tags(tags or {})
        self.options = dict(options or {})
        if run_id is not None:
            self.options["run_id"] = run_id
        if ranks is not None:
            self.options["ranks"] = ranks
        opts = Options.from_kwargs(self.options)  # unknown names and bad values fail here, not mid-training
        # start_run's own planning functions (the same code, not a copy of its rules), made early
        self.plan: JobPlan = _plan_job(self.experiment, opts, run_name)
        _resume_spec(opts, self.plan, run_name)  # a garbled STEPLOG_RUN_ID / MLFLOW_RUN_ID fails here too
        self.run: Run | None = None
        self.ended = False

    @property
    def writes(self) -> bool:
        """True on a process that writes a run (as ``start_run`` decides: ``ranks=`` and the launcher)."""
        return self.plan.writes

    @property
    def ranks(self) -> Ranks:
        """Where this process stands in its job (read from the launcher's environment by the core)."""
        return self.plan.ranks

    def start(self) -> Run | None:
        """The run, started on first call; None on ranks that do not write.

        After :meth:`end`, a later log call resumes the same run by its id (e.g. ``trainer.test()``
        after ``trainer.fit()``); if that fails, the call is skipped with one warning.
        """
        if not self.ended:
            if self.run is None and self.writes:
                self.run = self._open(self.options)
            return self.run
        if self.run is None:
            return None
        run_id = self.run.run_id
        # This process wrote the run, so this process reopens it, whatever the job's mode ("each"
        # refuses run_id); and the history is not rewound a second time.
        options = {k: v for k, v in self.options.items() if k not in _FIRST_OPEN_ONLY}
        try:
            self.run = self._open({**options, "run_id": run_id, "ranks": "off"})
        except StepLogError as exc:
            self.guard.warn_once("reopen", run_id, f"run {run_id} could not be reopened, so this is skipped: {exc}")
            return None
        self.ended = False
        return self.run

    def _open(self, options: Mapping[str, Any]) -> Run:
        from .._run import start_run

        run_name = self.run_name
        if run_name is not None:
            run_name = self.guard.param_value("run_name", run_name, _MAX_RUN_NAME_LENGTH, "run name") or None
        return start_run(
            self.experiment,
            run_name=run_name,
            tracking_uri=self.tracking_uri,
            tags=self.tags,
            **options,
        )

    def log_metrics(self, metrics: Mapping[Any, Any], step: int | None) -> None:
        """Log the numeric items of ``metrics`` at ``step``; never raises for what the framework handed in."""
        run = self.run if self.run is not None and not self.ended else self.start()
        if run is None:
            return
        clean = self.guard.metrics(metrics)
        if not clean:
            return
        try:
            run.log_metrics(clean, step)
        except RunStateError as exc:  # the run was ended under the framework (e.g. by steplog's SIGTERM handler)
            self.guard.warn_once("state", run.run_id, f"metrics are skipped: {exc}")
        except (InvalidKeyError, InvalidValueError):
            # one bad item refuses the whole call: log the rest one by one, skipping (once) what steplog refuses
            for key, value in clean.items():
                try:
                    run.log_metric(key, value, step)
                except (InvalidKeyError, InvalidValueError) as exc:
                    self.guard.warn_once("refused", key, f"metric {key!r} is skipped: {exc}")

    def log_params(self, params: Any) -> None:
        """Log params flattened and made storable; a param that changes value is skipped with a warning."""
        run = self.start()
        if run is None:
            return
        clean = self.guard.params(params)
        try:
            run.log_params(clean)
        except (InvalidKeyError, InvalidValueError):
            for key, value in clean.items():
                try:
                    run.log_param(key, value)
                except ParamChangedError as exc:
                    self.guard.warn_once("changed", key, f"param {key!r} keeps its first value: {exc}")
                except (InvalidKeyError, InvalidValueError) as exc:
                    self.guard.warn_once("refused", key, f"param {key!r} is skipped: {exc}")

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None) -> None:
        """Copy a file or folder into the run's artifacts (a missing path is skipped with a warning)."""
        run = self.start()
        if run is None:
            return
        try:
            run.log_artifact(path, artifact_path)
        except StepLogError as exc:
            self.guard.warn_once("artifact", os.fspath(path), f"artifact {os.fspath(path)!r} is skipped: {exc}")

    def end(self, status: str) -> None:
        """Close the run with ``status`` (FINISHED, FAILED, KILLED); later calls do nothing."""
        if self.ended:
            return
        self.ended = True
        if self.run is not None:
            self.run.close(status)

    @property
    def run_id(self) -> str | None:
        """The run's id once started on this rank."""
        return None if self.run is None else self.run.run_id

    def __getstate__(self) -> dict[str, Any]:
        # a framework may pickle its logger into spawned workers: a live run (threads, files) stays here
        state = self.__dict__.copy()
        state["run"] = None
        return state
