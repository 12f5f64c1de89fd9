"""System metrics (``system_metrics=True``): CPU, memory, disk, network and NVIDIA GPUs, under MLflow's names.

The names and units are MLflow's own (``mlflow.system_metrics``), so MLflow's UI shows them in
its system-metrics tab: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``
(MB = 1e6 bytes), ``system/system_memory_usage_percentage``, ``system/disk_usage_percentage``,
``system/disk_usage_megabytes``, ``system/disk_available_megabytes``,
``system/network_receive_megabytes`` and ``system/network_transmit_megabytes`` (since the run
started), and per GPU ``i``: ``system/gpu_{i}_memory_usage_percentage``,
``system/gpu_{i}_memory_usage_megabytes``, ``system/gpu_{i}_utilization_percentage``,
``system/gpu_{i}_power_usage_watts``, ``system/gpu_{i}_power_usage_percentage``. With
``MLFLOW_SYSTEM_METRICS_NODE_ID`` set, the names are ``system/<node_id>/...`` as in MLflow.

A daemon thread samples every ``interval`` seconds and hands the figures to the run with a step
counter of their own (0, 1, 2, ...; continued after a resume), never touching the run's current
step and never running on the hot path. psutil is needed (``pip install 'steplog[system]'``);
GPUs are read through NVML (``nvidia-ml-py``) only when it imports and finds a GPU, and only the
GPUs ``CUDA_VISIBLE_DEVICES`` lets this process see, numbered as the process sees them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ._errors import StepLogError

__all__ = ["ENV_SWITCHES", "SystemMetrics", "enabled_by_env", "sample_names"]

log = logging.getLogger("steplog")

ENV_SWITCHES = ("STEPLOG_SYSTEM_METRICS", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
_TRUE = frozenset({"1", "true", "yes", "on"})

Emit = Callable[[dict[str, float], int], None]
"""Logs one sample: ``(metrics, system_step)``."""


def enabled_by_env() -> bool:
    """True when ``STEPLOG_SYSTEM_METRICS`` (or else ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``) says so."""
    for name in ENV_SWITCHES:
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value.strip().lower() in _TRUE
    return False


def _psutil() -> Any:
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]  # typed by types-psutil when installed
    except ImportError:
        raise StepLogError(
            "system_metrics=True needs psutil: pip install 'steplog[system]' (or turn system metrics off)"
        ) from None
    return psutil


class _Gpus:
    """The NVIDIA GPUs this process may use, through NVML; empty without nvidia-ml-py or a GPU."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: list[Any] = []
        try:
            import pynvml  # type: ignore[import-not-found,unused-ignore]  # nvidia-ml-py, optional

            pynvml.nvmlInit()
        except Exception:  # no library, no driver, no GPU: no GPU figures, as in MLflow
            return
        self.nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            return
        for item in (part.strip() for part in visible.split(",")):
            if not item:
                break
            try:
                if item.isdigit():
                    if int(item) >= count:
                        break  # CUDA stops at the first invalid entry too
                    self.handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(item)))
                else:
                    self.handles.append(pynvml.nvmlDeviceGetHandleByUUID(item))
            except Exception:
                break

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nvml = self.nvml
        for i, handle in enumerate(self.handles):
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"gpu_{i}_memory_usage_percentage"] = round(memory.used / memory.total * 100, 1)
                out[f"gpu_{i}_memory_usage_megabytes"] = memory.used / 1e6
            except Exception as exc:
                log.debug("steplog: GPU %d memory: %s", i, exc)
            try:
                out[f"gpu_{i}_utilization_percentage"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception as exc:
                log.debug("steplog: GPU %d utilization: %s", i, exc)
            try:
                power = nvml.nvmlDeviceGetPowerUsage(handle)
                limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
                out[f"gpu_{i}_power_usage_watts"] = power / 1000
                out[f"gpu_{i}_power_usage_percentage"] = power / limit * 100
            except Exception as exc:
                log.debug("steplog: GPU %d power: %s", i, exc)
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


class SystemMetrics:
    """Samples the machine every ``interval`` seconds on a daemon thread and emits MLflow-named figures."""

    def __init__(self, emit: Emit, *, interval: float = 10.0, first_step: int = 0) -> None:
        self._psutil = _psutil()
        self._emit = emit
        self._interval = interval
        self._step = first_step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: _Gpus | None = None
        node = os.environ.get("MLFLOW_SYSTEM_METRICS_NODE_ID")
        self._prefix = f"system/{node}/" if node else "system/"
        self._net0: tuple[float, float] | None = None

    def start(self) -> None:
        psutil = self._psutil
        psutil.cpu_percent()  # the first call only sets the reference point
        net = psutil.net_io_counters()
        self._net0 = (net.bytes_recv / 1e6, net.bytes_sent / 1e6) if net is not None else None
        self._gpus = _Gpus()
        self._thread = threading.Thread(target=self._loop, name="steplog-system-metrics", daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, float]:
        """One sample, under MLflow's names."""
        psutil = self._psutil
        memory = psutil.virtual_memory()
        figures: dict[str, float] = {
            "cpu_utilization_percentage": float(psutil.cpu_percent()),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
        }
        try:
            disk = psutil.disk_usage(os.sep)
            figures["disk_usage_percentage"] = float(disk.percent)
            figures["disk_usage_megabytes"] = disk.used / 1e6
            figures["disk_available_megabytes"] = disk.free / 1e6
        except OSError:
            pass
        net = psutil.net_io_counters()
        if net is not None and self._net0 is not None:
            figures["network_receive_megabytes"] = net.bytes_recv / 1e6 - self._net0[0]
            figures["network_transmit_megabytes"] = net.bytes_sent / 1e6 - self._net0[1]
        if self._gpus is not None:
            figures.update(self._gpus.sample())
        # MLflow rounds its averaged figures to one decimal and leaves the network counters as they are
        return {self._prefix + k: v if k.startswith("network_") else round(v, 1) for k, v in figures.items()}

    def _loop(self) -> None:
        pid = os.getpid()
        while not self._stop.wait(self._interval):
            if os.getpid() != pid:
                return
            try:
                self._emit(self.sample(), self._step)
            except Exception as exc:  # a closed run, a vanished disk: sampling is best effort
                log.debug("steplog: system metrics: %s", exc)
                if self._stop.is_set():
                    return
                continue
            self._step += 1

    def stop(self) -> None:
        """Stop sampling (no sample is emitted after this returns)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self._gpus is not None:
            self._gpus.close()


def sample_names(gpus: int = 0) -> list[str]:
    """MLflow's system metric names (without a node id), for ``gpus`` GPUs."""
    names = [
        "cpu_utilization_percentage",
        "system_memory_usage_megabytes",
        "system_memory_usage_percentage",
        "disk_usage_percentage",
        "disk_usage_megabytes",
        "disk_available_megabytes",
        "network_receive_megabytes",
        "network_transmit_megabytes",
    ]
    for i in range(gpus):
        names += [
            f"gpu_{i}_memory_usage_percentage",
            f"gpu_{i}_memory_usage_megabytes",
            f"gpu_{i}_utilization_percentage",
            f"gpu_{i}_power_usage_watts",
            f"gpu_{i}_power_usage_percentage",
        ]
    return [f"system/{n}" for n in names]
