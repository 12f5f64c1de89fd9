"""Logging tensors from a training step: how much each way of logging slows the step down.

A small MLP trains on random data; every step produces 20 scalar tensors (the loss and
19 per-parameter gradient norms) that are logged in one of these ways, side by side in
one process (rounds alternate the order, medians reported):

    none            the 20 tensors are computed and not logged (the baseline)
    item            float(t.item()) per metric (a host-device sync per value)
    stack_tolist    one torch.stack(ms).tolist() per step (one sync per step)
    naive_deferral  stack on a side stream, non-blocking copy into a pinned ring slot,
                    event, a thread that waits on the event (CUDA only)
    tensorboard     SummaryWriter.add_scalar(tag, tensor) (torch.utils.tensorboard, or
                    tensorboardX when tensorboard is not installed)
    steplog         run.log_metrics({...tensors...}, step=step) into a local mlruns store
    steplog_forced  (CPU only) steplog with CPU tensors forced through the device
                    deferral machinery: its CPU cost, measurable without a GPU

Two regimes, sizes as arguments (width x depth x batch): a GPU-bound step (large
matmuls, the GPU is the bottleneck) and a launch-bound step (tiny layers, the CPU
launching kernels is the bottleneck).

    python benchmarks/gpu_sync.py                        # CUDA if available, else CPU
    python benchmarks/gpu_sync.py --device cpu --steps 100 --rounds 5
    python benchmarks/gpu_sync.py --gpu-bound 2048x10x1024 --launch-bound 64x10x64

Runs from the source tree with only torch installed: it puts ../src on sys.path.
steplog itself needs anyio (pure Python) and orjson; when they are missing, put them in
benchmarks/.deps (``pip install --target benchmarks/.deps anyio orjson`` on a machine
with the same Python) or the steplog rows are reported as unavailable. The script first
checks that steplog's values equal float(t.item()) bit for bit on the device in use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import struct
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
if (HERE / ".deps").is_dir():
    sys.path.insert(1, str(HERE / ".deps"))

import torch  # noqa: E402

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def import_steplog() -> tuple[Any, str, bool]:
    """(steplog or None, why not, whether orjson is real)."""
    have_orjson = True
    try:
        import orjson  # noqa: F401
    except ImportError:
        have_orjson = False
        # orjson encodes mlruns metric lines; without it, log into memory (the stand-in refuses any use)
        stand_in = types.ModuleType("orjson")

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("orjson is not installed: this benchmark logs to memory instead")

        stand_in.dumps = stand_in.loads = unavailable  # type: ignore[attr-defined]
        stand_in.JSONDecodeError = ValueError  # type: ignore[attr-defined]
        sys.modules["orjson"] = stand_in
    try:
        import steplog

        steplog.start_run  # noqa: B018 - the package imports its modules lazily: load them now
    except ImportError as exc:
        return None, f"steplog cannot be imported ({exc}); put anyio in benchmarks/.deps", have_orjson
    return steplog, "", have_orjson


STEPLOG, STEPLOG_MISSING, HAVE_ORJSON = import_steplog()


# ---------------------------------------------------------------------------- the model


class Model:
    """An MLP of ``depth`` Linear layers and its SGD step; ``step()`` returns 20 scalar tensors."""

    def __init__(self, width: int, depth: int, batch: int, device: str) -> None:
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1]).to(device)
        self.params = list(self.net.parameters())
        if len(self.params) < 19:
            raise SystemExit("depth must be at least 10 (19 gradient norms are logged)")
        self.opt = torch.optim.SGD(self.params, lr=1e-4)
        self.x = torch.randn(batch, width, device=device)
        self.y = torch.randn(batch, width, device=device)
        self.keys = ["loss"] + [f"grad_norm/{i:02d}" for i in range(19)]

    def step(self) -> list[torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self.net(self.x), self.y)
        loss.backward()
        norms = [p.grad.norm() for p in self.params[:19]]  # type: ignore[union-attr]
        self.opt.step()
        return [loss.detach(), *norms]


# ---------------------------------------------------------------------------- the loggers


class Logger:
    """One way of logging; ``log`` is called once per step, ``finish`` once after the timed steps."""

    name = ""

    def __init__(self, keys: list[str], device: str) -> None:
        self.keys = keys
        self.device = device
        self.last: list[float] = []

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoLogging(Logger):
    name = "none"


class ItemPerMetric(Logger):
    name = "item"

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        self.last = [float(m.item()) for m in ms]


class StackToList(Logger):
    name = "stack_tolist"

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        self.last = torch.stack(ms).tolist()


class NaiveDeferral(Logger):
    """What users hand-roll: side stream, pinned ring, event, a thread that waits and converts."""

    name = "naive_deferral"
    RING = 4

    def __init__(self, keys: list[str], device: str) -> None:
        super().__init__(keys, device)
        self.side = torch.cuda.Stream()
        self.pinned = [torch.empty(len(keys), pin_memory=True) for _ in range(self.RING)]
        self.events = [torch.cuda.Event() for _ in range(self.RING)]
        self.free = threading.Semaphore(self.RING)
        self.todo: queue.Queue[int | None] = queue.Queue()
        self.slot = 0
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        while (slot := self.todo.get()) is not None:
            self.events[slot].synchronize()
            self.last = self.pinned[slot].tolist()
            self.free.release()
            self.todo.task_done()
        self.todo.task_done()

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        self.free.acquire()
        slot = self.slot
        self.slot = (slot + 1) % self.RING
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.pinned[slot].copy_(torch.stack(ms), non_blocking=True)
            self.events[slot].record()
        for m in ms:
            m.record_stream(self.side)
        self.todo.put(slot)

    def finish(self) -> None:
        self.todo.join()

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()


class TensorBoard(Logger):
    name = "tensorboard"

    def __init__(self, keys: list[str], device: str) -> None:
        super().__init__(keys, device)
        self.dir = tempfile.TemporaryDirectory()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]
        self.writer = SummaryWriter(self.dir.name)

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        for key, m in zip(self.keys, ms, strict=True):
            self.writer.add_scalar(key, m, step)

    def finish(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.dir.cleanup()


def tensorboard_available() -> bool:
    for module in ("tensorboard", "tensorboardX"):
        try:
            __import__(module)
        except ImportError:
            continue
        return True
    print("tensorboard row skipped: neither tensorboard nor tensorboardX is installed")
    return False


class Steplog(Logger):
    name = "steplog"
    forced = False

    def __init__(self, keys: list[str], device: str) -> None:
        super().__init__(keys, device)
        self.dir = tempfile.TemporaryDirectory()
        if HAVE_ORJSON:
            self.run = STEPLOG.start_run("gpu_sync", tracking_uri=self.dir.name, handle_signals=False)
        else:
            from steplog.testing import MemorySink

            self.run = STEPLOG.start_run("gpu_sync", sinks=[MemorySink()], handle_signals=False)
        if self.forced:
            from steplog._tensors import defer_cpu_tensors

            defer_cpu_tensors(self.run._tensors)

    def log(self, step: int, ms: list[torch.Tensor]) -> None:
        self.run.log_metrics(dict(zip(self.keys, ms, strict=True)), step=step)

    def finish(self) -> None:
        self.run.flush()

    def close(self) -> None:
        self.blocking_reads = self.run.stats().blocking_reads
        self.run.close()
        self.dir.cleanup()


class SteplogForced(Steplog):
    name = "steplog_forced"
    forced = True


# ---------------------------------------------------------------------------- measuring


def check_exact(device: str, forced: bool = False) -> str:
    """Log 20 tensors of several dtypes through steplog on ``device``; compare with float(t.item())."""
    if STEPLOG is None:
        return f"not checked: {STEPLOG_MISSING}"
    from steplog.testing import MemorySink

    gen = torch.Generator(device="cpu").manual_seed(1)
    tensors = [torch.randn((), generator=gen).to(device) * 10 ** (i - 10) for i in range(16)]
    tensors += [torch.tensor(2**53 + 1, device=device), torch.tensor(-0.0, device=device)]
    tensors += [torch.tensor(0.1, dtype=torch.bfloat16, device=device), torch.tensor(float("inf"), device=device)]
    sink = MemorySink()
    with STEPLOG.start_run("check", sinks=[sink], handle_signals=False) as run:
        if forced:
            from steplog._tensors import defer_cpu_tensors

            defer_cpu_tensors(run._tensors)
        for step in range(3):
            run.log_metrics({f"v{i}": t for i, t in enumerate(tensors)}, step=step)
        deferred = bool(run._tensors.keys)
    got = [struct.pack("<d", v) for i in range(len(tensors)) for v in sink.values(f"v{i}")]
    want = [struct.pack("<d", float(t.item())) for t in tensors for _ in range(3)]
    how = "deferred" if deferred else "plain path"
    return f"bit-exact ({how}, {len(got)} values)" if got == want else f"MISMATCH ({how}): values differ"


def cpu_cost(device: str, forced: bool = False, steps: int = 250, repeats: int = 7) -> str:
    """CPU time per value (thread time, so a loaded machine disturbs it less) of steplog's two halves.

    The log call's conversion (the value hook) on the logging thread, and the writer's
    resolution (gather, stack, copy start, then the floats put in place) for 20 scalar
    tensors a step; the wait for the device is left out (it is not CPU work).
    """
    if STEPLOG is None:
        return f"not measured: {STEPLOG_MISSING}"
    from steplog._tensors import DeviceValues, defer_cpu_tensors

    tensors = [torch.randn((), device=device) for _ in range(20)]
    keys = [f"m{i:02d}" for i in range(20)]
    hot: list[float] = []
    writer: list[float] = []
    for _ in range(repeats):
        values = DeviceValues(flush_interval=0.0, max_outstanding=10**9)
        if forced:
            defer_cpu_tensors(values)
        cols: dict[str, list[Any]] = {k: [] for k in keys}
        c0 = time.thread_time()
        for step in range(steps):
            for key, t in zip(keys, tensors, strict=True):
                cols[key] += (0, values.convert(key, t), step)
        c1 = time.thread_time()
        work = list(cols.items())
        values._seal(work, force=True)
        c2 = time.thread_time()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        c3 = time.thread_time()
        values._poll()
        values._substitute(work, block=True)
        c4 = time.thread_time()
        n = steps * len(keys)
        hot.append((c1 - c0) / n)
        writer.append((c2 - c1 + c4 - c3) / n)
    how = "deferred" if values.keys else "plain path"
    return (
        f"{statistics.median(hot) * 1e6:.2f} µs per value in the log call, "
        f"{statistics.median(writer) * 1e6:.2f} µs per value in the writer ({how}; median of {repeats})"
    )


def measure(model: Model, logger: Logger, steps: int, warmup: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds per step with this logger (its flush at the end included), and seconds per step in its calls."""
    for step in range(warmup):
        logger.log(step, model.step())
    logger.finish()
    sync()
    clock = time.perf_counter
    in_calls = 0.0
    t0 = clock()
    for step in range(warmup, warmup + steps):
        ms = model.step()
        c0 = clock()
        logger.log(step, ms)
        in_calls += clock() - c0
    logger.finish()
    sync()
    return (clock() - t0) / steps, in_calls / steps


def run_regime(
    label: str, size: tuple[int, int, int], device: str, rows: list[type[Logger]], args: argparse.Namespace
) -> dict[str, Any]:
    width, depth, batch = size
    model = Model(width, depth, batch, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    samples: dict[str, list[float]] = {row.name: [] for row in rows}
    call_samples: dict[str, list[float]] = {row.name: [] for row in rows}
    extra: dict[str, Any] = {}
    for r in range(args.rounds):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            logger = row(model.keys, device)
            try:
                per_step, in_calls = measure(model, logger, args.steps, args.warmup, sync)
                samples[row.name].append(per_step)
                call_samples[row.name].append(in_calls)
            finally:
                logger.close()
            if isinstance(logger, Steplog):
                extra[f"{row.name}_blocking_reads"] = extra.get(f"{row.name}_blocking_reads", 0) + logger.blocking_reads
    base = statistics.median(samples["none"])
    result: dict[str, Any] = {"regime": label, "size": f"{width}x{depth}x{batch}", "rows": {}, **extra}
    for name, values in samples.items():
        med = statistics.median(values)
        result["rows"][name] = {
            "ms_per_step": med * 1e3,
            "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3,
            "overhead_pct": (med / base - 1) * 100,
            "us_in_calls_per_step": statistics.median(call_samples[name]) * 1e6,
        }
    return result


def parse_size(text: str) -> tuple[int, int, int]:
    width, depth, batch = (int(x) for x in text.lower().split("x"))
    return width, depth, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-bound", type=parse_size, default=None, help="WIDTHxDEPTHxBATCH (default by device)")
    parser.add_argument("--launch-bound", type=parse_size, default=None, help="WIDTHxDEPTHxBATCH")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default="", help="comma-separated subset of rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.gpu_bound is None:
        args.gpu_bound = (2048, 10, 1024) if cuda else (256, 10, 256)
    if args.launch_bound is None:
        args.launch_bound = (64, 10, 64) if cuda else (16, 10, 8)
    if args.steps is None:
        args.steps = 200 if cuda else 100
    if not cuda:
        torch.set_num_threads(1)  # on a shared CPU, intra-op threads only add noise
    torch.manual_seed(0)

    rows: list[type[Logger]] = [NoLogging, ItemPerMetric, StackToList]
    if cuda:
        rows.append(NaiveDeferral)
    if tensorboard_available():
        rows.append(TensorBoard)
    if STEPLOG is not None:
        rows.append(Steplog)
        if not cuda:
            rows.append(SteplogForced)
    if args.rows:
        wanted = {"none", *args.rows.split(",")}
        rows = [r for r in rows if r.name in wanted]

    name = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    print(f"device: {args.device} ({name}); torch {torch.__version__}; python {platform.python_version()}")
    print(f"steplog values vs float(t.item()): {check_exact(args.device)}")
    if not cuda:
        print(f"steplog values vs float(t.item()), forced deferral: {check_exact(args.device, forced=True)}")
    print(f"steplog CPU cost: {cpu_cost(args.device)}")
    if not cuda:
        print(f"steplog CPU cost, forced deferral: {cpu_cost(args.device, forced=True)}")
    if STEPLOG is None:
        print(f"steplog rows skipped: {STEPLOG_MISSING}")
    results = [
        run_regime("GPU-bound" if cuda else "compute-bound", args.gpu_bound, args.device, rows, args),
        run_regime("launch-bound", args.launch_bound, args.device, rows, args),
    ]
    print(f"\n{args.rounds} rounds x {args.steps} steps, median ms per step (overhead vs none); command:")
    print("  python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    header = "| per step | " + " | ".join(f"{r['regime']} ({r['size']})" for r in results) + " |"
    print("\n" + header + "\n|" + " --- |" * (len(results) + 1))
    for row in rows:
        cells = []
        for r in results:
            m = r["rows"][row.name]
            if row.name == "none":
                cells.append(f"{m['ms_per_step']:.3f} ms")
            else:
                cells.append(
                    f"{m['ms_per_step']:.3f} ms ({m['overhead_pct']:+.1f} %; {m['us_in_calls_per_step']:.1f} µs in calls)"
                )
        print(f"| {row.name} | " + " | ".join(cells) + " |")
    for r in results:
        for key, value in r.items():
            if key.endswith("_blocking_reads"):
                print(f"{r['regime']}: {key} = {value}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
