"""The rank mechanism (steplog._ranks) and the integrations' shared guard, without any framework."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import steplog
from steplog._ranks import Ranks, detect_ranks
from steplog.integrations import IntegrationWarning
from steplog.integrations._common import Guard, RunHandle, flatten


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Ranks()),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, Ranks(1, 2, 1, "torchrun")),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, Ranks(3, 4, 1, "slurm")),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"}, Ranks(0, 8, 0, "openmpi")),
        ({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2"}, Ranks(5, 6, 2, "pmi")),
        # torchrun started inside a SLURM allocation: torchrun's variables describe this process
        ({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Ranks(2, 4, 0, "torchrun")),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Ranks(0, 1, 0, "slurm")),
    ],
)
def test_detect_ranks_reads_each_launcher(env: dict[str, str], expected: Ranks) -> None:
    """Each launcher's variables give rank, world size, local rank and the launcher's name; torchrun's come first."""
    assert expected == detect_ranks(env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "1"}, "WORLD_SIZE"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS"),
        ({"PMI_RANK": "-1", "PMI_SIZE": "2"}, "PMI_RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ],
)
def test_detect_ranks_refuses_a_garbled_environment(env: dict[str, str], named: str) -> None:
    """A launcher environment that is not integers or is inconsistent is refused, naming the variable."""
    with pytest.raises(steplog.InvalidValueError, match=named):
        detect_ranks(env)


def test_detect_ranks_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an argument, the process environment is read."""
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    ranks = detect_ranks()
    assert (False, True) == (ranks.is_zero, ranks.distributed)


def test_flatten_nests_with_slash() -> None:
    """Nested dicts and Namespaces flatten with '/', empty nested dicts stay as values, None is empty."""
    import argparse

    params = {"a": {"b": 1, "c": argparse.Namespace(d=2)}, "e": {}, "f": [1, 2]}
    assert {"a/b": 1, "a/c/d": 2, "e": {}, "f": [1, 2]} == flatten(params)
    assert {} == flatten(None)
    with pytest.raises(steplog.InvalidValueError, match="list"):
        flatten([1, 2])


def test_guard_maps_keys_once_and_skips_non_numbers() -> None:
    """Forbidden key characters become '_' (one warning per key), bools/str/None are skipped, ints become floats."""
    guard = Guard("Test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        first = guard.metrics({"acc(top-1)": 1, "ok": 2.5, "flag": True, "s": "x", "n": None})
        second = guard.metrics({"acc(top-1)": 3, "flag": False})
    assert {"acc_top-1_": 1.0, "ok": 2.5} == first
    assert {"acc_top-1_": 3.0} == second
    assert 4 == len(caught), [str(w.message) for w in caught]
    with pytest.warns(IntegrationWarning, match="'../x' is stored as '_/x'"):
        assert {"_/x": "1", "ok": "2"} == guard.params({"../x": 1, "ok": 2})  # a path escape is mapped, not refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {"fine/key": 1.0} == guard.metrics({"fine/key": 1.0})  # clean input: no warning


def test_importing_steplog_and_integrations_imports_no_framework() -> None:
    """`import steplog` and `import steplog.integrations` import neither torch nor any framework."""
    code = (
        "import sys, steplog, steplog.integrations, steplog._ranks\n"
        "loaded = [m for m in ('torch', 'lightning', 'transformers', 'accelerate', 'keras') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_logging_to_a_run_closed_under_the_framework_warns_instead_of_raising(tmp_path: Path) -> None:
    """A run closed behind the integration's back (e.g. by a SIGTERM handler) makes log calls warn once, not raise."""
    handle = RunHandle(Guard("Test"), "closed", tracking_uri=tmp_path / "mlruns")
    run = handle.start()
    assert run is not None
    run.close("KILLED")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrationWarning)
        handle.log_metrics({"loss": 1.0}, 1)
        handle.log_metrics({"loss": 2.0}, 2)
    assert 1 == len(caught)
    assert "closed" in str(caught[0].message)


@pytest.mark.parametrize("mode", [None, "zero", "each", "off"])
@pytest.mark.parametrize("rank", [0, 1])
def test_handle_writes_exactly_where_start_run_writes(
    mode: str | None, rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An integration's handle writes on the same ranks as start_run with the same ranks= (one mechanism)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    options = {} if mode is None else {"ranks": mode}
    handle = RunHandle(Guard("Test"), "ranks", tracking_uri=tmp_path / "mlruns", options=options)
    with steplog.start_run("ranks", tracking_uri=tmp_path / "mlruns", **options) as run:
        assert run.writes == handle.writes
    assert (rank, 2) == (handle.ranks.rank, handle.ranks.world_size)
    assert (handle.start() is not None) == handle.writes
    handle.end("FINISHED")
