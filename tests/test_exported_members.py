"""The public API is exactly what each public module's ``__all__`` lists (STYLE.md).

Public modules: ``steplog`` (explicit re-exports from private modules), the topic modules
``steplog.store``, ``steplog.testing``, ``steplog.typing``, and ``steplog.sinks`` with its
public submodules.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from types import ModuleType

import pytest

import steplog
import steplog.sinks

TOPIC_MODULES = ["steplog.store", "steplog.testing", "steplog.typing", "steplog.sinks"]
SINK_MODULES = sorted(
    f"steplog.sinks.{info.name}"
    for info in pkgutil.iter_modules(steplog.sinks.__path__)
    if not info.name.startswith("_")
)
PUBLIC_MODULES = TOPIC_MODULES + SINK_MODULES


def _defined_here(module: ModuleType) -> set[str]:
    """Public classes and functions whose home is ``module`` (not names it imported from elsewhere)."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == module.__name__
    }


def test_all_matches_public_names() -> None:
    """The root __all__ is sorted and lists every public name defined by the package root, and no other."""
    public = {name for name in dir(steplog) if not name.startswith("_")} - {
        # submodules that importing the package binds as attributes
        "cli",
        "integrations",
        "sinks",
        "store",
        "testing",
        "typing",
    }
    assert sorted(steplog.__all__) == steplog.__all__
    assert set(steplog.__all__) - {"__version__"} == public


def test_exported_members_come_from_private_modules() -> None:
    """Every exported class or function of the root exists and says it belongs to ``steplog``."""
    for name in steplog.__all__:
        member = getattr(steplog, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert "steplog" == member.__module__, name


def test_public_classes_print_as_steplog_names() -> None:
    """Errors, types and start_run print as ``steplog.X`` (not ``steplog._errors.X``), before any other use."""
    code = "import steplog; print(steplog.RunStateError, steplog.RunStatus.__module__, steplog.start_run.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert ["<class", "'steplog.RunStateError'>", "steplog", "steplog"] == out


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_each_public_module_exports_exactly_its_public_names(name: str) -> None:
    """Each public module's __all__ is sorted, every name in it exists, and no public class or function is left out."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert sorted(exported) == exported
    assert [] == [n for n in exported if not hasattr(module, n)]
    assert set() == _defined_here(module) - set(exported)
