"""Print the lowest versions pyproject.toml declares, as pins, for the core suite's minimum-versions check.

Every `name>=X` of the core dependencies and the test extra becomes `name==X`; the packages the core
suite deselects (`-m "not mlflow and not torch"`) and the lint tools are left out.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"mlflow", "torch", "tensorboardx", "ruff", "mypy", "lightning", "transformers", "accelerate", "keras"}


def main() -> None:
    project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    pins: dict[str, str] = {}
    for requirement in wanted:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*).*", requirement)
        if match is None:
            continue  # an exact pin or no lower bound: nothing lower to test
        name = match.group(1).lower()
        if name not in SKIP:
            pins.setdefault(name, f"{match.group(1)}{match.group(2) or ''}=={match.group(3)}")
    print("\n".join(pins.values()))


if __name__ == "__main__":
    main()
