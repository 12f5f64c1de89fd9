"""Reading a tracking server over REST (``--uri http://...``): ``runs``, ``show``, ``plot`` and ``tail`` as for a store.

Runs are logged to a real ``mlflow server`` by steplog's REST sink and read back by the
commands; a fake transport plays hostile servers (an HTML page, a malformed answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import steplog
from steplog._cli import main as cli_main
from steplog._rest_reader import RestStore
from steplog.store import StoreError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(mlflow_server: Any) -> tuple[str, str, str]:
    """Two runs on the server (an older and a newer with numbered keys and an artifact): (url, old id, new id)."""
    url = mlflow_server.url
    with steplog.start_run("rest-read", run_name="old", tracking_uri=url, handle_signals=False) as old:
        old.log_metric("loss", 2.0, step=0)
    with steplog.start_run("rest-read", run_name="new", tracking_uri=url, handle_signals=False) as new:
        new.log_params({"lr": 0.01})
        for step in range(5):
            new.log_metrics({"grad_norm/10": step * 10.0, "grad_norm/2": step * 2.0, "loss": 1 / (step + 1)}, step=step)
        new.log_text("y" * 2500, "report.txt")
    return url, old.run_id, new.run_id


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    status = cli_main(list(args))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


@pytest.mark.server
def test_runs_lists_the_servers_runs(served: tuple[str, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`steplog runs --uri http://...` lists the server's runs newest first, with latest metric values."""
    url, old, new = served
    status, out, err = run_cli(capsys, "runs", "--uri", url, "--experiment", "rest-read")
    assert (0, "") == (status, err)
    assert ["ID", "NAME", "EXPERIMENT", "STATUS"] == out[0].split()[:4]
    assert [new[:8], "new", "rest-read", "FINISHED"] == out[1].split()[:4]
    assert [old[:8], "old", "rest-read", "FINISHED"] == out[2].split()[:4]
    status, out, _err = run_cli(capsys, "runs", "--uri", url, "--experiment", "rest-read", "--status", "running")
    assert (0, [f"no RUNNING runs in experiment 'rest-read' of {url}"]) == (status, out)


@pytest.mark.server
def test_show_reads_a_run_from_the_server(served: tuple[str, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`steplog show latest --uri http://...`: params, metrics in natural order with counts, artifacts with sizes."""
    url, _old, new = served
    status, out, err = run_cli(capsys, "show", "latest", "--uri", url)
    assert (0, "") == (status, err)
    assert f"run         {new}" == out[0]
    assert "  lr  0.01" in out
    start = out.index("metrics (3):") + 2
    rows = [line.split() for line in out[start : out.index("", start)]]
    assert [["grad_norm/2", "8", "4", "5"], ["grad_norm/10", "40", "4", "5"], ["loss", "0.2", "4", "5"]] == rows
    assert "artifacts (1 file, 2.5 kB):" == out[-3]
    assert [["PATH", "SIZE"], ["report.txt", "2.5", "kB"]] == [line.split() for line in out[-2:]]
    status, out, err = run_cli(capsys, "show", new[:10], "--uri", url)
    assert (0, f"run         {new}") == (status, out[0])


@pytest.mark.server
def test_plot_and_tail_read_the_server(
    served: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plot` draws a pattern's keys from the server's histories; `tail` prints the latest values and counts."""
    url, old, new = served
    image = tmp_path / "grads.png"
    status, out, err = run_cli(capsys, "plot", new, old, "grad_norm/*", "loss", "-o", str(image), "--uri", url)
    notes = [f"note: run {old[:8]} has no metric 'grad_norm/2'", f"note: run {old[:8]} has no metric 'grad_norm/10'"]
    assert (0, notes) == (status, err.splitlines())
    assert "(2 runs, 3 panels," in out[0]
    assert PNG_SIGNATURE == image.read_bytes()[:8]
    status, out, err = run_cli(capsys, "tail", new, "--uri", url)
    assert (0, "") == (status, err)
    assert out[0].startswith(f"run {new} (new): FINISHED")
    assert [["grad_norm/2", "8", "4", "5"], ["grad_norm/10", "40", "4", "5"], ["loss", "0.2", "4", "5"]] == [
        line.split()[:4] for line in out[2:]
    ]


@pytest.mark.server
def test_mistakes_against_a_server_are_one_line(
    served: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown run id on a server, and a server that is not there: one line each, no traceback."""
    url, _old, _new = served
    status, _out, err = run_cli(capsys, "show", "zzzz", "--uri", url)
    assert (1, f"steplog show: error: no run with id 'zzzz' on {url} (list them with `steplog runs --uri ...`)\n") == (
        status,
        err,
    )
    status, _out, err = run_cli(capsys, "runs", "--uri", "http://127.0.0.1:9")
    assert 1 == status
    assert err.startswith("steplog runs: error: cannot reach the tracking server at http://127.0.0.1:9")
    assert 1 == len(err.splitlines())


def test_a_page_that_is_not_mlflows_is_named() -> None:
    """A server answering HTML (a proxy's login page) is an error naming the status, content type and first line."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, text="<!doctype html>\n<p>Sign in</p>")

    with (
        RestStore("http://proxy.example", transport=httpx.MockTransport(handler)) as store,
        pytest.raises(StoreError) as info,
    ):
        store.experiments()
    assert (
        "http://proxy.example did not answer experiments/search as an MLflow tracking server does: HTTP 200, "
        "text/html, '<!doctype html>'"
    ) == str(info.value)


def test_malformed_answers_are_errors_not_crashes() -> None:
    """A run without an id, a point without a timestamp, a repeating page token: StoreError, never a raw exception."""
    answers: dict[str, Any] = {
        "/api/2.0/mlflow/runs/get": {"run": {"info": {"experiment_id": "1"}}},
        "/api/2.0/mlflow/experiments/search": {"experiments": [], "next_page_token": "same"},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answers[request.url.path])

    store = RestStore("http://hostile.example", transport=httpx.MockTransport(handler))
    with pytest.raises(StoreError, match="malformed run_id"):
        store.get_run("abc")
    with pytest.raises(StoreError, match="page token that repeats"):
        store.experiments()
    answers["/api/2.0/mlflow/runs/get"] = {
        "run": {"info": {"run_id": "abc", "experiment_id": "1"}, "data": {"metrics": [{"key": "x", "value": 1}]}}
    }
    with pytest.raises(StoreError, match="malformed metric point"):
        store.get_run("abc")
    with pytest.raises(StoreError, match="is not a run id"):
        store.get_run("../../etc")
    store.close()


@pytest.mark.server
def test_store_of_a_server_url_reads_the_server(served: tuple[str, str, str]) -> None:
    """`steplog.Store("http://host:port")` is a read-only REST reader with Store's methods, as the CLI uses it."""
    url, old, new = served
    store = steplog.Store(url)
    try:
        assert isinstance(store, RestStore)
        assert [new, old] == [r.run_id for r in store.runs("rest-read")]
        run = store.get_run(new[:10])
        assert {"lr": "0.01"} == run.params
        assert [0, 1, 2, 3, 4] == store.metric_history(run, "grad_norm/2").steps
        assert 0.2 == store.get_run(new).latest["loss"].value
        assert store.alive(new) is None  # a server has no heartbeat to read
        with pytest.raises(StoreError, match="no run with id 'zzzz'"):
            store.alive("zzzz")
    finally:
        store.close()
