"""Controllable anatomy sizes: the request side of the reference's mask-generation path (its
``controllable_anatomy_size``). The mask networks are built (``models.presets.get_mask_generation_preset``,
``models.networks.build_mask_networks``); their sampling, the reference's post-processing of the
generated mask and the wiring into ``maisi generate`` are not built yet. These are the parts that need
no network, checked against the reference.

What lives here: ``ANATOMY_SIZE_CLASSES`` (the 10 entries of the size vector the reference's mask
diffusion model is conditioned on, in its order), ``parse_anatomy_sizes`` (the option text → checked
(name, value) pairs, the reference's ``check_input_ct`` rules) and ``select_size_condition`` (the
reference's ``prepare_anatomy_size_condition``: the database vector closest to the request on the
requested entries, with those entries overwritten).

Values are the reference's: a fraction in [0, 1] (the anatomy's size relative to the range seen in
training) or −1 (absent). At most one tumour. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import InputError

# The size vector of all_anatomy_size_conditions.json / the mask diffusion UNet's conditioning,
# in the reference's order (scripts/sample.py prepare_anatomy_size_condition).
ANATOMY_SIZE_CLASSES = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
SIZE_TUMORS = ANATOMY_SIZE_CLASSES[5:]
ABSENT = -1.0


def parse_anatomy_sizes(text: str) -> list[tuple[str, float]]:
    """``"liver=0.6,hepatic tumor=0.1"`` → ``[("liver", 0.6), ("hepatic tumor", 0.1)]``.

    Names are MAISI names of ``ANATOMY_SIZE_CLASSES`` (case and spaces as in the label table);
    values in [0, 1] or −1. One-line ``InputError`` for an unknown name, a bad or out-of-range value,
    a repeated name or more than one tumour."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--anatomy-size: give NAME=SIZE pairs, e.g. \"liver=0.6,hepatic tumor=0.1\" "
                         f"(names: {', '.join(ANATOMY_SIZE_CLASSES)})")
    pairs: list[tuple[str, float]] = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = " ".join(name.strip().lower().split())
        if not sep or not name:
            raise InputError(f"--anatomy-size {item.strip()!r}: write NAME=SIZE, e.g. liver=0.6")
        if name not in ANATOMY_SIZE_CLASSES:
            raise InputError(f"--anatomy-size: {name!r} has no size control; choose from {', '.join(ANATOMY_SIZE_CLASSES)}")
        try:
            size = float(value)
        except ValueError:
            raise InputError(f"--anatomy-size {name}={value.strip()}: the size must be a number") from None
        if not math.isfinite(size) or (size != ABSENT and not 0.0 <= size <= 1.0):
            raise InputError(f"--anatomy-size {name}={value.strip()}: the size must be between 0 and 1 "
                             "(a fraction of the range seen in training), or -1 for absent")
        if any(name == n for n, _ in pairs):
            raise InputError(f"--anatomy-size: {name} is given twice")
        pairs.append((name, size))
    tumors = [n for n, _ in pairs if n in SIZE_TUMORS]
    if len(tumors) > 1:
        raise InputError(f"--anatomy-size: at most one tumour can be controlled (the reference's rule); got {', '.join(tumors)}")
    return pairs


def select_size_condition(pairs: Sequence[tuple[str, float]], database: Sequence[dict]) -> list[float]:
    """The reference's size-vector selection: the ``organ_size`` vector of ``database`` (the entries
    of ``all_anatomy_size_conditions.json``) with the smallest sum of |requested − stored| over the
    requested entries (the first such entry on ties), with the requested entries overwritten."""
    if not database:
        raise InputError("the anatomy size database is empty")
    index = {name: i for i, name in enumerate(ANATOMY_SIZE_CLASSES)}
    requested = {index[name]: size for name, size in pairs}

    def distance(entry: dict) -> float:
        return sum(abs(requested[i] - entry["organ_size"][i]) for i in sorted(requested))  # the reference's order

    best = min(database, key=distance)  # min keeps the first of equal distances, as a stable sort does
    vector = [float(v) for v in best["organ_size"]]
    for i, size in requested.items():
        vector[i] = size
    return vector

