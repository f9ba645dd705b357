"""NVIDIA's reference inference code (NV-Generate-CTMR, ``scripts/``) imported for side-by-side tests.

The code is exported from the bare mirror (``$MAISI_REFERENCE_REPO``, default
``../.mirror/NVIDIA-Medtech+NV-Generate-CTMR/repo`` beside the checkout) with ``git archive`` into a
temporary folder and imported as the package ``scripts``; the tests skip when it is absent. Nothing of
its arithmetic is changed. What differs from a GPU run, and only that:

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
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mirror() -> Path:
    return Path(os.environ.get("MAISI_REFERENCE_REPO", REPO.parent / ".mirror" / "NVIDIA-Medtech+NV-Generate-CTMR" / "repo"))


_IMPORTED: list[types.SimpleNamespace] = []  # one import per test session (it takes seconds)


def import_reference(folder: Path) -> types.SimpleNamespace:
    """Export ``scripts/`` of the mirror's HEAD into ``folder`` and import its modules (once per
    session: later calls return the first import); skips the calling test when the mirror is missing."""
    if _IMPORTED:
        return _IMPORTED[0]
    git_dir = mirror()
    if not git_dir.is_dir():
        pytest.skip(f"NVIDIA's reference code not found at {git_dir} (set MAISI_REFERENCE_REPO)")
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", "scripts"], capture_output=True, check=True)
    subprocess.run(["tar", "x", "-C", str(folder)], input=archive.stdout, check=True)
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
