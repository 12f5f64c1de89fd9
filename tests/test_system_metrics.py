"""System metrics: MLflow's names and units, sampled off the hot path with their own step counter.

Read back with MLflow's own client. NVML is replaced by a fake module at the import seam to pin the
GPU names and ``CUDA_VISIBLE_DEVICES`` (this machine has no GPU).
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog._system_metrics import SystemMetrics, enabled_by_env, sample_names

SAMPLES = 3


def wait_for_samples(run: steplog.Run, store: Path, count: int) -> None:
    """Flush until the sampler has logged ``count`` samples (bounded)."""
    reader = steplog.Store(store)
    deadline = time.monotonic() + 30
    while True:
        run.flush()
        key = "system/cpu_utilization_percentage"
        if key in reader.metric_keys(run.run_id) and len(reader.metric_history(run.run_id, key)) >= count:
            return
        assert time.monotonic() < deadline, "no system metrics were logged"
        time.sleep(0.05)


def test_system_metrics_appear_under_mlflows_names(tmp_path: Path) -> None:
    """Every CPU/memory/disk/network figure under MLflow's name, steps 0, 1, 2, ...; the run's own step untouched."""
    import mlflow

    store = tmp_path / "mlruns"
    with steplog.start_run("e", tracking_uri=store, system_metrics=True, system_metrics_interval=0.1) as run:
        run.log_metric("loss", 1.0, step=1000)
        wait_for_samples(run, store, SAMPLES)
        run.log_metric("loss", 2.0)  # step=None: still the run's step, not the sampler's
    client = mlflow.MlflowClient(str(store))
    logged = {k for k in client.get_run(run.run_id).data.metrics if k.startswith("system/")}
    assert logged == set(sample_names())
    cpu = client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in cpu] == list(range(len(cpu)))
    memory = client.get_metric_history(run.run_id, "system/system_memory_usage_percentage")
    assert all(0 < m.value <= 100 for m in memory)
    megabytes = client.get_metric_history(run.run_id, "system/system_memory_usage_megabytes")
    import psutil

    assert all(0 < m.value <= psutil.virtual_memory().total / 1e6 for m in megabytes)  # MB = 1e6 bytes, as MLflow
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1000, 1.0), (1000, 2.0)]


def test_a_resumed_run_continues_the_system_step(tmp_path: Path) -> None:
    """After a resume the sampler's counter goes on from the run's last system step (as MLflow does)."""
    store = tmp_path / "mlruns"
    options: dict[str, Any] = {"system_metrics": True, "system_metrics_interval": 0.1}
    with steplog.start_run("e", tracking_uri=store, **options) as run:
        run.log_metric("loss", 1.0, step=3)
        wait_for_samples(run, store, 2)
    first = len(steplog.Store(store).metric_history(run.run_id, "system/cpu_utilization_percentage"))
    with steplog.start_run("e", tracking_uri=store, run_id=run.run_id, **options) as again:
        wait_for_samples(again, store, first + 2)
        again.log_metric("loss", 2.0)
    steps = list(steplog.Store(store).metric_history(run.run_id, "system/cpu_utilization_percentage").steps)
    assert steps == list(range(len(steps)))
    assert list(steplog.Store(store).metric_history(run.run_id, "loss").steps) == [3, 3]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, False),
        ({"STEPLOG_SYSTEM_METRICS": "1"}, True),
        ({"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"}, True),
        ({"STEPLOG_SYSTEM_METRICS": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"}, False),
    ],
)
def test_environment_switches(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: bool) -> None:
    """STEPLOG_SYSTEM_METRICS wins over MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING; neither set means off."""
    for name in ("STEPLOG_SYSTEM_METRICS", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert enabled_by_env() is expected


def fake_nvml(count: int) -> types.ModuleType:
    """A stand-in for pynvml: GPU i reports i GB used of 10, 10*i % utilization, 100 W of a 200 W limit."""
    module = types.ModuleType("pynvml")

    class Handle:
        def __init__(self, index: int) -> None:
            self.index = index

    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = Handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByUUID = lambda uuid: Handle(int(uuid.rsplit("-", 1)[1]))  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h.index * 1e9, total=10e9)  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * h.index)  # type: ignore[attr-defined]
    module.nvmlDeviceGetPowerUsage = lambda h: 100_000  # type: ignore[attr-defined]
    module.nvmlDeviceGetEnforcedPowerLimit = lambda h: 200_000  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(("visible", "physical"), [(None, [0, 1, 2, 3]), ("2,0", [2, 0]), ("GPU-x-3", [3]), ("", [])])
def test_gpus_follow_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, physical: list[int]
) -> None:
    """Only the GPUs CUDA_VISIBLE_DEVICES shows, numbered as the process sees them, under MLflow's GPU names."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(4))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    sampler = SystemMetrics(lambda metrics, step: None, interval=60)
    sampler.start()
    try:
        sample = sampler.sample()
    finally:
        sampler.stop()
    gpu = {k: v for k, v in sample.items() if "gpu_" in k}
    assert set(gpu) == set(sample_names(len(physical))) - set(sample_names(0))
    for i, index in enumerate(physical):
        assert gpu[f"system/gpu_{i}_memory_usage_megabytes"] == index * 1000.0
        assert gpu[f"system/gpu_{i}_utilization_percentage"] == 10.0 * index
        assert gpu[f"system/gpu_{i}_power_usage_watts"] == 100.0
        assert gpu[f"system/gpu_{i}_power_usage_percentage"] == 50.0
