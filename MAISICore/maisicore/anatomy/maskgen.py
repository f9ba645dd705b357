"""Controllable anatomy sizes: the torch-free parts of the reference's mask-generation path (its
``controllable_anatomy_size``), checked against the reference.

What lives here: ``ANATOMY_SIZE_CLASSES`` (the 10 entries of the size vector the reference's mask
diffusion model is conditioned on, in its order), ``parse_anatomy_sizes`` (the option text → checked
(name, value) pairs, the reference's ``check_input_ct`` rules; ``format_anatomy_sizes`` the reverse),
``select_size_condition`` (the reference's ``prepare_anatomy_size_condition``: the database vector
closest to the request on the requested entries, with those entries overwritten), the size database file
(``all_anatomy_size_conditions.json``: ``load_size_database``, ``default_size_database``), the
tumour whose rules the post-processing applies (``target_tumor_label``) and the 124-class →
MAISI-id table of the mask decoder's classes (``remap_table``).

What is NOT here: sampling and decoding the mask (``maisicore.pipelines.maskgen``, torch), the
post-processing of the generated mask (``maisicore.anatomy.maskpost``), the networks
(``models.presets.get_mask_generation_preset``, ``models.networks.build_mask_networks``).

Values are the reference's: a fraction in [0, 1] (the anatomy's size relative to the range seen in
training) or −1 (absent). At most one tumour. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError

# The size vector of all_anatomy_size_conditions.json / the mask diffusion UNet's conditioning,
# in the reference's order (scripts/sample.py prepare_anatomy_size_condition).
ANATOMY_SIZE_CLASSES = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
SIZE_TUMORS = ANATOMY_SIZE_CLASSES[5:]
ABSENT = -1.0
# MAISI ids of the tumour entries, in the vector's order (the reference's post-processing rules).
SIZE_TUMOR_LABELS = {"lung tumor": 23, "pancreatic tumor": 24, "hepatic tumor": 26, "colon cancer primaries": 27,
                     "bone lesion": 128}
SIZE_DATABASE_FILE = "all_anatomy_size_conditions.json"  # NV-Generate-CT datasets/ (Hugging Face)
REMAP_FILE = "label_dict_124_to_132.json"  # the reference's 124-class → MAISI id table (package data)


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


def format_anatomy_sizes(pairs: Sequence[tuple[str, float]]) -> str:
    """``[("liver", 0.6), ("hepatic tumor", 0.1)]`` → ``"liver=0.6,hepatic tumor=0.1"`` (the text
    ``parse_anatomy_sizes`` reads, checked by it: one-line ``InputError`` for what it refuses)."""
    text = ",".join(f"{' '.join(str(name).strip().lower().split())}={float(size):g}" for name, size in pairs)
    parse_anatomy_sizes(text)
    return text


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



def default_size_database() -> Path:
    """Where ``all_anatomy_size_conditions.json`` is looked for: ``$MAISI_HOME/datasets``, beside the
    candidate mask database (``maisi weights download MODEL --include-datasets`` puts it there)."""
    from ..paths import datasets_dir

    return datasets_dir() / SIZE_DATABASE_FILE


def load_size_database(path: str | os.PathLike) -> list[dict]:
    """The entries of an ``all_anatomy_size_conditions.json`` (a list of ``{"organ_size": [10 numbers]}``);
    one-line ``InputError`` when the file is missing, unreadable or not in that format."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"--anatomy-size needs the anatomy size database {SIZE_DATABASE_FILE}: none at {path}; download "
            f"datasets/{SIZE_DATABASE_FILE} from huggingface.co/nvidia/NV-Generate-CT into {path.parent} "
            "(`maisi weights download rflow-ct --include-datasets` fetches it with the 12 GB mask database), "
            "or give --anatomy-size-db JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from exc
    good = isinstance(data, list) and data and all(
        isinstance(e, dict) and isinstance(e.get("organ_size"), list) and len(e["organ_size"]) == len(ANATOMY_SIZE_CLASSES)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in e["organ_size"]) for e in data)
    if not good:
        raise InputError(f"{path}: not an anatomy size database (a non-empty list of {{\"organ_size\": "
                         f"[{len(ANATOMY_SIZE_CLASSES)} numbers]}} entries)")
    return data


def target_tumor_label(vector: Sequence[float]) -> int | None:
    """MAISI id of the tumour the post-processing keeps: the last tumour entry of the size vector
    that is not −1 after float16 rounding (the reference reads the float16 condition), or None."""
    target = None
    for name in SIZE_TUMORS:
        if float(np.float16(vector[ANATOMY_SIZE_CLASSES.index(name)])) != ABSENT:
            target = SIZE_TUMOR_LABELS[name]
    return target


@lru_cache(maxsize=1)
def remap_table() -> np.ndarray:
    """Lookup table, int64 (125,): mask decoder class index (the reference's 124-class set and
    background) → MAISI label id, from the reference's label_dict_124_to_132.json."""
    path = Path(__file__).resolve().parent.parent / "data" / REMAP_FILE
    pairs = json.loads(path.read_text(encoding="utf-8")).values()
    table = np.arange(max(p[0] for p in pairs) + 1, dtype=np.int64)
    for index, label in pairs:
        table[index] = label
    table.setflags(write=False)
    return table
