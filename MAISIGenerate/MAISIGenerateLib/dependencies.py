"""Which Python packages the MAISI modules need in Slicer, and which are missing (no Qt, no installs).

torch comes from the PyTorch extension (``PyTorchUtilsLogic().installTorch``); the rest is listed in
``maisicore/requirements.txt`` (shipped with the package) and installed by the widgets, after
asking, with ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from .process import maisicore_parent

TORCH_REQUIREMENT = ">=2.2"  # as MAISICore/pyproject.toml
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")


def requirements_path() -> Path:
    """``maisicore/requirements.txt`` beside the installed package."""
    return maisicore_parent() / "maisicore" / "requirements.txt"


def read_requirements(path: Path | None = None) -> list[str]:
    """Requirement lines (``name>=version``), comments and blank lines left out."""
    path = path or requirements_path()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def missing_requirements(requirements: list[str] | None = None) -> list[str]:
    """The requirement lines not satisfied in this Python (absent, or older than the lower bound)."""
    missing = []
    for line in requirements if requirements is not None else read_requirements():
        match = _REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"requirement {line!r}: only 'name' or 'name>=version' is supported")
        name, minimum = match.groups()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum):
            missing.append(line)
    return missing


def torch_installed() -> bool:
    """Whether torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None
