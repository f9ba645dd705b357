"""Which Python packages the MAISI modules need in Slicer, and how to install them without ever
changing torch (no Qt, no installs here: the widget runs the plan).

torch comes only from the PyTorch extension (``PyTorchUtilsLogic().installTorch``), with a minimum
that fits the MONAI that is (or will be) installed. The rest of ``maisicore/requirements.txt`` is
installed by pip with a constraint file that pins the installed torch (``torch==VERSION``), so pip
keeps torch as it is or fails; it never replaces it (which would lose a GPU build, or leave a
half-uninstalled torch in a running Slicer). A torch too old for MONAI is refused with one message
saying what to do. ``install_plan`` decides all this from versions alone, so it is tested without
running pip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .process import maisicore_parent

# MONAI's own torch requirement (from its package metadata): 1.5.0 >=2.4.1,<2.7; 1.5.1 and 1.5.2
# >=2.4.1; 1.6 >=2.8. Without MONAI installed, the oldest torch any MONAI that maisicore accepts
# (monai>=1.5) runs on; pip then picks the newest MONAI that fits the installed torch.
TORCH_MINIMUM = "2.4.1"
TORCH_REQUIREMENT = f">={TORCH_MINIMUM}"  # as MAISICore/pyproject.toml
MINIMUM_PYTHON = (3, 10)  # maisicore's requires-python; Slicer 5.10 and later ship Python 3.12
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")
_SPECIFIER = re.compile(r"^\s*(>=|<=|==|!=|>|<|~=)\s*([0-9][0-9A-Za-z.*+!-]*)\s*$")


def requirements_path() -> Path:
    """``maisicore/requirements.txt`` beside the installed package."""
    return maisicore_parent() / "maisicore" / "requirements.txt"


def read_requirements(path: Path | None = None) -> list[str]:
    """Requirement lines (``name>=version``), comments and blank lines left out."""
    path = path or requirements_path()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string; local and pre-release parts ignored
    ("2.13.0+cpu" -> (2, 13, 0))."""
    release = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    parts = [int(p) for p in release.group(1).split(".")] if release else []
    return tuple((parts + [0, 0, 0])[:3])


def satisfies(version: str, specifiers: str) -> bool:
    """Whether ``version`` meets comma-separated specifiers (">=2.4.1,<2.7.0"); numeric release
    parts only, which is what torch's and MONAI's requirements use."""
    have = version_tuple(version)
    for part in filter(None, (p.strip() for p in specifiers.split(","))):
        match = _SPECIFIER.match(part)
        if match is None:
            raise ValueError(f"version specifier {part!r}: only >=, <=, ==, !=, >, <, ~= are understood")
        op, wanted = match.group(1), version_tuple(match.group(2))
        ok = {">=": have >= wanted, "<=": have <= wanted, "==": have == wanted, "!=": have != wanted,
              ">": have > wanted, "<": have < wanted, "~=": have >= wanted and have[:2] == wanted[:2]}[op]
        if not ok:
            return False
    return True


def installed_version(name: str) -> str | None:
    """The installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def monai_torch_requirement() -> str | None:
    """The torch specifiers of the installed MONAI (e.g. ">=2.8.0"), from its metadata; None when
    MONAI is not installed or names no torch version."""
    try:
        requires = importlib.metadata.requires("monai") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        if ";" in line and "extra" in line.split(";", 1)[1]:
            continue
        match = re.match(r"^\s*torch\s*(\(?)([^;()]*)\)?", line)
        if match and match.group(2).strip():
            return match.group(2).strip().replace(" ", "")
    return None


def missing_requirements(requirements: list[str] | None = None) -> list[str]:
    """The requirement lines not satisfied in this Python (absent, or older than the lower bound)."""
    missing = []
    for line in requirements if requirements is not None else read_requirements():
        match = _REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"requirement {line!r}: only 'name' or 'name>=version' is supported")
        name, minimum = match.groups()
        installed = installed_version(name)
        if installed is None or (minimum and version_tuple(installed) < version_tuple(minimum)):
            missing.append(line)
    return missing


def torch_installed() -> bool:
    """Whether torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


@dataclass
class InstallPlan:
    """What installing MAISI's dependencies takes, in order.

    refusal: one message saying what to change, when nothing may be installed (torch too old,
        Python too old); the other fields are then empty.
    torch_requirement: version specifiers for PyTorch Utils' ``installTorch`` when torch is absent
        (plan again once it is installed).
    constraints: the constraint file's text, pinning the installed torch.
    pip_arguments: the arguments of ``pip install`` (constraint file first, then the missing
        requirements); empty when nothing is missing.
    """

    refusal: str | None = None
    torch_requirement: str | None = None
    constraints: str = ""
    pip_arguments: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Nothing to install and nothing refused."""
        return not (self.refusal or self.torch_requirement or self.pip_arguments)

    def pip_command(self, python: str) -> list[str]:
        """The command line pip is run with (``python -m pip install ARGS``); [] when there is none."""
        return [python, "-m", "pip", "install", *self.pip_arguments] if self.pip_arguments else []


def install_plan(torch_version: str | None, monai_version: str | None, monai_torch: str | None,
                 missing: list[str], constraint_file: str,
                 python_version: tuple[int, ...] = tuple(sys.version_info[:3])) -> InstallPlan:
    """Decide how to install what is ``missing`` (requirement lines, torch excluded) given the
    installed torch and MONAI versions (None: absent) and MONAI's torch specifiers
    (``monai_torch``, e.g. ">=2.8.0"; None: unknown). Pure: no imports, no processes."""
    if tuple(python_version[:2]) < MINIMUM_PYTHON:
        have = ".".join(map(str, python_version[:2]))
        return InstallPlan(refusal=(
            f"MAISI needs Python {'.'.join(map(str, MINIMUM_PYTHON))} or later and this Slicer has Python {have}: "
            "install Slicer 5.10 or later."))
    wanted = monai_torch if monai_version and monai_torch else TORCH_REQUIREMENT
    if torch_version is None:
        return InstallPlan(torch_requirement=wanted)
    if not satisfies(torch_version, wanted):
        owner = f"MONAI {monai_version}" if monai_version and monai_torch else "MAISI (MONAI 1.5 or later)"
        lower = ",".join(p for p in wanted.split(",") if p.strip().startswith(">"))
        if satisfies(torch_version, lower):  # newer than this MONAI allows: a newer MONAI fits
            advice = "update MONAI in the Python console (slicer.util.pip_install('monai>=1.5.1')) and restart Slicer"
        else:
            advice = (f"in the PyTorch Utils module uninstall torch, restart Slicer, install torch {wanted} there "
                      "(it picks the build for your GPU) and restart Slicer")
        return InstallPlan(refusal=f"torch {torch_version} is too {'new' if satisfies(torch_version, lower) else 'old'} "
                                   f"for {owner}, which needs torch {wanted}: {advice}.")
    if not missing:
        return InstallPlan()
    constraints = f"torch=={torch_version}\n"
    return InstallPlan(constraints=constraints, pip_arguments=["--constraint", str(constraint_file), *missing])


def current_plan(constraint_file: str) -> InstallPlan:
    """``install_plan`` for this Python's installed packages."""
    return install_plan(installed_version("torch") if torch_installed() else None, installed_version("monai"),
                        monai_torch_requirement(), missing_requirements(), constraint_file)
