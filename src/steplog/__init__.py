"""steplog: an asynchronous, buffered experiment logger that writes MLflow's file store.

Example::

    import steplog

    with steplog.start_run("mnist", run_name="baseline") as run:
        run.log_params({"lr": 1e-3})
        for step in range(100_000):
            run.log_metric("loss", loss, step=step)  # returns in a fraction of a microsecond
"""

from ._errors import BufferFullError as BufferFullError
from ._errors import FlushTimeoutError as FlushTimeoutError
from ._errors import InvalidKeyError as InvalidKeyError
from ._errors import InvalidValueError as InvalidValueError
from ._errors import ParamChangedError as ParamChangedError
from ._errors import RunStateError as RunStateError
from ._errors import ServerError as ServerError
from ._errors import StepLogError as StepLogError
from ._errors import WriteError as WriteError
from ._version import __version__ as __version__

_TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs more than the rest of this module
if _TYPE_CHECKING:
    from ._records import MetricPoint as MetricPoint
    from ._records import RunInfo as RunInfo
    from ._records import RunStatus as RunStatus
    from ._records import Stats as Stats
    from ._run import Run as Run
    from ._run import start_run as start_run
    from .store import Store as Store

# The rest of the API is imported on first use (PEP 562), so `import steplog` stays cheap
# (a few ms, not the ~100 ms of anyio, dataclasses and the writer): worth it for CLIs, worker
# processes and test collection that import steplog without logging. Each name is still an
# explicit re-export from one private module; add new ones here and in the block above.
_LAZY = {
    "MetricPoint": "._records",
    "Run": "._run",
    "RunInfo": "._records",
    "RunStatus": "._records",
    "Stats": "._records",
    "Store": ".store",
    "start_run": "._run",
}
# Public submodules, imported on first attribute access too: `import steplog; steplog.sinks.MlrunsSink`
# works as it would after `import steplog.sinks` (which binds the attribute itself).
_SUBMODULES = frozenset({"cli", "integrations", "sinks", "store", "testing", "typing"})


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        if name not in _SUBMODULES:
            raise AttributeError(f"module 'steplog' has no attribute {name!r}")
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # binds globals()[name] as a submodule import does
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    _public(value)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def _public(value: object) -> None:
    """Say ``steplog.X``, not ``steplog._module.X``, in reprs, tracebacks and docs (as httpx does)."""
    if getattr(value, "__module__", "").startswith("steplog."):
        value.__module__ = "steplog"


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BufferFullError",
    "FlushTimeoutError",
    "InvalidKeyError",
    "InvalidValueError",
    "MetricPoint",
    "ParamChangedError",
    "Run",
    "RunInfo",
    "RunStateError",
    "RunStatus",
    "ServerError",
    "Stats",
    "StepLogError",
    "Store",
    "WriteError",
    "__version__",
    "start_run",
]

for _name in __all__:
    if _name in globals():  # the lazy names are rewritten when first imported (__getattr__)
        _public(globals()[_name])
del _name
