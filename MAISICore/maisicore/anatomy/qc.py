"""Quality check of a CT against its labels: the median HU inside each organ must fall within the
range seen in real CTs (``data/image_median_statistics_ct.json``, NVIDIA's reference statistics).

Bounds (reference rule): low = min(sigma_6_low, percentile_0_5), high = max(sigma_6_high,
percentile_99_5); for bone the upper bound is 1000 HU. An organ absent from the labels is not
checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from .labels import label_table

BONE_WORDS = frozenset({"vertebrae", "rib", "humerus", "scapula", "clavicula", "femur", "hip", "sacrum", "skull", "sternum"})


def organ_groups() -> dict[str, tuple[int, ...]]:
    """QC organ → MAISI label ids, resolved by name from the label table."""
    table = label_table()

    def ids(pred) -> tuple[int, ...]:
        return tuple(sorted(info.id for info in table if pred(info.name)))

    return {
        "liver": ids(lambda n: n == "liver"),
        "spleen": ids(lambda n: n == "spleen"),
        "pancreas": ids(lambda n: n == "pancreas"),
        "kidney": ids(lambda n: n in ("left kidney", "right kidney")),
        "lung": ids(lambda n: "lung" in n and "lobe" in n),
        "bone": ids(lambda n: bool(BONE_WORDS & set(n.split()))),
        "brain": ids(lambda n: n == "brain"),
    }


@lru_cache(maxsize=1)
def reference_statistics() -> dict:
    return json.loads(resources.files("maisicore").joinpath("data/image_median_statistics_ct.json").read_text())


@dataclass(frozen=True)
class OrganCheck:
    """One organ's result: median HU inside its labels and the accepted range (HU)."""

    organ: str
    voxels: int
    median_hu: float | None
    low_hu: float
    high_hu: float

    @property
    def checked(self) -> bool:
        return self.median_hu is not None

    @property
    def passed(self) -> bool:
        return not self.checked or self.low_hu <= self.median_hu <= self.high_hu


def check_ct(ct_hu: np.ndarray, labels: np.ndarray) -> list[OrganCheck]:
    """Median HU per organ of ``ct_hu`` inside ``labels`` (same shape) against the reference ranges."""
    if ct_hu.shape != labels.shape:
        raise ValueError(f"CT shape {ct_hu.shape} differs from the labels' {labels.shape}")
    stats = reference_statistics()
    groups = organ_groups()
    results = []
    for organ, s in stats.items():
        low = min(s["sigma_6_low"], s["percentile_0_5"])
        high = 1000.0 if organ == "bone" else max(s["sigma_6_high"], s["percentile_99_5"])
        inside = np.isin(labels, groups.get(organ, ()))
        values = ct_hu[inside]
        median = float(np.median(values)) if values.size else None
        results.append(OrganCheck(organ, int(values.size), median, float(low), float(high)))
    return results


def format_table(checks: list[OrganCheck]) -> str:
    """A fixed-width table: organ, voxels, median HU, range, verdict."""
    lines = [f"{'organ':<9} {'voxels':>9} {'median HU':>10}  {'range HU':<17} result"]
    for c in checks:
        median = f"{c.median_hu:10.1f}" if c.checked else f"{'-':>10}"
        verdict = "absent" if not c.checked else ("ok" if c.passed else "OUT OF RANGE")
        lines.append(f"{c.organ:<9} {c.voxels:>9} {median}  {c.low_hu:7.1f} … {c.high_hu:7.1f} {verdict}")
    return "\n".join(lines)
