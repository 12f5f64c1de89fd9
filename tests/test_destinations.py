"""Where a run writes (``_destinations.py``): tracking URIs, refused words and schemes, no destination, redaction."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import steplog
from steplog import InvalidValueError
from steplog._destinations import Options, make_sinks, redact_uri
from steplog.testing import MemorySink

SUPPORTED = re.escape("is not supported: use a directory path, a file: URI, http(s)://host:port")


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory with no tracking URI in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "databricks",
        "Databricks",
        "databricks-uc",
        "uc",
        "databricks://my-profile",
        "databricks-uc://profile",
        "uc:catalog",
        "s3://bucket/mlruns",
        "postgresql://u@h/db",
        "mlflow-artifacts:/x",
        "steplog+file:///tmp/mlruns",
    ],
)
def test_words_and_schemes_mlflow_gives_a_meaning_are_refused(uri: str, empty_cwd: Path) -> None:
    """A word or scheme MLflow reads as a destination steplog does not serve is refused; nothing is created."""
    with pytest.raises(InvalidValueError, match=SUPPORTED):
        steplog.start_run("e", tracking_uri=uri)
    assert [] == os.listdir(empty_cwd)


def test_a_refused_uri_from_the_environment_says_so(empty_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused URI taken from MLFLOW_TRACKING_URI names the variable, so the user knows where to fix it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
    with pytest.raises(InvalidValueError, match=r"'databricks' \(from \$MLFLOW_TRACKING_URI\) is not supported"):
        steplog.start_run("e")
    assert [] == os.listdir(empty_cwd)


def test_sqlite_writes_mlflows_database_in_the_current_directory(empty_cwd: Path) -> None:
    """``sqlite:///mlflow.db`` is MLflow's database, relative to the current directory (not a folder named sqlite:)."""
    with steplog.start_run("e", tracking_uri="sqlite:///mlflow.db") as run:
        run.log_metric("m", 1.0, step=0)
    assert "mlflow.db" in os.listdir(empty_cwd)
    assert not any(name.startswith("sqlite") for name in os.listdir(empty_cwd))


@pytest.mark.parametrize("uri", ["runs", "./runs", "runs/sub", "./a:b"])
def test_a_bare_relative_path_stays_a_directory(uri: str, empty_cwd: Path) -> None:
    """A relative path (a colon after a slash is no URI scheme) is a local store, as MLflow reads it."""
    with steplog.start_run("e", tracking_uri=uri) as run:
        run.log_metric("x", 1.0)
    assert [1.0] == steplog.Store(empty_cwd / uri).metric_history(run.run_id, "x").values


@pytest.mark.parametrize("kwargs", [{"sinks": []}, {"tracking_uri": []}, {"tracking_uri": [], "sinks": []}])
def test_no_destination_at_all_is_a_clear_error(kwargs: dict[str, object], empty_cwd: Path) -> None:
    """``sinks=[]`` (or an empty list of tracking URIs) is refused at start, not a raw IndexError in the writer."""
    with pytest.raises(InvalidValueError, match="no destination to write to"):
        steplog.start_run("e", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://admin:pw@host/db", "postgresql://admin:***@host/db"),
        ("http://u:p#ss@host:5000", "http://u:***@host:5000"),
        ("http://u:p?ss@host:5000/x", "http://u:***@host:5000/x"),
        ("http://u:p/ss@host:5000", "http://u:***@host:5000"),
        ("https://u:p@ss@host:5000", "https://u:***@host:5000"),
        ("https://u:p%40ss@host", "https://u:***@host"),
        ("http://user@host:5000", "http://user@host:5000"),
        ("http://host:5000/path", "http://host:5000/path"),
        ("./mlruns", "./mlruns"),
        ("file:///tmp/a@b", "file:///tmp/a@b"),
    ],
)
def test_redact_uri_hides_every_password(uri: str, shown: str) -> None:
    """A userinfo password becomes *** whatever it holds (``#``, ``?``, ``/``, ``@``); other URIs are unchanged."""
    assert shown == redact_uri(uri)


def test_an_unsupported_uri_never_shows_its_password(empty_cwd: Path) -> None:
    """The error for an unsupported database URI names it without its password."""
    with pytest.raises(InvalidValueError) as caught:
        steplog.start_run("e", tracking_uri="postgresql://admin:s3cr#t/x@db.example/mlflow")
    assert "s3cr" not in str(caught.value)
    assert "postgresql://admin:***@db.example/mlflow" in str(caught.value)


def test_the_description_of_a_server_hides_its_password(empty_cwd: Path) -> None:
    """What ``repr(run)`` shows for a tracking server never holds the URL's password."""
    chosen = make_sinks(["http://admin:pa#ss@127.0.0.1:5000", "runs"], [MemorySink()], Options())
    assert "http://admin:***@127.0.0.1:5000 + runs + MemorySink" == chosen.where
    assert ["MlflowRestSink", "MlrunsSink", "MemorySink"] == [type(s).__name__ for s in chosen.sinks]


def test_repr_of_a_run_writing_only_to_a_sink_names_the_sink(empty_cwd: Path) -> None:
    """``repr(run)`` of a run writing only to a MemorySink says so, not ``at ./mlruns``."""
    with steplog.start_run("e", sinks=[MemorySink()]) as run:
        text = repr(run)
    assert text.endswith(" running at MemorySink>"), text
    assert not (empty_cwd / "mlruns").exists()


def test_repr_of_a_run_writing_to_a_store_and_a_sink_names_both(empty_cwd: Path) -> None:
    """``repr(run)`` names every destination: the store as given, then the extra sinks."""
    with steplog.start_run("e", tracking_uri="runs", sinks=[MemorySink()]) as run:
        text = repr(run)
    assert f"<steplog.Run {run.run_id} running at runs + MemorySink>" == text


@pytest.mark.parametrize("value", ["no", 0, 1, "False"])
def test_handle_signals_takes_only_true_false_or_none(value: object) -> None:
    """A truthy string such as "no" would install the signal handlers by mistake: refused, naming the choices."""
    with pytest.raises(InvalidValueError, match="handle_signals must be True, False or None"):
        steplog.start_run("e", sinks=[MemorySink()], handle_signals=value)


def test_steplog_handle_signals_zero_keeps_the_handlers_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """STEPLOG_HANDLE_SIGNALS=0 installs no SIGTERM handler (for runs started by code the user does not write);
    a garbled value is refused naming the variable."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("STEPLOG_HANDLE_SIGNALS", "0")
    with steplog.start_run("e", sinks=[MemorySink()]):
        assert before is signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("STEPLOG_HANDLE_SIGNALS", "maybe")
    with pytest.raises(InvalidValueError, match="STEPLOG_HANDLE_SIGNALS"):
        steplog.start_run("e", sinks=[MemorySink()])
