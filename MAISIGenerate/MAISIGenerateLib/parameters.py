"""What a MAISIGenerate run is asked to do: plain dataclasses (nodes as values), filled by the
module's parameter node in Slicer or directly by batch scripts and tests. No Qt. The choices
(models, tumour types, body regions, the classes with a size control) and defaults are maisicore's,
imported from its torch-free modules (``models.presets``, ``anatomy.tumors``, ``anatomy.maskgen``):
this file is loaded at Slicer's start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from maisicore.anatomy.maskgen import ANATOMY_SIZE_CLASSES, SIZE_TUMORS, format_anatomy_sizes, parse_anatomy_sizes
from maisicore.anatomy.tumors import TUMOR_TYPES
from maisicore.models.presets import (
    BODY_REGIONS,
    DEFAULT_SIZE,
    DEFAULT_SPACING_MM,
    DEMO_MODEL,
    MODEL_MODALITIES,
    MODEL_NAMES,
)

__all__ = ["MODES", "DEVICES", "MODELS", "MODALITIES", "TUMOR_TYPES", "BODY_REGIONS", "ANATOMY_SIZE_CLASSES",
           "SIZE_TUMORS", "format_anatomy_sizes", "parse_anatomy_sizes", "DEFAULT_SIZE", "DEFAULT_SPACING_MM",
           "RunOptions", "body_options", "FromSegmentation", "RandomAnatomy", "InpaintTumor"]

MODES = ("segmentation", "random", "inpaint")
DEVICES = ("auto", "cpu", "cuda")
MODELS = (*MODEL_NAMES, DEMO_MODEL)  # the named models; a weight folder is the other choice
# "auto" (the model's default modality), then every modality name some model takes, in model order.
MODALITIES = ("auto", *dict.fromkeys(m for model in MODEL_NAMES for m in MODEL_MODALITIES[model]))


@dataclass
class RunOptions:
    """Model and sampling options common to every mode.

    model: ``rflow-ct``, ``ddpm-ct``, ``demo`` or a weight folder with a ``maisi_model.json`` card.
    weights_dir: folder of the model's weights (None: the maisi cache, ``$MAISI_HOME/weights/MODEL``).
    steps: denoising steps (None: the model's default, its preset's ``scheduler.default_steps``).
    device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    allow_any_size: accept sizes that are multiples of 32 and any spacing (tiny models, tests).
    modality: a name of ``MODALITIES`` the model takes (``mri_t1`` ... for the MR models); None or
        ``auto``: the model's default.
    reference_numerics: NVIDIA's attention and precision, so the latents equal its code's on the CPU
        (``--reference-numerics``; slower); False: the faster default.
    """

    model: str = "rflow-ct"
    weights_dir: str | None = None
    seed: int = 0
    steps: int | None = None
    device: str = "auto"
    allow_any_size: bool = False
    modality: str | None = None
    reference_numerics: bool = False


def body_options(air_hu: float = -800.0, closing_voxels: int = 3, bed_voxels: int = 5, table_fraction: float = 0.05,
                 lungs: str = "auto"):
    """The body envelope's parameters (``maisicore.anatomy.body.BodyOptions``, checked: a bad value
    raises ``InputError``, one line): air threshold (HU), odd closing and bed kernel sides (voxels),
    table fraction, and whether the segments include the lungs (``auto``/``yes``/``no``)."""
    from maisicore.anatomy.body import BodyOptions

    have_lungs = {"auto": None, "yes": True, "no": False}[lungs]
    return BodyOptions(float(air_hu), int(closing_voxels), int(bed_voxels), float(table_fraction), have_lungs).check()


@dataclass
class FromSegmentation:
    """Generate a CT that follows a segmentation.

    segmentation: vtkMRMLSegmentationNode; segments are matched to MAISI labels by name, then by
        terminology; ``overrides`` (segment id or name -> MAISI id or name; 0 or "" skips the segment)
        wins over both.
    reference_volume: vtkMRMLScalarVolumeNode whose grid the labels (and the result) take; its CT also
        gives the body envelope (NVIDIA's ``add_body_envelope`` algorithm). None: the segmentation's
        own reference geometry, envelope from the labels alone (smaller: no skin, fat or limbs).
    add_body: add the body envelope (label 200); body_options: its parameters from the CT
        (``maisicore.anatomy.body.BodyOptions``: air threshold, kernels, table fraction, lungs
        labelled); None: the reference's defaults.
    fit_grid: generate on ``size``/``spacing`` (or, when None, the published grid closest to the
        mask's field of view) around the labelled region, then map the result back onto the mask's grid.
    size: (x, y, z) voxels; spacing: (x, y, z) mm; both or neither (only with ``fit_grid``).
    draft: a quick look (the request's ``draft``: fewer voxels, at most 9 ab2 steps, resampled onto
        the mask's grid); its nodes are named "... (draft)" and it never becomes the previous result.
    update_changed: after a (non-draft) result of this segmentation, regenerate only the edited
        region when the edit is small ("Update the changed region", ``GenerateLogic.plan_apply``);
        False: always generate again.
    """

    segmentation: object
    reference_volume: object | None = None
    overrides: dict = field(default_factory=dict)
    add_body: bool = True
    fit_grid: bool = False
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    body_options: object | None = None
    draft: bool = False
    update_changed: bool = True


@dataclass
class RandomAnatomy:
    """Generate a CT without a user mask: with ``anatomy`` (MAISI names) a mask is drawn from the
    candidate mask database (``mask_db``, default the maisi cache's); with ``anatomy_sizes``
    ((name, size) pairs, names of ``ANATOMY_SIZE_CLASSES``, size 0–1 or −1 for absent) the model's
    mask networks generate the mask (``mask_steps`` DDPM steps, None: all of the mask scheduler's
    timesteps, 1000 for NVIDIA's networks; size database
    ``anatomy_size_db``, default the maisi cache's); else the diffusion model runs alone (not both).
    size (x, y, z) voxels, spacing (x, y, z) mm; body_regions for ddpm-ct, top first."""

    anatomy: tuple[str, ...] = ()
    body_regions: tuple[str, ...] = ()
    size: tuple[int, int, int] = DEFAULT_SIZE
    spacing: tuple[float, float, float] = DEFAULT_SPACING_MM
    mask_db: str | None = None
    anatomy_sizes: tuple[tuple[str, float], ...] = ()
    anatomy_size_db: str | None = None
    mask_steps: int | None = None


@dataclass
class InpaintTumor:
    """Inpaint a tumour of ``tumor_type`` into ``volume`` (vtkMRMLScalarVolumeNode, HU).

    The tumour is a segment (``tumor_segmentation`` + ``tumor_segment_id``) or a ball around
    ``center_ras`` (R, A, S mm, e.g. a markup point) of ``diameter_mm``. ``anatomy_segmentation``
    (optional) gives the host organs (segments matched like FromSegmentation)."""

    volume: object
    tumor_type: str = "hepatic tumor"
    tumor_segmentation: object | None = None
    tumor_segment_id: str | None = None
    center_ras: tuple[float, float, float] | None = None
    diameter_mm: float | None = None
    anatomy_segmentation: object | None = None
    overrides: dict = field(default_factory=dict)
