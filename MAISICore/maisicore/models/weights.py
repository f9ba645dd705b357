"""Weight sets on disk in the reference layout, read safely.

A weight directory holds the three checkpoints under ``models/`` (NVIDIA's layout; files directly
in the directory are accepted too) and, when ``maisi weights init`` or training made it, a
``maisi_model.json`` card naming the model and width. Checkpoint contents (reference layout):

- autoencoder: a plain state dict (older files nest it under ``unet_state_dict``);
- diffusion UNet: ``{"unet_state_dict": ..., "scale_factor": tensor, ...}``;
- ControlNet: ``{"controlnet_state_dict": ...}``, applied on top of the UNet's weights.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
pickled code.

Extra state-dict keys a network does not have are refused, except those an allow-list names as
benign: ``ALLOWED_EXTRA_KEYS`` here (per role, ``fnmatch`` patterns; empty: no published file is known
to need one) plus the weight folder card's ``"allowed_extra_keys": {"ROLE": ["PATTERN", ...]}``.
Allowed keys are dropped before loading; ``check_weight_set`` (``maisi weights verify --load``) lists them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..io.volumes import atomic_write
from .networks import build_autoencoder, build_controlnet, build_diffusion_unet, configure_for_device
from .presets import DEMO_MODEL, MODEL_NAMES, WIDTHS, ModelPreset, get_preset

MODEL_CARD = "maisi_model.json"
MODELS_SUBDIR = "models"
ROLES = ("autoencoder", "diffusion_unet", "controlnet")
# Benign extra state-dict keys per role (fnmatch patterns), dropped before loading. Add a pattern
# here only for a published file, with the reason; a user adds their own in the card (module doc).
ALLOWED_EXTRA_KEYS: dict[str, tuple[str, ...]] = {role: () for role in ROLES}


def default_weights_root() -> Path:
    """Folder of downloaded weight sets: ``$MAISI_HOME/weights`` (default ``~/.maisi/weights``)."""
    from ..paths import weights_root

    return weights_root()


def weight_file(weights_dir: Path, name: str) -> Path:
    """Path of checkpoint ``name`` in ``weights_dir`` (``models/name`` or ``name``); the
    ``models/`` path when neither exists."""
    for candidate in (weights_dir / MODELS_SUBDIR / name, weights_dir / name):
        if candidate.is_file():
            return candidate
    return weights_dir / MODELS_SUBDIR / name


def read_model_card(weights_dir: Path) -> dict | None:
    """The weight set's ``maisi_model.json`` (``{"model": ..., "width": ...}``), or None."""
    card = Path(weights_dir) / MODEL_CARD
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{card}: not valid JSON ({exc})") from exc
    if data.get("model") not in MODEL_NAMES or data.get("width", "official") not in WIDTHS:
        raise InputError(f"{card}: 'model' must be one of {MODEL_NAMES} and 'width' one of {WIDTHS}")
    return data


def demo_weights_dir() -> Path:
    """The bundled demo model (tiny rflow-ct trained on one real CT, ``data/demo/MODEL_CARD.md``)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo"


def resolve_model(model: str, weights_dir: str | os.PathLike | None) -> tuple[ModelPreset, Path]:
    """Turn ``--model`` and ``--weights-dir`` into a preset and a weight folder.

    ``model`` is ``rflow-ct``/``ddpm-ct`` (weights in ``weights_dir`` or the default cache), ``demo``
    (the small model shipped in the package) or a weight folder with a model card. The width comes
    from the card (official when there is none).
    """
    if model == DEMO_MODEL:
        if weights_dir:
            raise InputError("--model demo is the bundled model; leave out --weights-dir")
        if read_model_card(demo_weights_dir()) is None:
            raise InputError(f"the demo model is missing from this installation ({demo_weights_dir()})")
        model = str(demo_weights_dir())
    if model in MODEL_NAMES:
        folder = Path(weights_dir) if weights_dir else default_weights_root() / model
        if not folder.is_dir():
            raise InputError(
                f"weights for {model} not found: folder {folder} does not exist; "
                f"give --weights-dir DIR (e.g. made by `maisi weights init --preset {model}`)"
            )
        card = read_model_card(folder)
        if card and card["model"] != model:
            raise InputError(f"{folder} holds {card['model']} weights, not {model}; use --model {card['model']}")
        return get_preset(model, (card or {}).get("width", "official")), folder
    folder = Path(model)
    if not folder.is_dir():
        raise InputError(f"--model {model}: not a model name ({', '.join(MODEL_NAMES)}) nor a weight folder")
    if weights_dir and Path(weights_dir).resolve() != folder.resolve():
        raise InputError("--model DIR already names the weight folder; leave out --weights-dir")
    card = read_model_card(folder)
    if card is None:
        raise InputError(
            f"{folder} has no {MODEL_CARD}; give --model rflow-ct|ddpm-ct --weights-dir {folder} instead"
        )
    return get_preset(card["model"], card.get("width", "official")), folder


def check_weight_files(preset: ModelPreset, weights_dir: Path) -> dict[str, Path]:
    """Paths of the preset's three checkpoints; refuses with one line when any is missing."""
    paths = {role: weight_file(weights_dir, name) for role, name in preset.weight_files.as_dict().items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"missing weight file(s) for {preset.key}: {', '.join(missing)}")
    return paths


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` (on CPU by default); one-line ``InputError`` if refused.

    The refusal is ours, never torch's text: it names the file and what is wrong with it (code or
    objects other than tensors, or not a checkpoint at all) and gives no advice to load it unsafely."""
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch's own warnings say nothing a refusal needs
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: weight file not found") from exc
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise InputError(f"{path}: not a PyTorch checkpoint, or truncated (UnpicklingError); it was not loaded") from exc
        blocked = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", str(exc))
        named = f" (it names {blocked.group(1)})" if blocked else ""
        raise InputError(f"{path}: refused: the file holds code or objects other than tensors{named}, so it was not "
                         "loaded; use a checkpoint of plain tensors (a state dict)") from exc
    except Exception as exc:
        raise InputError(f"{path}: not a PyTorch checkpoint, or truncated ({type(exc).__name__}); it was not loaded") from exc
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: refused: expected a dict of tensors, found {type(checkpoint).__name__}")
    return checkpoint


def state_dict_from(checkpoint: dict, key: str | None, path: Path, preset: ModelPreset) -> dict:
    if key is None:  # autoencoder: plain state dict, or nested in older files
        state = checkpoint.get("unet_state_dict", checkpoint)
    else:
        if key not in checkpoint:
            found = ", ".join(list(checkpoint)[:5]) or "nothing"
            raise InputError(f"{path}: not a {preset.key} checkpoint: no '{key}' entry (found: {found})")
        state = checkpoint[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a {preset.key} checkpoint: the state dict holds non-tensor values")
    return state


def allowed_extra_keys(weights_dir: Path, role: str) -> tuple[str, ...]:
    """The allow-list of benign extra keys for ``role``: ``ALLOWED_EXTRA_KEYS`` and the card's."""
    card = read_model_card(Path(weights_dir)) or {}
    extra = card.get("allowed_extra_keys") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                              for v in extra.values()):
        raise InputError(f"{Path(weights_dir) / MODEL_CARD}: 'allowed_extra_keys' must map a role "
                         f"({', '.join(ROLES)}) to a list of key patterns")
    return tuple(ALLOWED_EXTRA_KEYS.get(role, ())) + tuple(extra.get(role, ()))


def split_allowed(state: dict, expected, patterns: tuple[str, ...]) -> tuple[dict, list[str]]:
    """``state`` without the keys the network lacks that match an allowed pattern, and those keys."""
    from fnmatch import fnmatchcase

    allowed = [k for k in state if k not in expected and any(fnmatchcase(k, p) for p in patterns)]
    return {k: v for k, v in state.items() if k not in allowed}, allowed


def load_state(
    module: torch.nn.Module, state: dict, path: Path, preset: ModelPreset, allow_missing: frozenset[str] = frozenset(),
    allow_extra: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module`` after checking keys and shapes; one line naming the file,
    the preset and the first mismatching keys otherwise. Extra keys matching ``allow_extra``
    (fnmatch patterns) are dropped first."""
    expected = module.state_dict()
    state, _ = split_allowed(state, expected, allow_extra)
    missing = [k for k in expected if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches (first: {', '.join(wrong_shape[:2])})")
        raise InputError(f"{path} does not fit preset {preset.key}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=not allow_missing)


def start_controlnet_from_unet(controlnet: torch.nn.Module, diffusion_unet: torch.nn.Module) -> dict:
    """Copy the UNet's weights into the ControlNet wherever name and shape agree (reference
    ``copy_model_state``); returns the copied entries."""
    target = controlnet.state_dict()
    shared = {k: v for k, v in diffusion_unet.state_dict().items() if k in target and target[k].shape == v.shape}
    controlnet.load_state_dict(shared, strict=False)
    return shared


@dataclass
class LoadedModel:
    """The three networks of one weight set, ready for inference on ``device``."""

    preset: ModelPreset
    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    controlnet: torch.nn.Module | None  # None for image-only models (MR)
    scale_factor: float
    device: torch.device
    weights_dir: Path
    attention: str = "sdpa"  # the UNet's and ControlNet's attention (networks.ATTENTION_MODES)


def load_model(preset: ModelPreset, weights_dir: str | os.PathLike, device: torch.device | str = "cpu",
               attention: str = "sdpa", move: bool = True) -> LoadedModel:
    """Build the preset's networks and load the weight set in ``weights_dir`` into them.

    The networks are built and loaded on the CPU, then configured for ``device`` (flash/SDPA
    attention, the VAE's float16 norm on CUDA: ``networks.configure_for_device``) and moved there.
    ``attention``: ``sdpa`` (default, every device) or ``monai`` (MONAI's N × N attention).
    ``move=False`` leaves the configured networks on the CPU (``LoadedModel.device`` is still ``device``)."""
    weights_dir = Path(weights_dir)
    paths = check_weight_files(preset, weights_dir)
    device = torch.device(device)

    autoencoder = build_autoencoder(preset, "cpu")
    ae_path = paths["autoencoder"]
    load_state(autoencoder, state_dict_from(load_checkpoint(ae_path), None, ae_path, preset), ae_path, preset,
               allow_extra=allowed_extra_keys(weights_dir, "autoencoder"))

    diffusion_unet = build_diffusion_unet(preset, "cpu")
    unet_path = paths["diffusion_unet"]
    unet_checkpoint = load_checkpoint(unet_path)
    load_state(diffusion_unet, state_dict_from(unet_checkpoint, "unet_state_dict", unet_path, preset), unet_path, preset,
               allow_extra=allowed_extra_keys(weights_dir, "diffusion_unet"))
    scale_factor = unet_checkpoint.get("scale_factor", None)
    if scale_factor is None:
        raise InputError(f"{unet_path}: no 'scale_factor' entry; it is needed to decode latents")
    scale_factor = float(torch.as_tensor(scale_factor).float().reshape(-1)[0])

    # Reference: the ControlNet starts from the UNet's weights, then its own checkpoint is applied.
    controlnet = None  # image-only models (MR) have none
    if not preset.image_only:
        controlnet = build_controlnet(preset, "cpu")
        shared = start_controlnet_from_unet(controlnet, diffusion_unet)
        cn_path = paths["controlnet"]
        load_state(
            controlnet,
            state_dict_from(load_checkpoint(cn_path), "controlnet_state_dict", cn_path, preset),
            cn_path,
            preset,
            allow_missing=frozenset(shared),
            allow_extra=allowed_extra_keys(weights_dir, "controlnet"),
        )
        configure_for_device(controlnet, preset.controlnet, device, attention)
    configure_for_device(autoencoder, preset.autoencoder, device)
    configure_for_device(diffusion_unet, preset.diffusion_unet, device, attention)
    return LoadedModel(
        preset=preset,
        autoencoder=autoencoder.to(device) if move else autoencoder,
        diffusion_unet=diffusion_unet.to(device) if move else diffusion_unet,
        controlnet=controlnet.to(device) if move and controlnet is not None else controlnet,
        scale_factor=scale_factor,
        device=device,
        weights_dir=weights_dir,
        attention=attention,
    )


@dataclass
class WeightCheck:
    """How one checkpoint fits its network: tensors read, and the keys that are missing, unexpected
    (not allowed), of the wrong shape, or extra but allowed; ``error`` when it could not be read."""

    role: str
    path: Path
    tensors: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (self.error or self.missing or self.unexpected or self.wrong_shape)


def check_weight_set(preset: ModelPreset, weights_dir: str | os.PathLike) -> list[WeightCheck]:
    """Load each checkpoint of ``weights_dir`` (``weights_only=True``) against a freshly built
    network of ``preset`` and compare keys and shapes, as ``load_model`` would, without stopping at
    the first problem. The ControlNet may lack the keys it takes from the UNet (the reference loads
    it with ``strict=False`` on top of them)."""
    weights_dir = Path(weights_dir)
    paths = {role: weight_file(weights_dir, name) for role, name in preset.weight_files.as_dict().items()}
    builders = {"autoencoder": build_autoencoder, "diffusion_unet": build_diffusion_unet, "controlnet": build_controlnet}
    keys = {"autoencoder": None, "diffusion_unet": "unet_state_dict", "controlnet": "controlnet_state_dict"}
    unet_shapes = {k: v.shape for k, v in build_diffusion_unet(preset, "cpu").state_dict().items()}
    checks = []
    for role, path in paths.items():
        check = WeightCheck(role, path)
        checks.append(check)
        try:
            state = state_dict_from(load_checkpoint(path), keys[role], path, preset)
        except InputError as exc:
            check.error = str(exc)
            continue
        expected = {k: v.shape for k, v in builders[role](preset, "cpu").state_dict().items()}
        state, check.allowed = split_allowed(state, expected, allowed_extra_keys(weights_dir, role))
        from_unet = {k for k, shape in expected.items() if unet_shapes.get(k) == shape} if role == "controlnet" else set()
        check.tensors = len(state)
        check.missing = [k for k in expected if k not in state and k not in from_unet]
        check.unexpected = [k for k in state if k not in expected]
        check.wrong_shape = [f"{k} {tuple(v.shape)}≠{tuple(expected[k])}" for k, v in state.items()
                             if k in expected and v.shape != expected[k]]
    return checks


def fill_zero_initialised(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> int:
    """Give the layers MONAI initialises to zero (residual-branch and output convolutions, the
    ControlNet's condition and residual outputs; not norm biases) normal(0, std) values, in place.
    Returns how many tensors were filled."""
    filled = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" not in name and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
                filled += 1
    return filled


def init_weights(
    preset: ModelPreset, out_dir: str | os.PathLike, seed: int = 0, nonzero: bool = False
) -> dict[str, Path]:
    """Write a randomly initialised weight set for ``preset`` in the reference layout.

    The networks are MONAI's default initialisation under ``torch.manual_seed(seed)``; the
    ControlNet starts from the UNet's weights and the scale factor is 1. MONAI starts some layers
    at zero (the UNet's output, the ControlNet's outputs), so an untrained UNet predicts 0 and an
    untrained ControlNet adds nothing: right for training from scratch. ``nonzero=True`` fills
    those layers with small random values so untrained networks act (tests, pipeline demos).
    A ``maisi_model.json`` card records model and width.
    """
    out_dir = Path(out_dir)
    (out_dir / MODELS_SUBDIR).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(preset, "cpu")
    diffusion_unet = build_diffusion_unet(preset, "cpu")
    controlnet = None if preset.image_only else build_controlnet(preset, "cpu")
    if controlnet is not None:
        start_controlnet_from_unet(controlnet, diffusion_unet)
    if nonzero:
        generator = torch.Generator().manual_seed(seed + 1)
        fill_zero_initialised(diffusion_unet, generator)
        if controlnet is not None:
            fill_zero_initialised(controlnet, generator)
    unet_state = diffusion_unet.state_dict()

    files = preset.weight_files
    contents = {
        "autoencoder": (files.autoencoder, autoencoder.state_dict()),
        "diffusion_unet": (files.diffusion_unet, {"unet_state_dict": unet_state, "scale_factor": torch.tensor(1.0)}),
    }
    if controlnet is not None:
        contents["controlnet"] = (files.controlnet, {"controlnet_state_dict": controlnet.state_dict()})
    written = {}
    for role, (name, obj) in contents.items():
        written[role] = save_checkpoint(out_dir / MODELS_SUBDIR / name, obj)
    origin = f"random initialisation, seed {seed}" + (", zero-initialised layers filled" if nonzero else "")
    card = {"model": preset.name, "width": preset.width, "origin": origin}
    atomic_write(out_dir / MODEL_CARD, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    return written


def init_mask_weights(out_dir: str | os.PathLike, width: str = "official", seed: int = 0,
                      nonzero: bool = False) -> dict[str, Path]:
    """Write randomly initialised mask generation networks (``presets.get_mask_generation_preset``)
    into ``out_dir/models/`` under NVIDIA's names: the autoencoder as a plain state dict, the
    diffusion UNet as ``{"unet_state_dict", "scale_factor"}`` (the preset's scale factor). Seeded by
    ``seed``; ``nonzero`` as for ``init_weights``. Returns role → path."""
    from .networks import build_mask_networks
    from .presets import get_mask_generation_preset

    preset = get_mask_generation_preset(width)
    out_dir = Path(out_dir)
    (out_dir / MODELS_SUBDIR).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    autoencoder, unet = build_mask_networks(preset, "cpu")
    if nonzero:
        fill_zero_initialised(unet, torch.Generator().manual_seed(seed + 1))
    autoencoder_file, unet_file = preset.weight_files
    return {
        "mask_autoencoder": save_checkpoint(out_dir / MODELS_SUBDIR / autoencoder_file, autoencoder.state_dict()),
        "mask_diffusion_unet": save_checkpoint(out_dir / MODELS_SUBDIR / unet_file, {
            "unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(preset.scale_factor)}),
    }


def save_checkpoint(path: Path, obj: dict) -> Path:
    """``torch.save`` through a temporary file and a rename.

    The file is written through a handle, so the archive's internal folder is torch's fixed
    ``archive/`` rather than the temporary file's random name: equal tensors give equal bytes.
    """

    def write(tmp):
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    return atomic_write(path, write)
