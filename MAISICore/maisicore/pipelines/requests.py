"""Requests: what a user asks maisicore to do, as plain data.

One request format serves every front end: the ``maisi`` command line builds a request from its
flags, ``maisi run REQUEST.json`` reads one from a file, the Slicer modules and batch workers build
them in Python. A request is a dataclass that serialises to and from JSON (``to_dict`` /
``request_from_dict``) and is checked in one place (``check``: one-line ``InputError``, no file is
read and no network built). What a request means is carried out by the pipelines
(``maisicore.pipelines.generate.GeneratePipeline``, ``maisicore.pipelines.inpaint.InpaintPipeline``)
and ``maisicore.pipelines.runner``.

Units: ``size`` voxels (x, y, z); ``spacing`` mm (x, y, z); ``tumor_center`` RAS mm; diameters mm.
This module imports no torch (the Slicer GUI builds requests without loading it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import InputError
from ..models.presets import BODY_REGIONS

DECODE_METHODS = ("exact", "sliding-window", "plain")
OUTPUT_FORMATS = ("nifti", "nrrd", "dicom")  # None: from --out's extension
FIT_MODES = ("auto", "always", "never")
WEIGHTS_ACTIONS = ("list", "download", "remove")
DRAFT_MAX_STEPS = 10  # a draft's network evaluations at most (ab2: N steps cost N + 1, so at most 9 steps)
MAX_SEED = 2**63  # seeds are 0 <= seed < 2**63 (torch's generator takes 64-bit seeds)


def _fmt(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def _check_seed(seed, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise InputError(f"{name} {seed!r}: must be an integer from 0 to 2^63-1")


def _check_triple(values, name: str, kind: type, positive: bool = True) -> None:
    if values is None:
        return
    if len(values) != 3:
        raise InputError(f"{name} takes three values X Y Z, got {len(values)}")
    for value in values:
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{name} {_fmt(values)}: sizes are whole numbers of voxels")
        if not math.isfinite(float(value)) or (positive and float(value) <= 0):
            raise InputError(f"{name} {' '.join(str(v) for v in values)}: every value must be a positive finite number")


def _check_positive(value, name: str, unit: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} {value!r}: must be a positive number{unit}")


def _check_sampler(sampler) -> None:
    from ..models.presets import check_sampler  # torch-free rule

    check_sampler(str(sampler))


def _check_precision(precision, reference_numerics) -> None:
    from ..precision import check_precision  # torch-free rule

    check_precision(precision, reference_numerics)


def _check_steps(steps) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps {steps!r}: must be a positive integer")


def _check_format(output_format, out) -> None:
    """``--format``: one of ``OUTPUT_FORMATS`` agreeing with ``--out`` (a new folder for dicom)."""
    if output_format is None:
        return
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if not out:
        raise InputError(f"--format {output_format} names how --out is written: give --out")
    name = str(out).lower()
    if output_format == "dicom" and name.endswith((".nii", ".nii.gz", ".nrrd")):
        raise InputError(f"--out {out}: --format dicom writes a folder (DIR/ct/ and DIR/labels.dcm); "
                         "give a folder name without a volume extension")
    wanted = {"nifti": (".nii", ".nii.gz"), "nrrd": (".nrrd",)}.get(output_format)
    if wanted and not name.endswith(wanted):
        raise InputError(f"--out {out}: --format {output_format} writes {' or '.join(wanted)} files")


@dataclass
class _Request:
    """Shared JSON round trip; subclasses name their ``kind``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON-ready data, with its ``kind``; ``None`` fields are left out."""
        data = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def output_paths(self) -> dict[str, str]:
        """Option name → path of every file the request writes."""
        return {}

    def input_paths(self) -> dict[str, str]:
        """Option name → path of every file or folder the request reads."""
        return {}

    def output_folders(self) -> set[str]:
        """Options among ``output_paths`` that name a folder (``--out`` with ``--format dicom``)."""
        return {"--out"} if getattr(self, "format", None) == "dicom" else set()


@dataclass
class GenerateRequest(_Request):
    """Generate a synthetic CT (int16 HU), optionally following a MAISI label mask.

    Mask sources (at most one): ``mask`` (a label file; the Python API may pass a ``Volume``
    instead), ``anatomy`` (names that a mask picked from the candidate database must hold), or
    ``anatomy_size`` (``"liver=0.6,hepatic tumor=0.1"``: a mask generated by the model's mask
    networks with those anatomy sizes, the reference's controllable anatomy size; ``mask_steps`` DDPM
    steps, default 1000; size database ``anatomy_size_db``, default in ``$MAISI_HOME/datasets``).
    ``fit``: ``auto`` fits a mask whose grid the model cannot take onto the closest valid grid (or
    onto ``size``/``spacing``) and maps the results back onto the mask's grid; ``always`` fits even a
    valid grid and keeps the fitted grid unless ``on_mask_grid``; ``never`` refuses.
    """

    kind: ClassVar[str] = "generate"
    model: str = "rflow-ct"
    weights_dir: str | None = None
    out: str | None = None  # CT file (.nii, .nii.gz, .nrrd); None: nothing written (Python API)
    label_out: str | None = None
    preview: str | None = None  # PNG of the mid-planes
    mask: str | None = None
    anatomy: list[str] | None = None
    mask_db: str | None = None
    mask_dir: str | None = None
    size: list[int] | None = None  # voxels x y z
    spacing: list[float] | None = None  # mm x y z
    body_region: list[str] | None = None
    fit: str = "auto"
    on_mask_grid: bool | None = None  # None: True for fit=auto, False for fit=always
    seed: int = 0
    steps: int | None = None
    sampler: str = "euler"  # rectified flow: euler (reference), heun or ab2 (second order; diffusion.schedulers)
    qc_retries: int = 0
    device: str = "auto"
    decode: str = "exact"
    devices: list[str] | None = None  # the exact decode's slabs spread over these (cpu, cuda, cuda:N; may repeat)
    memory_budget_gb: float | None = None
    allow_any_size: bool = False
    dry_run: bool = False  # check everything, estimate the peak memory, run no network
    format: str | None = None  # nifti, nrrd (by --out's extension when None) or dicom (--out is a new folder)
    modality: str | None = None  # modality_mapping.json name (ct, mri_t1, ...); None: the model's default
    guidance_scale: float | None = None  # classifier-free guidance; None: the model's reference default
    anatomy_size: str | None = None  # "liver=0.6,hepatic tumor=0.1": generate the mask with these sizes
    anatomy_size_db: str | None = None  # all_anatomy_size_conditions.json; None: $MAISI_HOME/datasets
    mask_steps: int | None = None  # DDPM steps of the mask generation; None: 1000 (reference)
    precision: str = "auto"  # auto, fp32, bf16, fp16 (maisicore.precision)
    reference_numerics: bool = False  # NVIDIA's attention and precision: latents equal to its code's
    draft: bool = False  # a quick look: fewer voxels, ab2 with at most DRAFT_MAX_STEPS, resampled back
    update: str | None = None  # a previous CT of this request: regenerate only where the labels changed
    previous_labels: str | None = None  # the labels the previous CT was generated from (with ``update``)
    update_margin_mm: float | None = None  # mm around the changed voxels that are regenerated too

    def check(self, has_mask_volume: bool = False) -> None:
        """Refuse contradictory or out-of-range options with one line (nothing is read)."""
        has_mask = bool(self.mask) or has_mask_volume
        _check_precision(self.precision, self.reference_numerics)
        self._check_draft_and_update(has_mask)
        if self.anatomy_size is not None:
            from ..anatomy.maskgen import parse_anatomy_sizes  # torch-free

            if has_mask or self.anatomy:
                raise InputError("--anatomy-size generates the mask; leave out --mask and --anatomy")
            parse_anatomy_sizes(self.anatomy_size)
        elif self.anatomy_size_db or self.mask_steps is not None:
            raise InputError("--anatomy-size-db and --mask-steps go with --anatomy-size")
        if self.mask_steps is not None and (isinstance(self.mask_steps, bool) or not isinstance(self.mask_steps, int)
                                            or self.mask_steps < 1):
            raise InputError(f"--mask-steps {self.mask_steps!r}: must be a positive integer")
        has_labels = has_mask or bool(self.anatomy) or self.anatomy_size is not None
        if self.guidance_scale is not None:
            g = self.guidance_scale
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise InputError(f"--guidance-scale {g!r}: must be a finite number, 0 or more (0: no guidance)")
        if self.anatomy is not None and not [a for a in self.anatomy if str(a).strip()]:
            raise InputError("--anatomy: give at least one MAISI anatomy name")
        if self.anatomy and has_mask:
            raise InputError("--anatomy picks a mask from --mask-db; leave out --mask (or --anatomy)")
        if self.fit not in FIT_MODES:
            raise InputError(f"fit {self.fit!r}: choose one of {', '.join(FIT_MODES)}")
        if self.fit == "always" and not has_mask:
            raise InputError("--fit-grid needs --mask")
        if self.on_mask_grid and not has_mask:
            raise InputError("--on-mask-grid goes with --mask")
        if self.decode not in DECODE_METHODS:
            raise InputError(f"--decode {self.decode!r}: choose one of {', '.join(DECODE_METHODS)}")
        if self.devices is not None:
            from ..devices import check_decode_method, parse_devices  # torch-free: spelling; CUDA when run

            check_decode_method(parse_devices(self.devices), self.decode)
        _check_triple(self.size, "--size", int)
        _check_triple(self.spacing, "--spacing", float)
        if self.body_region is not None:
            bad = [r for r in self.body_region if r not in BODY_REGIONS]
            if bad or not self.body_region:
                raise InputError(f"--body-region {bad[0] if bad else ''!r}: choose from {', '.join(BODY_REGIONS)}")
        _check_seed(self.seed, "--seed")
        _check_steps(self.steps)
        _check_sampler(self.sampler)
        if isinstance(self.qc_retries, bool) or not isinstance(self.qc_retries, int) or self.qc_retries < 0:
            raise InputError(f"--qc-retries {self.qc_retries!r}: must be 0 or more")
        if self.qc_retries and not has_labels:
            raise InputError("--qc-retries checks organs of a mask: give --mask, --anatomy or --anatomy-size")
        if self.label_out and not has_labels:
            raise InputError("--label-out writes the labels of a mask: give --mask, --anatomy or --anatomy-size")
        _check_positive(self.memory_budget_gb, "--memory-budget", " of GB")
        if self.preview is not None and not str(self.preview).lower().endswith(".png"):
            raise InputError(f"--preview {self.preview}: must end with .png")
        _check_format(self.format, self.out)

    def _check_draft_and_update(self, has_mask: bool) -> None:
        if not isinstance(self.draft, bool):
            raise InputError(f"draft {self.draft!r}: must be true or false")
        if self.draft:
            if self.update:
                raise InputError("--draft and --update: choose one (an update regenerates part of a full result)")
            if self.steps is not None and self.steps > DRAFT_MAX_STEPS - 1:
                raise InputError(f"--steps {self.steps} with --draft: a draft runs at most {DRAFT_MAX_STEPS} network "
                                 f"evaluations, {DRAFT_MAX_STEPS - 1} ab2 steps (leave out --steps, or --draft for a "
                                 "full result)")
            if self.sampler not in ("euler", "ab2"):
                raise InputError(f"--sampler {self.sampler} with --draft: a draft samples with ab2; leave out --sampler")
            if self.qc_retries:
                raise InputError("--qc-retries checks a full result; leave it out of a --draft")
        if self.update_margin_mm is not None and not self.update:
            raise InputError("--update-margin goes with --update PREVIOUS_CT")
        if self.previous_labels and not self.update:
            raise InputError("--previous-labels goes with --update PREVIOUS_CT")
        if self.update:
            if not has_mask or self.anatomy or self.anatomy_size is not None:
                raise InputError("--update regenerates where --mask differs from --previous-labels: give --mask NEW_LABELS "
                                 "(not --anatomy or --anatomy-size)")
            if not self.previous_labels:
                raise InputError("--update PREVIOUS_CT needs --previous-labels (the labels PREVIOUS_CT was generated from)")
            _check_positive(self.update_margin_mm, "--update-margin", " of mm")
            if self.size is not None or self.spacing is not None or self.fit != "auto" or self.on_mask_grid:
                raise InputError("--update keeps the grid of PREVIOUS_CT and the masks: leave out --size, --spacing, "
                                 "--fit-grid, --no-fit and --on-mask-grid")
            if self.qc_retries:
                raise InputError("--qc-retries regenerates a whole CT; leave it out of an --update")

    @property
    def maps_back(self) -> bool:
        """Whether results of a fitted mask go back onto the mask's own grid."""
        return self.on_mask_grid if self.on_mask_grid is not None else self.fit == "auto"

    def output_paths(self) -> dict[str, str]:
        named = {"--out": self.out, "--label-out": self.label_out, "--preview": self.preview}
        return {k: v for k, v in named.items() if v}

    def input_paths(self) -> dict[str, str]:
        named = {"--mask": self.mask, "--mask-db": self.mask_db, "--anatomy-size-db": self.anatomy_size_db,
                 "--update": self.update, "--previous-labels": self.previous_labels}
        return {k: v for k, v in named.items() if v}


@dataclass
class InpaintRequest(_Request):
    """Inpaint a tumour into a real CT: from ``tumor_mask``, or a ball at ``tumor_center`` (RAS mm)
    of ``tumor_diameter`` (mm), clipped to its host organ in ``labels`` when given."""

    kind: ClassVar[str] = "inpaint"
    image: str | None = None
    tumor_type: str = ""
    tumor_mask: str | None = None
    tumor_center: list[float] | None = None
    tumor_diameter: float | None = None
    labels: str | None = None
    model: str = "rflow-ct"
    weights_dir: str | None = None
    seed: int = 0
    steps: int | None = None
    device: str = "auto"
    out: str | None = None
    label_out: str | None = None
    format: str | None = None  # nifti, nrrd (by --out's extension when None) or dicom (--out is a new folder)
    keep_patient: bool = False  # dicom: copy the source series' patient and study, reference its slices
    precision: str = "auto"  # auto, fp32, bf16, fp16 (maisicore.precision)
    reference_numerics: bool = False  # NVIDIA's attention and precision

    def check(self, has_image_volume: bool = False) -> None:
        """Refuse contradictory or out-of-range options with one line (nothing is read)."""
        _check_precision(self.precision, self.reference_numerics)
        if not self.image and not has_image_volume:
            raise InputError("inpaint needs --image CT")
        if not self.tumor_type:
            raise InputError("inpaint needs --tumor-type")
        if bool(self.tumor_mask) == (self.tumor_center is not None):
            raise InputError("give either --tumor-mask, or --tumor-center with --tumor-diameter")
        if self.tumor_center is not None:
            _check_triple(self.tumor_center, "--tumor-center", float, positive=False)
            if self.tumor_diameter is None:
                raise InputError("--tumor-center needs --tumor-diameter MM (a positive number)")
            _check_positive(self.tumor_diameter, "--tumor-diameter", " of mm")
        _check_seed(self.seed, "--seed")
        _check_steps(self.steps)
        _check_format(self.format, self.out)
        if self.keep_patient and self.format != "dicom":
            raise InputError("--keep-patient copies the patient into DICOM output: add --format dicom")

    def output_paths(self) -> dict[str, str]:
        named = {"--out": self.out, "--label-out": self.label_out}
        return {k: v for k, v in named.items() if v}

    def input_paths(self) -> dict[str, str]:
        named = {"--image": self.image, "--tumor-mask": self.tumor_mask, "--labels": self.labels}
        return {k: v for k, v in named.items() if v}


@dataclass
class WeightsRequest(_Request):
    """Manage official weights: ``list`` (status of every model), ``download`` (after the licence
    was accepted) or ``remove`` a downloaded model."""

    kind: ClassVar[str] = "weights"
    action: str = "list"
    model: str | None = None
    accept_license: bool = False
    base_url: str | None = None
    include_datasets: bool = False

    def check(self) -> None:
        from ..models.presets import MODEL_NAMES

        if self.action not in WEIGHTS_ACTIONS:
            raise InputError(f"weights action {self.action!r}: choose one of {', '.join(WEIGHTS_ACTIONS)}")
        if self.action != "list" and self.model not in MODEL_NAMES:
            raise InputError(f"weights {self.action}: model {self.model!r} must be one of {', '.join(MODEL_NAMES)}")


REQUEST_TYPES: dict[str, type[_Request]] = {r.kind: r for r in (GenerateRequest, InpaintRequest, WeightsRequest)}
Request = GenerateRequest | InpaintRequest | WeightsRequest


def _field_value(cls, f: dataclasses.Field, value, where: str):
    """``value`` coerced to the field's JSON type, or a one-line InputError."""
    annotation = str(f.type)
    if value is None:
        if "None" in annotation:
            return None
        raise InputError(f"{where}: {f.name!r} may not be null")
    if annotation.startswith("list["):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: {f.name!r} must be a list")
        item = annotation[5:].split("]")[0]
        kinds = {"int": int, "float": (int, float), "str": str}[item]
        if any(isinstance(v, bool) or not isinstance(v, kinds) for v in value):
            raise InputError(f"{where}: {f.name!r} must be a list of {item} values")
        return [float(v) if item == "float" else v for v in value]
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise InputError(f"{where}: {f.name!r} must be true or false")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {f.name!r} must be an integer")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: {f.name!r} must be a number")
        return float(value)
    if annotation.startswith("str"):
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{where}: {f.name!r} must be a string")
        return os.fspath(value)
    return value


def request_from_dict(data: dict[str, Any], where: str = "request") -> Request:
    """A request from JSON data (``{"kind": "generate" | "inpaint" | "weights", ...}``); unknown
    keys, wrong types and unknown kinds are refused with one line naming the key."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: must be a JSON object with a \"kind\"")
    kind = data.get("kind")
    if kind not in REQUEST_TYPES:
        raise InputError(f"{where}: \"kind\" {kind!r} must be one of {', '.join(REQUEST_TYPES)}")
    cls = REQUEST_TYPES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"kind"})
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} for a {kind} request (known: {', '.join(fields)})")
    values = {name: _field_value(cls, fields[name], value, where) for name, value in data.items() if name != "kind"}
    return cls(**values)


def read_request(path: str | os.PathLike) -> Request:
    """The request in a JSON file (see ``request_from_dict``)."""
    from ..io.volumes import read_json

    return request_from_dict(read_json(path, "request"), where=str(path))


def write_request(path: str | os.PathLike, request: Request) -> None:
    """Write ``request`` as JSON (temporary file + rename)."""
    from pathlib import Path

    from ..io.volumes import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(request.to_json() + "\n", encoding="utf-8"), suffix=".json")


# ---- results --------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What a finished request reports back: files written (role → path), the seed used, the
    quality-check table, notes, and seconds per stage."""

    files: dict[str, str] = field(default_factory=dict)
    seed_used: int | None = None
    qc: list[dict] | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
