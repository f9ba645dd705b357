"""Fréchet Radiomics Distance through the ``frd-score`` package (offline: radiomics, no network weights).

``frd_score.compute_frd`` is called with its FRD v1 defaults (PyRadiomics first-order and texture
features, min-max normalised on both sets jointly, log of the squared Fréchet distance) on two lists
of image files, with binary masks when given, except that by default only the ``Original`` image
type is used: the package's full default (``Original``, LoG σ 2–5 mm and wavelet images;
``image_types=None``) takes about a minute per small 3D CT on 2 cores against seconds.
"""

from __future__ import annotations

import contextlib
import sys

from ..errors import InputError


def frd_available() -> str | None:
    """None when ``frd-score`` and PyRadiomics import, else one line saying what to install."""
    try:
        import frd_score  # noqa: F401
        import radiomics  # noqa: F401
    except ImportError as exc:
        return (f"--metrics frd needs the frd-score and pyradiomics packages ({exc.name} is missing): "
                "pip install \"MAISICore[evaluate]\" (pyradiomics 3.0 builds from source: "
                "pip install versioneer numpy && pip install --no-build-isolation pyradiomics)")
    return None


FAST_IMAGE_TYPES = ("Original",)


def frd(real_files: list[str], synthetic_files: list[str], real_masks: list[str] | None = None,
        synthetic_masks: list[str] | None = None, image_types: tuple[str, ...] | None = FAST_IMAGE_TYPES) -> float:
    """FRD between the real and synthetic image files (NIfTI/NRRD, as SimpleITK reads them), each
    inside its binary mask file when masks are given; lower is closer. ``image_types`` None: the
    package's full default feature set."""
    problem = frd_available()
    if problem:
        raise InputError(problem)
    if len(real_files) < 2 or len(synthetic_files) < 2:
        raise InputError("--metrics frd needs at least two images in each set (a covariance of one image is undefined)")
    from frd_score import compute_frd

    masks = [real_masks, synthetic_masks] if real_masks is not None and synthetic_masks is not None else None
    with contextlib.redirect_stdout(sys.stderr), _default_sigterm():  # compute_frd prints its result
        value = compute_frd([list(real_files), list(synthetic_files)], paths_masks=masks,
                            image_types=list(image_types) if image_types else None)
    return float(value)


@contextlib.contextmanager
def _default_sigterm():
    """compute_frd's process pool forks workers and ends them with SIGTERM: they must not inherit the
    ``maisi`` command's SIGTERM-as-interrupt handler (a traceback per worker)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
