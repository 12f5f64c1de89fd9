"""The ``steplog`` command's runs, show, plot and tail, each run as a subprocess as a user would.

Stores come from steplog and from MLflow's own client. Errors a user can make (a wrong run
id, an ambiguous prefix, a missing store, a missing extra) must be one line on stderr with
a non-zero status and no traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import steplog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m steplog ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "steplog", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        timeout=60,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without tracking-URI variables (so --uri defaults are what a test sets)."""
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    env.update(extra)
    return env


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failed command: non-zero status, one stderr line naming the problem, no traceback."""
    assert 0 != result.returncode, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{"steplog": (root, ids), "mlflow": (root, ids)}``: two stores with a few finished runs."""
    base = tmp_path_factory.mktemp("cli")
    ours = base / "steplog"
    ids: dict[str, str] = {}
    for name, scale in (("baseline", 1.0), ("wide", 0.8)):
        with steplog.start_run("mnist", run_name=name, tracking_uri=ours) as run:
            run.log_params({"lr": 0.001 * scale, "batch_size": 64})
            run.set_tags({"model": name})
            for step in range(300):
                run.log_metrics({"train/loss": scale / (step + 1), "acc": 1 - scale / (step + 2)}, step=step)
        ids[name] = run.run_id
    theirs = base / "mlflow"
    client = MlflowClient(tracking_uri=theirs.as_uri())
    exp = client.create_experiment("mlflow-exp")
    their_run = client.create_run(exp, run_name="from-mlflow")
    run_id = their_run.info.run_id
    client.log_batch(run_id, [Metric("loss", 2.0 / (s + 1), 1_700_000_000_000 + s, s) for s in range(100)])
    client.log_param(run_id, "optimizer", "sgd")
    client.set_terminated(run_id, status="FAILED")
    return {"steplog": (ours, ids), "mlflow": (theirs, {"from-mlflow": run_id})}


def test_version_and_help() -> None:
    """--version prints the version; --help works for the command and each subcommand."""
    result = cli("--version")
    assert (0, f"steplog {steplog.__version__}") == (result.returncode, result.stdout.strip())
    for command in ("runs", "show", "plot", "tail"):
        result = cli(command, "--help")
        assert (0, "") == (result.returncode, result.stderr)
        assert f"usage: steplog {command}" in result.stdout


def test_runs_lists_both_kinds_of_store(stores: dict[str, Any]) -> None:
    """`steplog runs` shows id prefix, name, experiment, status and latest metrics for steplog's and MLflow's runs."""
    root, ids = stores["steplog"]
    result = cli("runs", "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    header, *rows = result.stdout.splitlines()
    assert ["ID", "NAME", "EXPERIMENT", "STATUS", "START", "DURATION", "acc", "train/loss"] == header.split()
    assert 2 == len(rows)
    by_name = {row.split()[1]: row.split() for row in rows}
    assert [ids["wide"][:8], "wide", "mnist", "FINISHED"] == by_name["wide"][:4]
    assert ["0.997342", "0.00266667"] == by_name["wide"][-2:]  # 1 - 0.8/301, 0.8/300
    root, ids = stores["mlflow"]
    result = cli("runs", "--uri", root.as_uri(), "--status", "failed", "--experiment", "mlflow-exp")
    assert 0 == result.returncode, result.stderr
    row = result.stdout.splitlines()[1].split()
    assert [ids["from-mlflow"][:8], "from-mlflow", "mlflow-exp", "FAILED"] == row[:4]
    assert "0.02" == row[-1]


def test_runs_filters_and_defaults(stores: dict[str, Any], tmp_path: Path) -> None:
    """--status filters; the store defaults to STEPLOG_TRACKING_URI, then ./mlruns, as start_run does."""
    root, _ids = stores["steplog"]
    result = cli("runs", "--status", "RUNNING", env=clean_env(STEPLOG_TRACKING_URI=str(root)))
    assert (0, f"no RUNNING runs in {root}") == (result.returncode, result.stdout.strip())
    shutil.copytree(root, tmp_path / "mlruns")
    result = cli("runs", "-m", "acc", cwd=tmp_path)
    assert 0 == result.returncode, result.stderr
    assert ["ID", "NAME", "EXPERIMENT", "STATUS", "START", "DURATION", "acc"] == result.stdout.splitlines()[0].split()


def test_show_prints_params_tags_and_metrics(stores: dict[str, Any]) -> None:
    """`steplog show PREFIX` prints status, params, tags, and latest value, step and count per metric."""
    root, ids = stores["steplog"]
    result = cli("show", ids["baseline"][:6], "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    lines = result.stdout.splitlines()
    assert f"run         {ids['baseline']}" == lines[0]
    assert "status      FINISHED" in lines
    assert "  lr          0.001" in lines
    assert "  model               baseline" in lines
    start = lines.index("metrics (2):") + 2
    metrics = {line.split()[0]: line.split()[1:] for line in lines[start : lines.index("", start)]}
    assert {"acc": ["0.996678", "299", "300"], "train/loss": ["0.00333333", "299", "300"]} == metrics
    assert "artifacts: none" == lines[-1]
    root, ids = stores["mlflow"]
    result = cli("show", ids["from-mlflow"], "--uri", root)
    assert 0 == result.returncode, result.stderr
    assert "status      FAILED" in result.stdout.splitlines()
    assert ["loss", "0.02", "99", "100"] == result.stdout.splitlines()[-3].split()


def test_user_mistakes_are_one_line_errors(stores: dict[str, Any], tmp_path: Path) -> None:
    """A wrong id, an ambiguous prefix, a missing store, an unknown experiment: one line, non-zero, no traceback."""
    root, ids = stores["steplog"]
    assert_one_line_error(cli("show", "zzzz", "--uri", root), "steplog show: error: no run with id 'zzzz'")
    twin = tmp_path / "mlruns"
    shutil.copytree(root, twin)
    run_dir = next(twin.glob(f"*/{ids['baseline']}"))
    twin_id = ids["baseline"][:5] + "f" * 27
    shutil.copytree(run_dir, run_dir.parent / twin_id)
    meta = run_dir.parent / twin_id / "meta.yaml"
    meta.write_text(meta.read_text().replace(ids["baseline"], twin_id))
    assert_one_line_error(cli("show", ids["baseline"][:5], "--uri", twin), "ambiguous", "give more characters")
    assert_one_line_error(cli("runs", cwd=tmp_path / "mlruns"), "no MLflow store at", "--uri")
    assert_one_line_error(cli("runs", "--uri", root, "--experiment", "nope"), "no experiment named 'nope'")
    assert_one_line_error(cli("tail", "zzzz", "--uri", root), "no run with id 'zzzz'")


def test_plot_writes_a_real_png(stores: dict[str, Any], tmp_path: Path) -> None:
    """`steplog plot RUN RUN KEY KEY -o out.png` writes a PNG of a real chart: two panels, both runs."""
    root, ids = stores["steplog"]
    out = tmp_path / "loss.png"
    result = cli("plot", ids["baseline"][:8], ids["wide"][:8], "train/loss", "acc", "-o", out, "--smooth", "10",
                 "--uri", root)  # fmt: skip
    assert (0, "") == (result.returncode, result.stderr)
    data = out.read_bytes()
    assert PNG_SIGNATURE == data[:8]
    height, width, _channels = matplotlib.image.imread(out).shape
    assert f"wrote {out} (2 runs, 2 panels, {width}x{height} px)" == result.stdout.strip()
    assert width >= 800
    assert height >= 500
    assert len(data) > 30_000


def test_plot_by_time_from_an_mlflow_store(stores: dict[str, Any], tmp_path: Path) -> None:
    """--x time plots an MLflow-written run against time since its start."""
    root, ids = stores["mlflow"]
    out = tmp_path / "t.png"
    result = cli("plot", ids["from-mlflow"][:8], "loss", "-o", out, "--x", "time", "--uri", root)
    assert 0 == result.returncode, result.stderr
    assert PNG_SIGNATURE == out.read_bytes()[:8]
    assert out.stat().st_size > 10_000


def test_plot_argument_mistakes(stores: dict[str, Any], tmp_path: Path) -> None:
    """A key no run has, a word that is neither run nor key, no key at all: one-line errors listing the metrics."""
    root, ids = stores["steplog"]
    out = tmp_path / "x.png"
    assert_one_line_error(cli("plot", ids["wide"][:8], "-o", out, "--uri", root), "no metric key given", "acc")
    assert_one_line_error(
        cli("plot", ids["wide"][:8], "los", "-o", out, "--uri", root), "'los' is neither a metric", "train/loss"
    )
    assert_one_line_error(
        cli("plot", ids["wide"][:8], "-k", "nope", "-o", out, "--uri", root), "no run given has a metric 'nope'"
    )
    assert not out.exists()


def test_missing_extras_are_named(stores: dict[str, Any], tmp_path: Path) -> None:
    """Without matplotlib, plot says to install steplog[plot]; without rich, a rich tail says steplog[tail]."""
    root, ids = stores["steplog"]
    blocked = textwrap.dedent(
        """
        import sys
        for name in sys.argv[1].split(","):
            sys.modules[name] = None  # as if not installed
        from steplog.cli import main
        sys.exit(main(sys.argv[2:]))
        """
    )
    args = ["plot", ids["wide"], "acc", "-o", str(tmp_path / "x.png"), "--uri", str(root)]
    result = subprocess.run([sys.executable, "-c", blocked, "matplotlib,matplotlib.figure", *args],
                            capture_output=True, text=True, env=clean_env(), timeout=60)  # fmt: skip
    assert_one_line_error(result, "pip install 'steplog[plot]'")
    args = ["tail", ids["wide"], "--rich", "--uri", str(root)]
    result = subprocess.run([sys.executable, "-c", blocked, "rich", *args],
                            capture_output=True, text=True, env=clean_env(), timeout=60)  # fmt: skip
    assert_one_line_error(result, "pip install 'steplog[tail]'")


def test_tail_prints_the_latest_values(stores: dict[str, Any]) -> None:
    """`steplog tail RUN` into a pipe prints plain lines; --rich prints the same figures as a table."""
    root, ids = stores["steplog"]
    result = cli("tail", ids["baseline"][:8], "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"run {ids['baseline']} (baseline): FINISHED")
    assert ["acc", "0.996678", "299", "300"] == lines[2].split()[:4]
    result = cli("tail", ids["baseline"][:8], "--uri", root, "--rich")
    assert 0 == result.returncode, result.stderr
    assert "FINISHED" in result.stdout
    assert "0.00333333" in result.stdout


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a child if it still runs, reap it and close its pipes (no process or file left behind)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    import steplog

    root, gate = sys.argv[1], pathlib.Path(sys.argv[2])
    with steplog.start_run("live", run_name="slow", tracking_uri=root) as run:
        for step in range(3):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.flush()
        print(run.run_id, flush=True)
        while not gate.exists():          # hold the run open until the test has seen it RUNNING
            time.sleep(0.02)
        for step in range(3, 30):          # a run that keeps writing, slowly
            run.log_metric("loss", 1.0 / (step + 1), step=step)
            run.flush()
            time.sleep(0.01)
    """
)


@pytest.mark.slow
def test_tail_follow_tracks_a_live_run_until_it_ends(tmp_path: Path) -> None:
    """`tail --follow` on a run still writing prints new values as they land and exits when the run ends."""
    root, gate = tmp_path / "mlruns", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(gate)], stdout=subprocess.PIPE, text=True,
                              env=clean_env())  # fmt: skip
    tail = None
    try:
        assert writer.stdout is not None
        run_id = writer.stdout.readline().strip()
        tail = subprocess.Popen(
            [sys.executable, "-m", "steplog", "tail", run_id[:8], "--follow", "--interval", "0.05", "--uri", root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert tail.stdout is not None
        first = tail.stdout.readline()
        assert first.startswith(f"run {run_id} (slow): RUNNING"), first
        gate.touch()
        out = tail.stdout.read()  # not communicate(): it would skip what readline() buffered
        assert tail.stderr is not None
        err = tail.stderr.read()
        assert (0, "") == (tail.wait(timeout=60), err)
        lines = out.splitlines()
        assert ["loss", "0.333333", "2", "3"] == lines[1].split()[:4]  # the table under the header
        assert "loss  step 29  0.0333333  (30 points)" == lines[-2].split("  ", 1)[1]
        assert lines[-1].startswith(f"run {run_id[:8]} ended: FINISHED")
        assert 0 == writer.wait(timeout=60)
    finally:
        for proc in (writer, tail):
            if proc is not None:
                stop(proc)


@pytest.mark.slow
def test_tail_follow_stops_quietly_on_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) ends `tail --follow` with status 0 and no traceback while the run goes on."""
    root = tmp_path / "mlruns"
    run = steplog.start_run("live", tracking_uri=root)
    tail = None
    try:
        run.log_metric("loss", 1.0, step=0)
        run.flush()
        tail = subprocess.Popen(
            [sys.executable, "-m", "steplog", "tail", run.run_id, "--follow", "--interval", "0.05", "--uri", root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert tail.stdout is not None
        assert tail.stdout.readline().startswith(f"run {run.run_id} ")
        tail.send_signal(signal.SIGINT)
        _out, err = tail.communicate(timeout=30)
        assert (0, "") == (tail.returncode, err)
    finally:
        run.close()
        if tail is not None:
            stop(tail)


def test_smoothing_is_a_centred_mean_that_skips_nan() -> None:
    """--smooth's moving average is centred (no lag), cut short at the ends, and leaves NaN points out."""
    import numpy as np

    from steplog._cli.plot import _moving_average

    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    assert [0.5, 1.0, 2.0, 3.0, 3.5, 5.0, 6.0] == _moving_average(np, y, 3).tolist()
    assert [0.0, 1.0, 2.0] == _moving_average(np, np.array([0.0, 1.0, 2.0]), 1).tolist()


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A store with an older run and a newer one whose keys end in numbers, and two artifacts: (root, old, new)."""
    root = tmp_path_factory.mktemp("numbered") / "mlruns"
    with steplog.start_run("layers", run_name="old", tracking_uri=root, handle_signals=False) as old:
        old.log_metric("loss", 1.0, step=0)
    with steplog.start_run("layers", run_name="new", tracking_uri=root, handle_signals=False) as new:
        for step in range(3):
            new.log_metrics({f"grad_norm/{i}": i + step for i in (10, 2, 1)} | {"loss": 1.0 / (step + 1)}, step=step)
        new.log_text("x" * 1500, "notes/readme.txt")
        new.log_dict({"a": 1}, "config.json")
    return root, old.run_id, new.run_id


def test_show_sorts_keys_naturally_and_lists_artifacts(numbered: tuple[Path, str, str]) -> None:
    """`steplog show` lists grad_norm/2 before grad_norm/10, then the run's artifact files with their sizes."""
    root, _old, new = numbered
    result = cli("show", new, "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    lines = result.stdout.splitlines()
    start = lines.index("metrics (4):") + 2
    keys = [line.split()[0] for line in lines[start : lines.index("", start)]]
    assert ["grad_norm/1", "grad_norm/2", "grad_norm/10", "loss"] == keys
    artifacts = lines[lines.index("", start) + 1 :]
    config_size = next(root.glob(f"*/{new}/artifacts/config.json")).stat().st_size
    assert f"artifacts (2 files, {(1500 + config_size) / 1000:.1f} kB):" == artifacts[0]
    assert ["PATH", "SIZE"] == artifacts[1].split()
    assert ["config.json", str(config_size), "B"] == artifacts[2].split()
    assert ["notes/readme.txt", "1.5", "kB"] == artifacts[3].split()


def test_latest_names_the_newest_run(numbered: tuple[Path, str, str], tmp_path: Path) -> None:
    """`latest` stands for the newest run in show, tail and plot."""
    root, _old, new = numbered
    result = cli("show", "latest", "--uri", root)
    assert (0, f"run         {new}") == (result.returncode, result.stdout.splitlines()[0])
    result = cli("tail", "latest", "--uri", root)
    assert 0 == result.returncode, result.stderr
    assert result.stdout.startswith(f"run {new} (new): FINISHED")
    out = tmp_path / "latest.png"
    result = cli("plot", "latest", "loss", "-o", out, "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    assert PNG_SIGNATURE == out.read_bytes()[:8]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("show", "latest", "--uri", empty), "no runs in", "latest")


def test_plot_takes_shell_style_patterns(numbered: tuple[Path, str, str], tmp_path: Path) -> None:
    """`steplog plot RUN 'grad_norm/*'` plots each matching key (one panel each); one matching none is an error."""
    root, _old, new = numbered
    out = tmp_path / "grads.png"
    result = cli("plot", new[:8], "grad_norm/*", "-o", out, "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    assert "(1 run, 3 panels," in result.stdout
    result = cli("plot", new[:8], "-k", "grad_norm/[12]", "-k", "loss", "-o", out, "--uri", root)
    assert (0, "") == (result.returncode, result.stderr)
    assert "(1 run, 3 panels," in result.stdout
    assert_one_line_error(
        cli("plot", new[:8], "acc/*", "-o", tmp_path / "none.png", "--uri", root),
        "pattern 'acc/*' matches no metric",
        "grad_norm/2, grad_norm/10",
    )
    assert not (tmp_path / "none.png").exists()


def test_bench_from_an_installed_wheel_says_to_run_from_a_checkout(tmp_path: Path) -> None:
    """Installed without its source tree (as from a wheel), `steplog bench` is a one-line error naming `make bench`."""
    site = tmp_path / "site-packages"
    shutil.copytree(Path(steplog.__file__).parent, site / "steplog", ignore=shutil.ignore_patterns("__pycache__"))
    env = clean_env(PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-m", "steplog", "bench", "--quick"], capture_output=True, text=True, env=env, timeout=60
    )
    assert 2 == result.returncode
    assert_one_line_error(
        result, "steplog bench: error: steplog bench needs the source checkout", "run from a checkout: make bench"
    )
    assert str(site / "steplog") in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "steplog", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert "(source checkout only: make bench)" in " ".join(result.stdout.split())
