"""2.5D FID as NVIDIA's ``scripts/compute_fid_2-5d_ct.py`` computes it, offline and in bounded memory.

Preprocessing (the reference's MONAI transforms, in its order): reorient to RAS, resample to
``spacing`` mm (bilinear), pad with −1000 HU to ``shape`` voxels, centre-crop to ``shape``, clip HU to
[−1000, 1000]. Plane sampling: the central ``ratio`` of the slices along each axis (the reference's
``int((1 − r)/2 · n)`` to ``int((1 + r)/2 · n)``): XY planes along z, YZ planes along x, ZX planes
along y. Each plane set is scaled to [0, 1] by its own minimum and maximum (over all its slices, as
the reference does on the whole stack), repeated to 3 channels, the ImageNet channel means
(0.406, 0.456, 0.485, in the reference's BGR order) subtracted, passed through the feature network,
and the feature map averaged over its spatial axes. FID per plane is MONAI's ``FIDMetric`` (synthetic
features first, real second, as the reference), and the average is the mean of the three planes.

Unlike the reference, slices go through the network ``batch`` at a time (the stack of one 512³
plane set alone is 640 MB before the network's activations) with the plane's min/max taken first,
so the values are those of the reference's single batch up to float rounding.

The feature network of the published figures is RadImageNet's ResNet-50 (Mei et al., 2022) as the
torch.hub repository ``Warvito/radimagenet-models`` builds it: a Keras-style ResNet-50 (biased
convolutions, stride on the first 1×1 convolution of a bottleneck, batch-norm epsilon 1.001e-5, no
pooling or classifier head; the output is layer 4's 2048-channel feature map). Its weights file is
fetched from Google Drive by that repository, so here the user gives it (``--feature-weights``):
``RadImageNetResNet50`` loads it as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..io.geometry import Volume

PLANES = ("xy", "yz", "zx")
REFERENCE_SHAPE = (512, 512, 512)  # voxels, the reference's target_shape
REFERENCE_SPACING = (1.0, 1.0, 1.0)  # mm, the reference's enable_resampling_spacing
REFERENCE_RATIO = 0.4  # the reference's enable_center_slices_ratio
CHANNEL_MEANS = (0.406, 0.456, 0.485)  # subtracted per channel after the BGR swap, as the reference
HU_RANGE = (-1000.0, 1000.0)


class _Bottleneck(nn.Module):
    """Keras-style bottleneck: 1×1 (strided) → 3×3 → 1×1 convolutions with biases, batch norm, ReLU."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int = 1):
        super().__init__()
        outputs = width * self.expansion
        self.conv1 = nn.Conv2d(inputs, width, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(width, eps=1.001e-5)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width, eps=1.001e-5)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(outputs, eps=1.001e-5)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=True),
                                            nn.BatchNorm2d(outputs, eps=1.001e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class RadImageNetResNet50(nn.Module):
    """RadImageNet's ResNet-50 without its head: (N, 3, H, W) → (N, 2048, H/32, W/32) feature maps.

    Parameter names match the ``RadImageNet-ResNet50_notop.pth`` state dict of the torch.hub
    repository the reference loads (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``...).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inputs = 64
        for index, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for block in range(blocks):
                layer.append(_Bottleneck(inputs, width, stride if block == 0 else 1))
                inputs = width * _Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_feature_network(path: str | os.PathLike | None, device: torch.device) -> nn.Module:
    """``RadImageNetResNet50`` with the weights in ``path`` (a state dict, ``weights_only`` load),
    in eval mode on ``device``. One-line ``InputError`` when no file is given or it does not fit."""
    if path is None:
        raise InputError(
            "--metrics fid-2.5d needs --feature-weights PATH: the RadImageNet ResNet-50 weights "
            "(RadImageNet-ResNet50_notop.pth, as the reference's torch.hub repository Warvito/radimagenet-models "
            "downloads them); they are not fetched at run time")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--feature-weights {path}: file not found")
    from ..models.weights import load_checkpoint

    try:
        state = load_checkpoint(path)  # weights_only; a one-line refusal of our own, never torch's text
    except InputError as exc:
        raise InputError(f"--feature-weights {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    network = RadImageNetResNet50()
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--feature-weights {path}: not a RadImageNet ResNet-50 state dict ({first})") from exc
    return network.to(device).eval()


def preprocess(volume: Volume, spacing=REFERENCE_SPACING, shape=REFERENCE_SHAPE) -> torch.Tensor:
    """The reference's transforms on a CT ``volume`` (HU): (1, 1, X, Y, Z) float32 HU in [−1000, 1000],
    RAS index order, ``spacing`` mm voxels, ``shape`` voxels."""
    from monai.data import MetaTensor
    from monai.transforms import CenterSpatialCrop, Orientation, ScaleIntensityRange, Spacing, SpatialPad

    image = MetaTensor(torch.from_numpy(np.asarray(volume.array, dtype=np.float32))[None],
                       affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    image = Orientation(axcodes="RAS")(image)
    image = Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear")(image)
    image = SpatialPad(spatial_size=tuple(int(n) for n in shape), mode="constant", value=HU_RANGE[0])(image)
    image = CenterSpatialCrop(roi_size=tuple(int(n) for n in shape))(image)
    image = ScaleIntensityRange(a_min=HU_RANGE[0], a_max=HU_RANGE[1], b_min=HU_RANGE[0], b_max=HU_RANGE[1],
                                clip=True)(image)
    return image.as_tensor()[None].float()


def central_range(length: int, ratio: float) -> tuple[int, int]:
    """Index range [start, stop) of the central ``ratio`` of ``length`` slices (the reference's rule)."""
    return int((1.0 - ratio) / 2.0 * length), int((1.0 + ratio) / 2.0 * length)


def plane_stack(image: torch.Tensor, plane: str, ratio: float) -> torch.Tensor:
    """The central slices of one plane of a (1, 1, X, Y, Z) image as (N, 1, H, W) (a view): ``xy``
    slices along z (N, 1, X, Y), ``yz`` along x (N, 1, Y, Z), ``zx`` along y (N, 1, X, Z)."""
    axis = {"xy": 4, "yz": 2, "zx": 3}[plane]
    start, stop = central_range(image.shape[axis], ratio)
    part = image.narrow(axis, start, stop - start)[0]  # (1, X', Y', Z')
    return part.movedim(axis - 1, 0)  # (N, 1, H, W)


def plane_features(
    image: torch.Tensor,
    network: nn.Module,
    ratio: float = REFERENCE_RATIO,
    batch: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Features (N, C) float32 on CPU for each plane of a preprocessed (1, 1, X, Y, Z) image, slices
    through ``network`` ``batch`` at a time; ``progress(n)`` after each batch of n slices."""
    device = torch.device(device)
    means = torch.tensor(CHANNEL_MEANS, dtype=torch.float32).view(1, 3, 1, 1)
    out = {}
    with torch.no_grad():
        for plane in PLANES:
            stack = plane_stack(image, plane, ratio)
            low, high = torch.min(stack), torch.max(stack)
            parts = []
            for start in range(0, stack.shape[0], batch):
                chunk = stack[start:start + batch].repeat(1, 3, 1, 1)
                chunk = (chunk - low) / (high - low + 1e-10) - means
                features = network(chunk.to(device))
                if features.ndim == 4:
                    features = features.mean([2, 3])
                parts.append(features.float().cpu())
                if progress:
                    progress(chunk.shape[0])
            out[plane] = torch.cat(parts)
    return out


def slices_per_image(shape=REFERENCE_SHAPE, ratio: float = REFERENCE_RATIO) -> int:
    """How many slices one image sends through the network (all three planes)."""
    x, y, z = shape
    return sum(b - a for a, b in (central_range(z, ratio), central_range(x, ratio), central_range(y, ratio)))


def fid_per_plane(synthetic: dict[str, torch.Tensor], real: dict[str, torch.Tensor]) -> dict[str, float]:
    """MONAI's FID for each plane (synthetic first, as the reference) and their mean (``average``)."""
    from monai.metrics import FIDMetric

    metric = FIDMetric()
    values = {plane: float(metric(synthetic[plane], real[plane])) for plane in PLANES}
    values["average"] = float(sum(values[p] for p in PLANES) / 3.0)
    return values
