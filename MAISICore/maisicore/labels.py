"""MAISI label vocabulary: ids and names from the label dictionary data file, ControlNet encoding
of label volumes, and the body region of a mask.

The dictionary (``data/label_dict.json``, NVIDIA's ``configs/label_dict.json``) holds 132 classes
plus ``body`` = 200; 0 is background.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from .presets import BODY_REGIONS

BACKGROUND = 0

# Reference rule for the body region of a mask (ddpm-ct): a region is present when any of its
# anatomy labels is; top = first present region, bottom = last.
REGION_ANATOMY = {
    "head": ("brain", "skull"),
    "chest": (
        "left lung upper lobe",
        "left lung lower lobe",
        "right lung upper lobe",
        "right lung middle lobe",
        "right lung lower lobe",
    ),
    "abdomen": ("liver", "dummy1", "spleen", "pancreas", "right kidney", "left kidney"),
    "lower": ("left femur", "right femur"),
}


@lru_cache(maxsize=1)
def label_dict() -> dict[str, int]:
    """MAISI label name -> id, from the packaged dictionary."""
    text = resources.files("maisicore").joinpath("data/label_dict.json").read_text()
    return dict(json.loads(text))


def valid_label_ids() -> frozenset[int]:
    """Every id a MAISI label volume may hold: background, the 132 classes and body (200)."""
    return frozenset({BACKGROUND, *label_dict().values()})


def unknown_label_ids(labels: np.ndarray) -> list[int]:
    """Sorted ids present in ``labels`` that are not in the MAISI vocabulary."""
    present = np.unique(labels)
    valid = valid_label_ids()
    return sorted(int(v) for v in present if int(v) not in valid)


def binarize_labels(labels: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """ControlNet condition: label ids (B, 1, X, Y, Z) integer -> (B, bits, X, Y, Z) uint8 bit planes,
    least significant bit first (reference encoding)."""
    if labels.ndim != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, X, Y, Z), got {tuple(labels.shape)}")
    weights = 2 ** torch.arange(bits, device=labels.device, dtype=labels.dtype)
    planes = labels.unsqueeze(-1).bitwise_and(weights).ne(0).to(torch.uint8)  # (B, 1, X, Y, Z, bits)
    return planes.squeeze(1).permute(0, 4, 1, 2, 3).contiguous()


def body_region_from_mask(labels: np.ndarray) -> tuple[str, str] | None:
    """(top, bottom) body region of a MAISI label volume by the reference rule, or None when the
    mask holds none of the regions' anatomy."""
    ids = label_dict()
    present = set(int(v) for v in np.unique(labels))
    found = [r for r in BODY_REGIONS if any(ids[name] in present for name in REGION_ANATOMY[r])]
    if not found:
        return None
    return found[0], found[-1]


def region_one_hot(region: str) -> list[float]:
    """One-hot vector over ``BODY_REGIONS`` (head, chest, abdomen, lower) for ``region``."""
    if region not in BODY_REGIONS:
        raise ValueError(f"unknown body region {region!r}: choose from {', '.join(BODY_REGIONS)}")
    return [1.0 if r == region else 0.0 for r in BODY_REGIONS]
