"""steplog: an asynchronous, buffered experiment logger that writes MLflow's file store.

    import steplog

    with steplog.start_run("mnist", run_name="baseline") as run:
        run.log_params({"lr": 1e-3})
        for step in range(100_000):
            run.log_metric("loss", loss, step=step)   # returns in a fraction of a microsecond
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
from ._records import MetricPoint as MetricPoint
from ._records import RunInfo as RunInfo
from ._records import RunStatus as RunStatus
from ._records import Stats as Stats
from ._run import Run as Run
from ._run import start_run as start_run
from ._version import __version__ as __version__
from .store import Store as Store

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
