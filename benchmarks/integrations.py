"""Framework integrations, side by side: what logging costs a training step in Lightning and HF's Trainer.

Measured in one process, contenders alternated round by round (medians over rounds):

1. per-call cost of a Lightning logger's ``log_metrics`` (3 metrics per step, ``log_every_n_steps=1``):
   steplog's ``SteplogLogger`` against Lightning's ``MLFlowLogger`` on a file store and on a local
   ``mlflow server`` (started and stopped here, on 127.0.0.1), and ``TensorBoardLogger``;
2. a real ``Trainer.fit`` step of a tiny model: no logger against ``SteplogLogger`` (the overhead
   steplog adds to a step) and against ``MLFlowLogger`` on a file store;
3. per-call cost of a Hugging Face ``TrainerCallback.on_log``: steplog's ``SteplogCallback``
   against transformers' ``MLflowCallback`` (file store).

steplog's per-call figures include the background writer's share of the interpreter: each round
logs, then closes the run (everything written), and the time until the close returns is counted.

    MLFLOW_ALLOW_FILE_STORE=true .venv/bin/python benchmarks/integrations.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
warnings.filterwarnings("ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A local ``mlflow server`` (sqlite) on 127.0.0.1, stopped (its whole process group) by :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited early")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health within 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def metrics_of(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / (step + 1), "lr": 1e-3, "epoch": float(step // 100)}


# ---------------------------------------------------------------------------- 1. Lightning loggers


def lightning_loggers(work: Path, server: Server | None) -> dict[str, Callable[[int], Any]]:
    """name -> factory(round) of a fresh logger, plus how to end it."""
    from lightning.pytorch.loggers import MLFlowLogger

    from steplog.integrations.lightning import SteplogLogger

    factories: dict[str, Callable[[int], Any]] = {
        "SteplogLogger (file)": lambda r: SteplogLogger("bench", tracking_uri=work / f"steplog-{r}"),
        "MLFlowLogger (file)": lambda r: MLFlowLogger("bench", tracking_uri=(work / f"mlflow-{r}").as_uri()),
    }
    if server is not None:
        url = server.url
        factories["MLFlowLogger (server)"] = lambda r: MLFlowLogger("bench", tracking_uri=url)
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        TensorBoardLogger(str(work / "probe"))  # raises when neither tensorboard nor tensorboardX is installed
        factories["TensorBoardLogger"] = lambda r: TensorBoardLogger(str(work / f"tb-{r}"), name="bench")
    except (ImportError, ModuleNotFoundError):
        print("TensorBoardLogger: skipped (neither tensorboard nor tensorboardX is installed)")
    return factories


ENDS: dict[str, list[float]] = {}
"""Seconds each contender's end of training took (finalize / on_train_end: the last writes), per round."""


def time_logger(name: str, logger: Any, steps: int) -> float:
    """Seconds per log_metrics call in the loop (steplog's writer runs meanwhile); the end is kept in ENDS."""
    logger.log_hyperparams({"lr": 1e-3, "model": {"width": 32, "depth": 2}})
    logger.log_metrics(metrics_of(0), step=0)  # the run exists before the clock starts
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logger.log_metrics(metrics_of(step), step=step)
    loop = time.perf_counter() - start
    start = time.perf_counter()
    logger.finalize("success")
    ENDS.setdefault(name, []).append(time.perf_counter() - start)
    return loop / steps


# ---------------------------------------------------------------------------- 2. a Lightning step


def fit_step_seconds(logger: Any, steps: int, work: Path) -> float:
    """Seconds per training step of a tiny model in Trainer.fit (log_every_n_steps=1)."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # sized for a step of about 2 ms on the 2-core development machine (one torch thread)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = TensorDataset(torch.randn(steps * 64, 64), torch.randn(steps * 64, 1))
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(work),
    )

    times: list[float] = []

    class Clock:  # per-step wall time between batch starts, so setup and teardown are left out
        last = 0.0

    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            now = time.perf_counter()
            if Clock.last:
                times.append(now - Clock.last)
            Clock.last = now

    trainer.callbacks.append(StepClock())
    trainer.fit(Tiny(), DataLoader(data, batch_size=64))
    return statistics.median(times[len(times) // 10 :])  # the first tenth warms up


# ---------------------------------------------------------------------------- 3. HF callbacks


def time_hf_callback(name: str, steps: int, work: Path, r: int) -> float:
    """Seconds per on_log call (3 numbers), counting the end of the run."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(str(work / f"hf-out-{r}"), report_to="none", use_cpu=True)
    state = TrainerState()
    control = TrainerControl()
    if name.startswith("SteplogCallback"):
        from steplog.integrations.transformers import SteplogCallback

        callback: Any = SteplogCallback("bench", tracking_uri=work / f"hf-steplog-{r}")
    else:
        import mlflow
        from transformers.integrations import MLflowCallback

        mlflow.set_tracking_uri((work / f"hf-mlflow-{r}").as_uri())
        callback = MLflowCallback()
    callback.on_train_begin(args, state, control, model=None)  # both log TrainingArguments' ~100 params here
    state.global_step = 0
    callback.on_log(args, state, control, logs={"loss": 1.0, "learning_rate": 1e-3, "epoch": 0.0})
    start = time.perf_counter()
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": 1.0 / step, "learning_rate": 1e-3, "epoch": step / 1e3})
    loop = time.perf_counter() - start
    start = time.perf_counter()
    callback.on_train_end(args, state, control)
    ENDS.setdefault(name, []).append(time.perf_counter() - start)
    return loop / steps


# ---------------------------------------------------------------------------- main


def rounds_of(fns: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, rotating the order every round; seconds per step each time."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(fns[name](r))
    return out


def report(title: str, results: dict[str, list[float]], base: str) -> dict[str, float]:
    print(f"\n{title}")
    medians = {n: statistics.median(v) for n, v in results.items()}
    for name, values in results.items():
        ratio = medians[name] / medians[base]
        print(
            f"  {name:28s} median {medians[name] * 1e6:10.1f} µs  (min {min(values) * 1e6:.1f}, "
            f"max {max(values) * 1e6:.1f})  {ratio:8.1f}x {base}"
        )
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--no-server", action="store_true", help="leave out the mlflow server contender")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a tiny model: more threads only add scheduling noise on a small machine
    rounds = 3 if args.quick else 5
    steps = 500 if args.quick else 2000
    server_steps = 100 if args.quick else 300
    fit_steps = 300 if args.quick else 1000

    work = Path(tempfile.mkdtemp(prefix="steplog-bench-integrations-"))
    server = None
    try:
        if not args.no_server:
            server = Server(work / "server")
        factories = lightning_loggers(work, server)

        def logger_fn(name: str) -> Callable[[int], float]:
            n = server_steps if "server" in name else steps
            return lambda r: time_logger(name, factories[name](r), n)

        per_call = rounds_of({name: logger_fn(name) for name in factories}, rounds)
        logger_medians = report(
            f"Lightning logger.log_metrics, 3 metrics per step ({steps} steps; server {server_steps}), per step:",
            per_call,
            "SteplogLogger (file)",
        )

        from lightning.pytorch.loggers import MLFlowLogger
        from lightning.pytorch.loggers.logger import Logger

        from steplog.integrations.lightning import SteplogLogger

        class NoopLogger(Logger):  # Lightning's own logging path with a logger that does nothing
            name = "noop"
            version = "0"

            def log_metrics(self, metrics: Any, step: Any = None) -> None:
                pass

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

        fit = rounds_of(
            {
                "no logger": lambda r: fit_step_seconds(False, fit_steps, work / f"fit-none-{r}"),
                "no-op Logger": lambda r: fit_step_seconds(NoopLogger(), fit_steps, work / f"fit-noop-{r}"),
                "SteplogLogger": lambda r: fit_step_seconds(
                    SteplogLogger("fit", tracking_uri=work / f"fit-steplog-{r}"), fit_steps, work / f"fit-s-{r}"
                ),
                "MLFlowLogger (file)": lambda r: fit_step_seconds(
                    MLFlowLogger("fit", tracking_uri=(work / f"fit-mlflow-{r}").as_uri()),
                    fit_steps,
                    work / f"fit-m-{r}",
                ),
            },
            rounds,
        )
        fit_medians = report(
            f"Lightning Trainer.fit step, 2-layer MLP 64-512-1, batch 64 ({fit_steps} steps), per step:",
            fit,
            "no logger",
        )

        hf = rounds_of(
            {
                "SteplogCallback (file)": lambda r: time_hf_callback("SteplogCallback (file)", steps, work, r),
                "MLflowCallback (file)": lambda r: time_hf_callback("MLflowCallback (file)", steps, work, r),
            },
            rounds,
        )
        hf_medians = report(
            f"HF TrainerCallback.on_log, 3 numbers ({steps} steps), per step:", hf, "SteplogCallback (file)"
        )

        print("\nEnd of training (finalize / on_train_end: the last writes), median per run:")
        for name, values in ENDS.items():
            print(f"  {name:28s} {statistics.median(values) * 1e3:8.1f} ms")
        base = fit_medians["no-op Logger"]
        overhead = fit_medians["SteplogLogger"] / base - 1
        print("\nTargets:")
        print(
            f"  SteplogLogger adds {overhead * 100:+.2f}% to a {base * 1e3:.2f} ms Lightning step with a no-op logger "
            f"({(fit_medians['SteplogLogger'] / fit_medians['no logger'] - 1) * 100:+.2f}% against logger=False) (target <= 1%)"
        )
        s = logger_medians["SteplogLogger (file)"]
        print(
            f"  MLFlowLogger (file) / SteplogLogger: {logger_medians['MLFlowLogger (file)'] / s:.0f}x (target >= 20x)"
        )
        if "MLFlowLogger (server)" in logger_medians:
            print(
                f"  MLFlowLogger (server) / SteplogLogger: {logger_medians['MLFlowLogger (server)'] / s:.0f}x (target >= 100x)"
            )
        print(
            f"  MLflowCallback / SteplogCallback: "
            f"{hf_medians['MLflowCallback (file)'] / hf_medians['SteplogCallback (file)']:.0f}x"
        )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
