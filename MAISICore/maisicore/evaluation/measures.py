"""How faithful and how diverse: VAE reconstruction, organ HU fidelity, MS-SSIM diversity.

Arrays are (x, y, z) in the closest-RAS index order, CT values in HU; the [0, 1] scale is the VAE's
(HU clipped to [−1000, 1000], −1000 ↦ 0, 1000 ↦ 1).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from ..anatomy.qc import check_ct, organ_groups
from ..vae.decode import hu_to_unit, unit_to_hu

# Tissue classes by the real CT's HU (after clipping to [−1000, 1000]): [low, high) HU.
TISSUE_BANDS_HU = {
    "air": (-1000.0, -900.0),
    "lung": (-900.0, -200.0),
    "fat": (-200.0, -30.0),
    "soft tissue": (-30.0, 200.0),
    "bone": (200.0, 1000.01),
}
MS_SSIM_KERNEL = 7  # voxels; MONAI's default of 11 allows only 2 scales on a 32-slice volume
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def _metric(values: torch.Tensor) -> float:
    return float(values.reshape(-1)[0])


def reconstruct(autoencoder, ct_hu: np.ndarray, device, memory_budget_bytes: int | None = None) -> np.ndarray:
    """The VAE's reconstruction of ``ct_hu`` (x, y, z) HU: clip and scale to [0, 1], pad the high end
    of each axis with air to a multiple of 4, exact split encode (posterior mean) and decode, crop
    back. Returns float32 on the [0, 1] scale, clipped to [0, 1], shape of ``ct_hu``."""
    from ..vae.tsp import decode_exact, encode_exact

    image = hu_to_unit(np.asarray(ct_hu, dtype=np.float32)).astype(np.float32)
    shape = image.shape
    image = np.pad(image, [(0, (-n) % 4) for n in shape], constant_values=0.0)
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    mu, _ = encode_exact(autoencoder, tensor.to(device), memory_budget_bytes, device=device)
    out = decode_exact(autoencoder, mu.to(device), memory_budget_bytes, device=device)[0, 0].numpy()
    return np.clip(out[: shape[0], : shape[1], : shape[2]], 0.0, 1.0).astype(np.float32)


def reconstruction_figures(real_hu: np.ndarray, recon01: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Figures of a reconstruction ``recon01`` ([0, 1] scale) of ``real_hu`` (HU), same (x, y, z) shape.

    ``mae_hu``: mean |reconstruction − real| in HU, real clipped to [−1000, 1000], over all voxels;
    ``mae_hu_by_tissue``: the same inside each band of ``TISSUE_BANDS_HU`` of the real CT (None when
    the band is empty); ``mae_hu_by_organ``: inside each QC organ group of ``labels`` present;
    ``psnr_db`` and ``ssim``: MONAI's PSNRMetric (max 1) and 3D SSIMMetric (data range 1, 11-voxel
    Gaussian window) on the [0, 1] scale.
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    real01 = hu_to_unit(np.asarray(real_hu, dtype=np.float32)).astype(np.float32)
    real_clipped = unit_to_hu(real01)
    error = np.abs(unit_to_hu(recon01.astype(np.float64)) - real_clipped.astype(np.float64))
    by_tissue = {}
    for name, (low, high) in TISSUE_BANDS_HU.items():
        inside = (real_clipped >= low) & (real_clipped < high)
        by_tissue[name] = float(error[inside].mean()) if inside.any() else None
    by_organ = {}
    if labels is not None:
        for organ, ids in organ_groups().items():
            inside = np.isin(labels, ids)
            if inside.any():
                by_organ[organ] = float(error[inside].mean())
    a = torch.from_numpy(np.ascontiguousarray(recon01))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(real01))[None, None]
    return {
        "mae_hu": float(error.mean()),
        "mae_hu_by_tissue": by_tissue,
        "mae_hu_by_organ": by_organ,
        "psnr_db": _metric(PSNRMetric(max_val=1.0)(a, b)),
        "ssim": _metric(SSIMMetric(spatial_dims=3, data_range=1.0)(a, b)),
    }


def fidelity(ct_hu: np.ndarray, labels: np.ndarray) -> dict:
    """Median HU per QC organ present in ``labels`` against the real-CT range of
    ``image_median_statistics_ct.json`` (``anatomy.qc``): rows and the fraction of organs passing."""
    rows = [dict(organ=c.organ, voxels=c.voxels, median_hu=c.median_hu, low_hu=c.low_hu, high_hu=c.high_hu,
                 passed=c.passed) for c in check_ct(np.asarray(ct_hu, dtype=np.float32), labels.astype(np.int32))
            if c.checked]
    passed = sum(r["passed"] for r in rows)
    return {"organs": rows, "passed": passed, "checked": len(rows),
            "pass_fraction": passed / len(rows) if rows else None}


def ms_ssim_settings(shape: tuple[int, ...]) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights for 3D MS-SSIM on a volume of ``shape``: as many of the standard
    five scales as fit (each dimension must exceed (kernel − 1)·2^(scales − 1)), weights renormalised."""
    smallest = min(shape)

    def fits(scales: int) -> bool:  # the coarsest scale holds the kernel; MONAI's own size check passes
        return (smallest // 2 ** (scales - 1) > MS_SSIM_KERNEL - 1
                and smallest // max(1, scales - 1) ** 2 > MS_SSIM_KERNEL - 1)

    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and fits(scales + 1):
        scales += 1
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    return MS_SSIM_KERNEL, tuple(float(w) for w in weights / weights.sum())


def ms_ssim(a_hu: np.ndarray, b_hu: np.ndarray) -> float:
    """MONAI's 3D MultiScaleSSIMMetric between two CTs (HU, same shape) on the [0, 1] scale."""
    from monai.metrics import MultiScaleSSIMMetric

    kernel, weights = ms_ssim_settings(a_hu.shape)
    if min(a_hu.shape) <= kernel - 1:
        raise ValueError(f"volume {a_hu.shape} too small for MS-SSIM with a {kernel}-voxel kernel")
    a = torch.from_numpy(hu_to_unit(np.asarray(a_hu, dtype=np.float32)).astype(np.float32))[None, None]
    b = torch.from_numpy(hu_to_unit(np.asarray(b_hu, dtype=np.float32)).astype(np.float32))[None, None]
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel, weights=weights)
    return _metric(metric(a, b))


def diversity(group: list[np.ndarray]) -> dict:
    """Mean MS-SSIM over every pair of CTs (HU) made from the same request with different seeds;
    lower means more diverse (1 = identical)."""
    values = [ms_ssim(a, b) for a, b in combinations(group, 2)]
    kernel, weights = ms_ssim_settings(group[0].shape)
    return {"pairs": len(values), "ms_ssim_mean": float(np.mean(values)) if values else None,
            "ms_ssim_pairs": values, "kernel": kernel, "weights": list(weights)}
