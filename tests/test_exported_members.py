"""The public API is exactly what steplog/__init__.py re-exports (STYLE.md)."""

from __future__ import annotations

import steplog


def test_all_matches_public_names() -> None:
    """__all__ is sorted and lists every public name defined by the package root, and no other."""
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
    """Every exported class or function is defined in a private module or a public topic module."""
    for name in steplog.__all__:
        member = getattr(steplog, name)
        module = getattr(member, "__module__", "steplog")
        assert module.startswith("steplog"), (name, module)
