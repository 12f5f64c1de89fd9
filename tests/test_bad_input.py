"""Bad input is refused at the call with a typed error naming the key and the rule; nothing is written for it.

One table of bad calls runs through the sync face (one run per case, checking the files on disk
after each) and the async face (the whole table in one run). After each refusal the run goes
on, and nothing ever appears outside the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import steplog
from steplog import InvalidKeyError, InvalidValueError, ParamChangedError, Store

Call = Callable[[steplog.Run, Path], object]
KEY, VALUE = (InvalidKeyError, ValueError), (InvalidValueError, ValueError, TypeError)

# (id, the bad call, the error types it must be, substrings of the message: the key and the rule)
CASES: list[tuple[str, Call, tuple[type[BaseException], ...], tuple[str, ...]]] = [
    ("key-empty", lambda r, d: r.log_metric("", 1.0), KEY, ("metric key ''", "may not be empty")),
    ("key-too-long", lambda r, d: r.log_metric("k" * 251, 1.0), KEY, ("at most 250 characters", "got 251")),
    ("key-dotdot-segment", lambda r, d: r.log_metric("a/../b", 1.0), KEY, ("'a/../b'", "'..' segments")),
    ("key-dotdot-start", lambda r, d: r.log_metric("../b", 1.0), KEY, ("'../b'", "may not start with '..'")),
    ("key-absolute", lambda r, d: r.log_metric("/etc/x", 1.0), KEY, ("'/etc/x'", "absolute")),
    ("key-forbidden-char", lambda r, d: r.log_metric("loss!", 1.0), KEY, ("'loss!'", "found '!'")),
    ("key-newline", lambda r, d: r.log_metric("a\nb", 1.0), KEY, ("'a\\nb'", "may contain only")),
    ("key-not-str", lambda r, d: r.log_metric(5, 1.0), KEY, ("metric key 5", "must be str, not int")),  # type: ignore[arg-type]  # a wrong type on purpose
    ("key-part-over-255-bytes", lambda r, d: r.log_metric("é" * 128, 1.0), KEY, ("metric key", "255 bytes")),
    ("param-key-over-255-bytes", lambda r, d: r.log_param("é" * 128, 1), KEY, ("param key", "255 bytes")),
    ("key-file-then-dir", lambda r, d: r.log_metric("base/x", 1.0), KEY, ("'base/x'", "both a file and a folder")),
    ("key-dir-then-file", lambda r, d: r.log_metric("grp", 1.0), KEY, ("'grp'", "both a file and a folder")),
    ("value-str", lambda r, d: r.log_metric("v", "1.0"), VALUE, ("metric 'v'", "str is refused")),
    ("value-bool", lambda r, d: r.log_metric("v", True), VALUE, ("metric 'v'", "bool is refused")),
    ("value-none", lambda r, d: r.log_metric("v", None), VALUE, ("metric 'v'", "real numbers")),
    ("value-list", lambda r, d: r.log_metric("v", [1.0]), VALUE, ("metric 'v'", "real numbers")),
    ("value-dict", lambda r, d: r.log_metric("v", {"a": 1.0}), VALUE, ("metric 'v'", "real numbers")),
    ("value-complex", lambda r, d: r.log_metric("v", 1 + 2j), VALUE, ("metric 'v'", "real numbers")),
    ("value-array", lambda r, d: r.log_metric("v", np.ones(3)), VALUE, ("metric 'v'", "exactly one element")),
    ("value-numpy-bool", lambda r, d: r.log_metric("v", np.bool_(True)), VALUE, ("metric 'v'", "booleans")),
    ("value-tensor", lambda r, d: r.log_metric("v", torch.ones(2)), VALUE, ("metric 'v'", "exactly one element")),
    ("step-float", lambda r, d: r.log_metric("v", 1.0, step=1.5), VALUE, ("metric 'v'", "steps must be integers")),  # type: ignore[arg-type]  # a wrong type on purpose
    ("step-str", lambda r, d: r.log_metric("v", 1.0, step="3"), VALUE, ("metric 'v'", "steps must be integers")),  # type: ignore[arg-type]  # a wrong type on purpose
    ("step-int64", lambda r, d: r.log_metric("v", 1.0, step=2**63), VALUE, ("metric 'v'", "64-bit")),
    ("timestamp-float", lambda r, d: r.log_metric("v", 1.0, timestamp=1.5), VALUE, ("metric 'v'", "integer milli")),  # type: ignore[arg-type]  # a wrong type on purpose
    (
        "log-metrics-one-bad-value",
        lambda r, d: r.log_metrics({"ok2": 1.0, "v": "x"}),
        VALUE,
        ("metric 'v'", "str is refused"),
    ),
    (
        "log-metrics-step-float",
        lambda r, d: r.log_metrics({"v": 1.0}, step=2.5),  # type: ignore[arg-type]  # a wrong type on purpose
        VALUE,
        ("metric 'v'", "steps must be integers"),
    ),
    (
        "param-changed",
        lambda r, d: r.log_param("lr", 0.1),
        (ParamChangedError, ValueError),
        ("'lr'", "cannot change to '0.1'", "immutable"),
    ),
    ("param-too-long", lambda r, d: r.log_param("p", "x" * 6001), VALUE, ("param 'p'", "at most 6000")),
    ("param-bad-key", lambda r, d: r.log_param("../p", 1), KEY, ("param key '../p'", "'..'")),
    ("tag-too-long", lambda r, d: r.set_tag("t", "x" * 8001), VALUE, ("tag 't'", "at most 8000")),
    ("tag-bad-key", lambda r, d: r.set_tag("", "x"), KEY, ("tag key ''", "empty")),
    ("artifact-missing", lambda r, d: r.log_artifact(d / "missing.bin"), VALUE, ("missing.bin", "does not exist")),
    (
        "artifact-path-escapes",
        lambda r, d: r.log_artifact(d / "src.txt", "../../.."),
        VALUE,
        ("'../../..'", "inside the run's artifact directory"),
    ),
    ("artifact-path-absolute", lambda r, d: r.log_artifact(d / "src.txt", str(d)), VALUE, ("relative path",)),
    (
        "text-escapes",
        lambda r, d: r.log_text("x", "notes/../../../../evil.txt"),
        VALUE,
        ("evil.txt", "inside the run's artifact directory"),
    ),
    ("text-absolute", lambda r, d: r.log_text("x", str(d / "evil.txt")), VALUE, ("evil.txt", "relative path")),
    ("dict-escapes", lambda r, d: r.log_dict({"a": 1}, "../evil.json"), VALUE, ("evil.json", "inside the run's")),
    ("text-not-str", lambda r, d: r.log_text(b"bytes", "a.txt"), VALUE, ("takes str",)),  # type: ignore[arg-type]  # a wrong type on purpose
    ("text-name-over-255-bytes", lambda r, d: r.log_text("x", "é" * 128), VALUE, ("artifact file", "255 bytes")),
    ("text-not-unicode", lambda r, d: r.log_text("bad\udc80", "a.txt"), VALUE, ("'a.txt'", "not valid Unicode")),
    ("artifact-device", lambda r, d: r.log_artifact("/dev/zero"), VALUE, ("'/dev/zero'", "regular files")),
    ("artifact-store-itself", lambda r, d: r.log_artifact(d.parent / "mlruns"), VALUE, ("is a tracking store",)),
]


def setup_run(run: steplog.Run, workdir: Path) -> None:
    """The valid state every case starts from (a param, a clash-making key pair, a source file)."""
    run.log_param("lr", 0.01)
    run.log_metric("base", 1.0, step=0)
    run.log_metric("grp/x", 1.0, step=0)
    (workdir / "src.txt").write_text("source")


def tree(folder: Path) -> set[str]:
    """Every file and folder below ``folder``, relative."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_refused(
    run: steplog.Run, workdir: Path, call: Call, types: tuple[type[BaseException], ...], parts: tuple[str, ...]
) -> None:
    with pytest.raises(types[0]) as caught:
        call(run, workdir)
    for kind in types:
        assert isinstance(caught.value, kind)
    for part in parts:
        assert part in str(caught.value)


@pytest.mark.parametrize(("call", "types", "parts"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_call_is_refused_and_writes_nothing(
    tmp_path: Path, call: Call, types: tuple[type[BaseException], ...], parts: tuple[str, ...]
) -> None:
    """The call raises the typed error naming key and rule; nothing is written for it; the run goes on."""
    store, workdir = tmp_path / "mlruns", tmp_path / "work"
    workdir.mkdir()
    with steplog.start_run("bad", tracking_uri=store, handle_signals=False) as run:
        setup_run(run, workdir)
        run.flush()
        run_dir = store / run.experiment_id / run.run_id
        before = tree(run_dir)
        check_refused(run, workdir, call, types, parts)
        run.log_metric("after", 2.0, step=1)  # the run goes on
        run.flush()
        assert before | {"metrics/after"} == tree(run_dir)
    assert {"mlruns", "work", "work/src.txt"} == {p for p in tree(tmp_path) if not p.startswith("mlruns/")}
    data = Store(store).get_run(run.run_id)
    assert {"base": 1.0, "grp/x": 1.0, "after": 2.0} == data.metrics
    assert {"lr": "0.01"} == data.params


@pytest.mark.anyio
async def test_bad_calls_in_async_run_are_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    """The same table through ``async with``: every call refused, the run FINISHED with only the good data."""
    store, workdir = tmp_path / "mlruns", tmp_path / "work"
    workdir.mkdir()
    async with steplog.start_run("bad", tracking_uri=store, handle_signals=False) as run:
        setup_run(run, workdir)
        for i, (_name, call, types, parts) in enumerate(CASES):
            check_refused(run, workdir, call, types, parts)
            run.log_metric("after", float(i), step=i + 1)
    assert {"mlruns", "work", "work/src.txt"} == {p for p in tree(tmp_path) if not p.startswith("mlruns/")}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    got: Any = client.get_run(run.run_id)
    assert "FINISHED" == got.info.status
    assert {"base": 1.0, "grp/x": 1.0, "after": float(len(CASES) - 1)} == got.data.metrics
    assert {"lr": "0.01"} == got.data.params
    assert list(range(1, len(CASES) + 1)) == [m.step for m in client.get_metric_history(run.run_id, "after")]
    assert [] == client.list_artifacts(run.run_id)
