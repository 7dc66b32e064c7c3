"""The repository around the deployment files: its root, pyproject.toml (read once) and its packages."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def packages() -> list[str]:
    """Top-level packages pyproject's [tool.setuptools.packages.find] includes."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    return sorted(n for n in found if any(Path(n).match(pattern) for pattern in include))
