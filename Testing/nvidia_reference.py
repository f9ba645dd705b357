"""NVIDIA's reference inference code (NV-Generate-CTMR, ``scripts/``) imported for side-by-side tests.

Where the code comes from (``reference_source``), first found wins:

1. ``$MAISI_REFERENCE_REPO``: a bare git mirror, whose HEAD's ``scripts/`` is exported with
   ``git archive``;
2. ``../shared/reference/nv-generate-ctmr`` beside the checkout (``$MAISI_SHARED/reference/...``
   when set): NVIDIA's ``scripts/`` and ``configs/`` at da438fe, unchanged, a plain folder that CI
   has too, whose ``scripts/`` is copied;
3. the fetched mirror ``../.mirror/NVIDIA-Medtech+NV-Generate-CTMR/repo`` beside the checkout.

The copy goes into a temporary folder and is imported as the package ``scripts``; the tests skip
only when none of the three exists. Nothing of its arithmetic is changed. What differs from a GPU
run, and only that:

- ``skimage`` (imported at the top of ``scripts/utils.py``, used by none of the functions called here)
  is given an empty stand-in module when scikit-image is not installed;
- on the CPU there is no autocast, so the float16 tensors the reference hands to float32 networks
  (its noise in ``initialize_noise_latents``) are given to them as float32 holding the same
  float16-rounded values (``cpu_noise``);
- ``capture_latents`` wraps ``dynamic_infer`` (the reference's decode entry) to record the latents it
  decodes, then calls the original: the decode still runs;
- ``float_context`` wraps a float32 network so that a float16 cross-attention ``context`` (the mask
  generation's size vector, which the reference makes ``.half()`` for CUDA autocast) reaches it as
  float32 holding the same values.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_copy() -> Path:
    """The plain-folder copy of NV-Generate-CTMR in the shared folder beside the checkout."""
    shared = Path(os.environ.get("MAISI_SHARED", REPO.parent / "shared"))
    return shared / "reference" / "nv-generate-ctmr"


def mirror() -> Path:
    """The bare git mirror: ``$MAISI_REFERENCE_REPO``, else the fetched one beside the checkout."""
    return Path(os.environ.get("MAISI_REFERENCE_REPO", REPO.parent / ".mirror" / "NVIDIA-Medtech+NV-Generate-CTMR" / "repo"))


def reference_source() -> tuple[str, Path] | None:
    """("git", bare mirror) or ("folder", plain copy) of NVIDIA's code, in the module docstring's
    order; None when there is none."""
    if "MAISI_REFERENCE_REPO" in os.environ and mirror().is_dir():
        return "git", mirror()
    if (shared_copy() / "scripts").is_dir():
        return "folder", shared_copy()
    if mirror().is_dir():
        return "git", mirror()
    return None


def _require_source() -> tuple[str, Path]:
    source = reference_source()
    if source is None:
        pytest.skip(f"NVIDIA's reference code not found at {shared_copy()} nor at {mirror()} "
                    "(set MAISI_SHARED or MAISI_REFERENCE_REPO)")
    return source


def reference_file(path: str) -> bytes:
    """The bytes of ``path`` (e.g. ``scripts/compute_fid_2-5d_ct.py``) in NVIDIA's code; skips the
    calling test when the code is missing."""
    kind, where = _require_source()
    if kind == "folder":
        return (where / path).read_bytes()
    return subprocess.run(["git", f"--git-dir={where}", "show", f"HEAD:{path}"], capture_output=True, check=True).stdout


def export_scripts(folder: Path) -> Path:
    """Copy NVIDIA's ``scripts/`` into ``folder`` (which then holds the package ``scripts``)."""
    kind, where = _require_source()
    if kind == "folder":
        shutil.copytree(where / "scripts", folder / "scripts", dirs_exist_ok=True)
        for copied in (folder / "scripts").rglob("*"):  # the shared copy is read-only
            copied.chmod(copied.stat().st_mode | 0o200)
    else:
        archive = subprocess.run(["git", f"--git-dir={where}", "archive", "HEAD", "scripts"], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


_IMPORTED: list[types.SimpleNamespace] = []  # one import per test session (it takes seconds)


def import_reference(folder: Path) -> types.SimpleNamespace:
    """Copy ``scripts/`` of NVIDIA's code (``reference_source``) into ``folder`` and import its modules
    (once per session: later calls return the first import); skips the calling test when the code is
    missing."""
    if _IMPORTED:
        return _IMPORTED[0]
    export_scripts(folder)
    try:
        import skimage  # noqa: F401
    except ImportError:
        sys.modules["skimage"] = types.ModuleType("skimage")
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        modules = {name: importlib.import_module(f"scripts.{name}")
                   for name in ("utils", "utils_infer", "diff_model_infer", "augmentation", "sample_mask", "sample")}
    finally:
        sys.path.remove(str(folder))
    _IMPORTED.append(types.SimpleNamespace(**modules))
    return _IMPORTED[0]


def capture_latents(module) -> list:
    """Wrap ``module.dynamic_infer`` so that each latent it decodes is recorded (the decode still runs)."""
    seen = []
    original = module.dynamic_infer

    def recording(inferer, model, images):
        seen.append(images.detach().clone())
        return original(inferer, model, images)

    module.dynamic_infer = recording
    return seen


def cpu_noise(module) -> None:
    """``module``'s ``initialize_noise_latents``: the reference's float16 noise as float32 holding the
    same values (no autocast on the CPU)."""
    original = module.initialize_noise_latents

    def noise(latent_shape, device):
        return original(latent_shape, device).float()

    module.initialize_noise_latents = noise


class _FloatContext:
    """Calls ``network`` with ``context`` as float32 (same values): no autocast on the CPU."""

    def __init__(self, network):
        self.network = network

    def __call__(self, x, timesteps, context=None, **kwargs):
        return self.network(x, timesteps=timesteps, context=None if context is None else context.float(), **kwargs)


def float_context(network):
    """``network`` taking the reference's float16 ``context`` as float32 (see the module docstring)."""
    return _FloatContext(network)
