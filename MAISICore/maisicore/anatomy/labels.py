"""MAISI label vocabulary: the one label table (``data/maisi_labels.json``) with ids, names,
TotalSegmentator v2 class names, synonyms, SNOMED-CT codes and colours; name and Slicer terminology
lookups; and the body region of a mask. The ControlNet's encoding of label volumes is
``maisicore.diffusion.conditioning.binarize_labels``: nothing here imports torch.

The table holds NVIDIA's ``configs/label_dict.json`` vocabulary: 132 classes (1..132, including
``dummy1``..``dummy8``) plus ``body`` = 200; 0 is background.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from ..models.presets import BODY_REGIONS

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
    """MAISI label name -> id, in id order, from the packaged label table."""
    return {info.name: info.id for info in label_table()}


def valid_label_ids() -> frozenset[int]:
    """Every id a MAISI label volume may hold: background, the 132 classes and body (200)."""
    return frozenset({BACKGROUND, *label_dict().values()})


def unknown_label_ids(labels: np.ndarray) -> list[int]:
    """Sorted ids present in ``labels`` that are not in the MAISI vocabulary."""
    present = np.unique(labels)
    valid = valid_label_ids()
    return sorted(int(v) for v in present if int(v) not in valid)


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


# ---- label table ----------------------------------------------------------------------------

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept: (coding scheme designator, code value, code meaning), e.g. SCT."""

    scheme: str
    value: str
    meaning: str

    def serialize(self) -> str:
        """``scheme^value^meaning`` as in Slicer terminology strings."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


_EMPTY_CODE = "^^"


@dataclass(frozen=True)
class LabelInfo:
    """One MAISI label: id, name, TotalSegmentator v2 names, synonyms, DICOM/SNOMED codes, colour
    (r, g, b, 0..255) and whether it is a tumour class."""

    id: int
    name: str
    totalsegmentator: tuple[str, ...]
    synonyms: tuple[str, ...]
    category: Code | None
    type: Code | None
    type_modifier: Code | None
    anatomic_region: Code | None
    color: tuple[int, int, int]
    tumor: bool
    anatomic_region_modifier: Code | None = None

    def terminology_entry(self) -> str | None:
        """Slicer's serialised terminology entry (``context~category~type~modifier~anatomic
        context~region~region modifier``, codes as ``scheme^value^meaning``), or None when the
        label has no codes (dummies)."""
        if self.category is None or self.type is None:
            return None

        def part(code: Code | None) -> str:
            return code.serialize() if code is not None else _EMPTY_CODE

        return "~".join(
            (
                TERMINOLOGY_CONTEXT,
                part(self.category),
                part(self.type),
                part(self.type_modifier),
                ANATOMIC_CONTEXT,
                part(self.anatomic_region),
                part(self.anatomic_region_modifier),
            )
        )

    def _code_key(self) -> tuple[str, ...]:
        values = [c.value if c is not None else "" for c in (self.category, self.type, self.type_modifier)]
        if self.anatomic_region is not None:
            mod = self.anatomic_region_modifier
            values += [self.anatomic_region.value, mod.value if mod is not None else ""]
        return tuple(values)


def normalize_name(text: str) -> tuple[str, ...]:
    """Lookup key of a segment name: lower-case words, any run of non-alphanumerics (spaces,
    underscores, hyphens, commas) as separator, word order ignored ("Kidney, left" ==
    "left_kidney")."""
    return tuple(sorted(w for w in re.split(r"[^0-9a-z]+", text.lower()) if w))


def _code_value(part: str) -> str:
    fields = part.split("^")
    return fields[1].strip() if len(fields) > 1 else ""


def looks_like_terminology(text: str) -> bool:
    """True when ``text`` looks like a Slicer terminology entry string (holds '~' and '^')."""
    return "~" in text and "^" in text


class LabelTable:
    """The MAISI labels in id order, with lookups by id, name, TotalSegmentator name, synonym and
    Slicer terminology entry."""

    def __init__(self, labels: list[LabelInfo], totalsegmentator_v2_total: dict[int, str]):
        self._labels = tuple(sorted(labels, key=lambda info: info.id))
        self._ts_total = dict(sorted(totalsegmentator_v2_total.items()))
        self._by_id: dict[int, LabelInfo] = {}
        self._by_name: dict[tuple[str, ...], LabelInfo] = {}
        self._by_ts: dict[tuple[str, ...], LabelInfo] = {}
        self._by_segment: dict[tuple[str, ...], LabelInfo] = {}
        self._by_code: dict[tuple[str, ...], LabelInfo] = {}
        for info in self._labels:
            _add(self._by_id, info.id, info, "id")
            _add(self._by_name, normalize_name(info.name), info, "name")
            for ts in info.totalsegmentator:
                _add(self._by_ts, normalize_name(ts), info, "TotalSegmentator name")
            for text in (info.name, *info.totalsegmentator, *info.synonyms):
                _add(self._by_segment, normalize_name(text), info, "segment name")
            if info.category is not None and info.type is not None:
                _add(self._by_code, info._code_key(), info, "terminology codes")

    def __iter__(self):
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def by_id(self, label_id: int) -> LabelInfo:
        """The label with id ``label_id``; KeyError if there is none."""
        try:
            return self._by_id[int(label_id)]
        except KeyError:
            raise KeyError(f"unknown MAISI label id {label_id}") from None

    def by_name(self, name: str) -> LabelInfo | None:
        """The label whose MAISI name matches ``name`` (normalised), or None."""
        return self._by_name.get(normalize_name(name))

    def by_totalsegmentator(self, ts_name: str) -> LabelInfo | None:
        """The label a TotalSegmentator v2 class name (e.g. ``kidney_left``) maps to, or None."""
        return self._by_ts.get(normalize_name(ts_name))

    def by_segment_name(self, name: str) -> LabelInfo | None:
        """The label a segment name means: MAISI name, TotalSegmentator name or synonym
        (normalised), or None."""
        return self._by_segment.get(normalize_name(name))

    def by_terminology(self, entry: str) -> LabelInfo | None:
        """The label a Slicer terminology entry string codes, or None. Matches code values only
        (category, type, type modifier; anatomic region and its modifier for labels that have a
        region); context names, scheme designators and meanings are ignored."""
        parts = entry.split("~")
        parts += [""] * (7 - len(parts))
        cat, typ, mod = (_code_value(p) for p in parts[1:4])
        region, region_mod = _code_value(parts[5]), _code_value(parts[6])
        if not cat or not typ:
            return None
        if region:
            found = self._by_code.get((cat, typ, mod, region, region_mod))
            if found is not None:
                return found
        return self._by_code.get((cat, typ, mod))

    def resolve(self, text: str) -> LabelInfo | None:
        """The label ``text`` means: a Slicer terminology entry when it looks like one, else a
        segment name; None if unknown."""
        if looks_like_terminology(text):
            return self.by_terminology(text)
        return self.by_segment_name(text)

    def totalsegmentator_v2_names(self) -> dict[int, str]:
        """TotalSegmentator v2 ``total`` task class id -> class name (117 classes)."""
        return dict(self._ts_total)


def _add(index: dict, key, info: LabelInfo, what: str) -> None:
    other = index.setdefault(key, info)
    if other is not info and other.id != info.id:
        raise ValueError(f"label table: {what} {key!r} is claimed by ids {other.id} and {info.id}")


def _code(triple) -> Code | None:
    return Code(*(str(v) for v in triple)) if triple else None


def _label_info(entry: dict) -> LabelInfo:
    return LabelInfo(
        id=int(entry["id"]),
        name=entry["name"],
        totalsegmentator=tuple(entry.get("totalsegmentator", ())),
        synonyms=tuple(entry.get("synonyms", ())),
        category=_code(entry.get("category")),
        type=_code(entry.get("type")),
        type_modifier=_code(entry.get("type_modifier")),
        anatomic_region=_code(entry.get("anatomic_region")),
        color=tuple(int(c) for c in entry["color"]),
        tumor=bool(entry.get("tumor", False)),
        anatomic_region_modifier=_code(entry.get("anatomic_region_modifier")),
    )


@lru_cache(maxsize=1)
def label_table() -> LabelTable:
    """The packaged MAISI label table (``data/maisi_labels.json``), read once."""
    text = resources.files("maisicore").joinpath("data/maisi_labels.json").read_text(encoding="utf-8")
    data = json.loads(text)
    ts_total = {int(k): v for k, v in data["totalsegmentator_v2_total"].items()}
    return LabelTable([_label_info(e) for e in data["labels"]], ts_total)
