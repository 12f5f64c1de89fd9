"""The loggers the benchmarks compare, behind one small interface.

Each contender opens a fresh run in a fresh directory and returns an object with
``log_metric(key, value, step)``, ``log_metrics(mapping, step)`` and ``close()``
(close returns once everything logged is written). steplog's own ``Run`` is used
as is, so no wrapper adds a call layer to the figure being measured; the peers
get the thinnest wrapper that maps the interface onto their API.

Competitors that are not installed (``pip install 'steplog[bench]'``) are skipped
with a note saying so; nothing here needs the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log_metric(self, key: str, value: float, step: int) -> Any: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> Any: ...

    def close(self) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Contender:
    """One logger under test."""

    name: str
    description: str
    open: Callable[[Path], Logger]
    """A fresh run writing under the given (new, empty) directory."""
    needs: tuple[str, ...] = ()
    """Import names that must be installed."""
    cost: float = 1.0
    """Rough µs per point, used only to size the work so every contender takes similar time."""

    def missing(self) -> str | None:
        """None when usable, else a note saying what to install."""
        absent = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if absent:
            return f"{self.name}: skipped, {', '.join(absent)} not installed (pip install 'steplog[bench]')"
        return None


# ---------------------------------------------------------------------------- steplog


def _open_steplog(root: Path, **options: Any) -> Logger:
    import steplog

    run = steplog.start_run("bench", run_name="bench", tracking_uri=root, handle_signals=False, **options)
    return run  # type: ignore[return-value]


# ---------------------------------------------------------------------------- plain-file baselines


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class NaiveLogger:
    """What a hand-written sync logger does: open, append one MLflow line, close, per call."""

    def __init__(self, root: Path) -> None:
        self._dir = root / "metrics"
        self._dir.mkdir(parents=True)

    def log_metric(self, key: str, value: float, step: int) -> None:
        with open(self._dir / key, "a", encoding="ascii") as f:
            f.write(f"{_now_ms()} {value!r} {step}\n")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def close(self) -> None:
        return None


class BufferedLogger:
    """A sync logger that keeps each key's file open and writes a line per call (8 KiB buffered)."""

    def __init__(self, root: Path) -> None:
        self._dir = root / "metrics"
        self._dir.mkdir(parents=True)
        self._files: dict[str, io.TextIOWrapper] = {}

    def log_metric(self, key: str, value: float, step: int) -> None:
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = open(self._dir / key, "a", encoding="ascii")  # noqa: SIM115 - kept open
        f.write(f"{_now_ms()} {value!r} {step}\n")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ---------------------------------------------------------------------------- MLflow


class MlflowLogger:
    """MLflow 3.17's client on a file store, sync or with ``synchronous=False``."""

    def __init__(self, root: Path, *, synchronous: bool, buffering_seconds: int | None = None) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        self._buffering = buffering_seconds
        if buffering_seconds is not None:
            # read by MLflow's queue thread at each turn; removed again at close
            os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = str(buffering_seconds)
        self._client = MlflowClient(tracking_uri=root.as_uri())
        experiment_id = self._client.create_experiment("bench")
        self._run_id = self._client.create_run(experiment_id).info.run_id
        self._sync = synchronous

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._client.log_metric(self._run_id, key, value, step=step, synchronous=self._sync)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = _now_ms()
        batch = [self._Metric(key, value, ts, step) for key, value in metrics.items()]
        self._client.log_batch(self._run_id, metrics=batch, synchronous=self._sync)

    def close(self) -> None:
        if not self._sync:
            # this client's own store: mlflow.flush_async_logging() would open the default
            # tracking store (sqlite:///mlflow.db in the working directory) to flush it
            self._client._tracking_client.store.flush_async_logging()
        if self._buffering is not None:
            os.environ.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)
        self._client.set_terminated(self._run_id)


# ---------------------------------------------------------------------------- tensorboardX


class TensorboardXLogger:
    """tensorboardX's ``SummaryWriter.add_scalar`` (event file, its own writer thread)."""

    def __init__(self, root: Path) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(root))
        self._add = self._writer.add_scalar

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._add(key, value, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        add = self._add
        for key, value in metrics.items():
            add(key, value, step)

    def close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------------- W&B offline, trackio


class WandbLogger:
    """W&B in offline mode (``wandb.init(mode="offline")``; no network)."""

    def __init__(self, root: Path) -> None:
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True)
        self._run = wandb.init(project="bench", mode="offline", dir=str(root), settings=settings)

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._run.log({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


_trackio_runs = 0


class TrackioLogger:
    """trackio, local only (SQLite under a directory we choose; no dashboard, no upload)."""

    def __init__(self, root: Path) -> None:
        global _trackio_runs
        root.mkdir(parents=True, exist_ok=True)
        os.environ["TRACKIO_DIR"] = str(root)
        with contextlib.redirect_stdout(io.StringIO()):
            # trackio reads TRACKIO_DIR once at import: point every module holding it at this run's root
            import sys

            import trackio

            for name, module in list(sys.modules.items()):
                if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
                    module.TRACKIO_DIR = root
            _trackio_runs += 1
            self._trackio = trackio
            trackio.init(
                project=f"bench{_trackio_runs}",
                name="bench",
                embed=False,
                auto_log_gpu=False,
                auto_log_cpu=False,
            )

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._trackio.log({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._trackio.log(dict(metrics), step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self._trackio.finish()


# ---------------------------------------------------------------------------- the list

STEPLOG = Contender("steplog", "steplog Run.log_metric / log_metrics", _open_steplog, cost=0.3)
NAIVE = Contender("naive sync", "open, append one line, close, per call", NaiveLogger, cost=10)
BUFFERED = Contender("buffered sync", "file kept open, one write() per call", BufferedLogger, cost=2)


def _mlflow(name: str, description: str, cost: float, **options: Any) -> Contender:
    """An MLflow contender: ``MlflowLogger`` opened with ``options``."""
    return Contender(name, description, lambda root: MlflowLogger(root, **options), needs=("mlflow",), cost=cost)


MLFLOW_SYNC = _mlflow("mlflow sync", "MlflowClient.log_metric on a file store", 2000, synchronous=True)
MLFLOW_ASYNC = _mlflow("mlflow async", "MlflowClient.log_metric(synchronous=False)", 300, synchronous=False)
MLFLOW_ASYNC_BUFFERED = _mlflow(
    "mlflow async+buffer",
    "synchronous=False with MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=1",
    300,
    synchronous=False,
    buffering_seconds=1,
)
TENSORBOARDX = Contender(
    "tensorboardX", "SummaryWriter.add_scalar", TensorboardXLogger, needs=("tensorboardX",), cost=40
)
WANDB = Contender("wandb offline", "wandb.init(mode='offline'); run.log", WandbLogger, needs=("wandb",), cost=300)
TRACKIO = Contender("trackio", "trackio.init (local SQLite); trackio.log", TrackioLogger, needs=("trackio",), cost=15)

PEERS = (NAIVE, BUFFERED, MLFLOW_SYNC, MLFLOW_ASYNC, MLFLOW_ASYNC_BUFFERED, TENSORBOARDX, WANDB, TRACKIO)
ALL = (STEPLOG, *PEERS)


def shutdown() -> None:
    """Stop what the peers leave running in this process (W&B's service), so nothing outlives the benchmark."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


def available(contenders: tuple[Contender, ...] = ALL) -> tuple[list[Contender], list[str]]:
    """The contenders that can run here, and a note for each one skipped."""
    usable: list[Contender] = []
    notes: list[str] = []
    for c in contenders:
        note = c.missing()
        if note is None:
            usable.append(c)
        else:
            notes.append(note)
    return usable, notes
