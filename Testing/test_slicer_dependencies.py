"""Installing MAISI's Python packages in Slicer never changes torch.

``MAISIGenerateLib.dependencies.install_plan`` decides from the installed versions what the module
does: torch only through PyTorch Utils (with the minimum the installed MONAI needs), everything else
through pip with a constraint file pinning the installed torch, and one message instead of any
install when torch does not fit. The command lines are checked as they would run; the constraint
file is then given to the real pip of this Python (offline, dry run) to show it resolves with the
installed torch and pip accepts it as written.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
from MAISIGenerateLib.dependencies import (
    TORCH_REQUIREMENT,
    current_plan,
    install_plan,
    monai_torch_requirement,
    satisfies,
    version_tuple,
)

PY = "/slicer/bin/PythonSlicer"
MISSING = ["monai>=1.5", "einops>=0.7", "pynrrd>=1.0"]


def test_missing_packages_are_installed_with_the_installed_torch_pinned(tmp_path):
    constraint = tmp_path / "maisi-constraints.txt"
    plan = install_plan("2.13.0+cu126", "1.6.1", ">=2.8.0", MISSING, str(constraint))

    assert plan.refusal is None and plan.torch_requirement is None
    assert plan.constraints == "torch==2.13.0+cu126\n"
    assert plan.pip_command(PY) == [PY, "-m", "pip", "install", "--constraint", str(constraint),
                                    "monai>=1.5", "einops>=0.7", "pynrrd>=1.0"]
    # torch is named only by the constraint, never as something to install.
    assert not any(arg.startswith("torch") for arg in plan.pip_arguments)
    # MONAI not installed yet: same command, and pip picks a MONAI that fits the pinned torch.
    plan = install_plan("2.5.1", None, None, MISSING, str(constraint))
    assert plan.constraints == "torch==2.5.1\n" and plan.pip_arguments[:2] == ["--constraint", str(constraint)]
    # Nothing missing: nothing to run.
    plan = install_plan("2.13.0", "1.6.1", ">=2.8.0", [], str(constraint))
    assert plan.ready and plan.pip_command(PY) == []


def test_torch_comes_from_pytorch_utils_with_the_minimum_monai_needs():
    # MONAI 1.6 already installed: at least its torch.
    plan = install_plan(None, "1.6.1", ">=2.8.0", MISSING, "c.txt")
    assert plan.torch_requirement == ">=2.8.0" and plan.pip_arguments == [] and plan.refusal is None
    # No MONAI yet: the oldest torch a MONAI maisicore accepts runs on (MONAI 1.5.x: torch >= 2.4.1).
    plan = install_plan(None, None, None, MISSING, "c.txt")
    assert plan.torch_requirement == TORCH_REQUIREMENT == ">=2.4.1" and plan.pip_arguments == []


@pytest.mark.parametrize("torch, monai, monai_torch, words", [
    ("2.3.1", None, None, ["torch 2.3.1 is too old", "MONAI 1.5 or later", ">=2.4.1", "PyTorch Utils"]),
    ("2.6.0+cu118", "1.6.1", ">=2.8.0", ["torch 2.6.0+cu118 is too old", "MONAI 1.6.1", ">=2.8.0", "PyTorch Utils"]),
    ("2.7.1", "1.5.0", ">=2.4.1,<2.7.0", ["torch 2.7.1 is too new", "MONAI 1.5.0", "update MONAI"]),
])
def test_a_torch_that_does_not_fit_is_refused_in_one_message(torch, monai, monai_torch, words):
    plan = install_plan(torch, monai, monai_torch, MISSING, "c.txt")
    assert plan.refusal is not None and "\n" not in plan.refusal
    for word in words:
        assert word in plan.refusal
    assert plan.pip_arguments == [] and plan.torch_requirement is None and plan.constraints == ""


def test_slicer_with_python_3_9_is_refused():
    plan = install_plan("2.13.0", "1.6.1", ">=2.8.0", MISSING, "c.txt", python_version=(3, 9, 10))
    assert plan.refusal == "MAISI needs Python 3.10 or later and this Slicer has Python 3.9: install Slicer 5.10 or later."


def test_versions_and_specifiers():
    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("2.9.0a0+git123") == (2, 9, 0)
    assert version_tuple("2.8") == (2, 8, 0)
    assert satisfies("2.6.0", ">=2.4.1,<2.7.0") and not satisfies("2.7.0", ">=2.4.1,<2.7.0")
    assert satisfies("2.13.0+cpu", ">=2.8.0") and not satisfies("2.4.0", ">=2.4.1")
    with pytest.raises(ValueError, match="only >="):
        satisfies("2.0", "^2.0")


def test_this_pythons_plan_and_a_real_pip_dry_run_keep_torch(tmp_path):
    """This Python has torch and MONAI: MONAI's own metadata gives the torch minimum, the installed
    torch meets it, and pip (offline, --dry-run) accepts the constraint file and resolves MONAI
    with torch as installed, changing nothing."""
    torch_version = importlib.metadata.version("torch")
    assert monai_torch_requirement() is not None and satisfies(torch_version, monai_torch_requirement())
    constraint = tmp_path / "constraints.txt"
    plan = current_plan(str(constraint))
    assert plan.refusal is None and plan.torch_requirement is None

    # What the module runs when MONAI is missing, here with MONAI present: pip must keep torch.
    demo = install_plan(torch_version, None, None, ["monai>=1.5"], str(constraint))
    constraint.write_text(demo.constraints)
    command = [sys.executable if arg == PY else arg for arg in demo.pip_command(PY)]
    command[command.index("install") + 1:command.index("install") + 1] = ["--dry-run", "--no-index"]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install" not in result.stdout, result.stdout
    assert importlib.metadata.version("torch") == torch_version
