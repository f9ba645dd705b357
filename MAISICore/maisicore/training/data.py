"""Training batches that depend only on (seed, step, sample index): resumable and shardable exactly.

Sample ``j`` of the global batch at optimiser step ``s`` is global sample ``n = s·B + j``. Its case is
the ``n mod N``-th entry of a permutation drawn for epoch ``n // N``; its patch position, noise,
timestep and condition dropout come from a generator seeded by ``(seed, s, j)``. So a run resumed
at step ``s`` sees exactly the batches it would have seen, and ``P`` processes with ``B/P`` samples
each see together what one process with ``B`` samples sees.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..vae.decode import hu_to_unit
from .datalist import Case


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of global sample ``index`` at optimiser step ``step``."""
    return torch.Generator().manual_seed(derived_seed(seed, 1, step, index))


class CaseOrder:
    """Which case each global sample uses: a fresh permutation every epoch."""

    def __init__(self, num_cases: int, global_batch: int, seed: int):
        self.num_cases, self.global_batch, self.seed = num_cases, global_batch, seed
        self._epoch, self._perm = None, None

    def case_index(self, step: int, index: int) -> int:
        n = step * self.global_batch + index
        epoch = n // self.num_cases
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, 2, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_cases, generator=generator)
        return int(self._perm[n % self.num_cases])

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.num_cases // self.global_batch))


class VolumeCache:
    """The last few volumes read, in memory (a training set is read over and over)."""

    def __init__(self, loader, size: int = 8):
        self.loader, self.size, self.items = loader, size, OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.loader(key)
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def load_image_unit(path) -> np.ndarray:
    """A CT in closest-RAS order on MAISI's [0, 1] intensity scale (HU clipped to ±1000), float32 (x, y, z)."""
    from ..io.geometry import to_closest_ras
    from ..io.volumes import read_volume

    volume, _ = to_closest_ras(read_volume(path))
    return hu_to_unit(volume.array.astype(np.float32)).astype(np.float32)


def load_latent(path) -> np.ndarray:
    """A latent NIfTI [X, Y, Z, 4] as float32 (4, X, Y, Z)."""
    from ..pipelines.vae import read_latent

    array, _ = read_latent(path)
    return np.ascontiguousarray(array.transpose(3, 0, 1, 2)).astype(np.float32)


def load_labels(path) -> np.ndarray:
    from ..io.volumes import read_volume

    return np.asarray(read_volume(path).array).astype(np.int64)


def random_start(size: int, patch: int, generator: torch.Generator) -> int:
    if size <= patch:
        return 0
    return int(torch.randint(0, size - patch + 1, (1,), generator=generator))


def crop_or_pad(array: np.ndarray, start, patch, fill: float) -> np.ndarray:
    """``array[..., start:start+patch]`` over the last three axes, padded with ``fill`` where short."""
    out = np.full(array.shape[:-3] + tuple(patch), fill, dtype=array.dtype)
    src = tuple(slice(s, min(s + p, n)) for s, p, n in zip(start, patch, array.shape[-3:]))
    dst = tuple(slice(0, sl.stop - sl.start) for sl in src)
    out[(...,) + dst] = array[(...,) + src]
    return out


@dataclass
class Sample:
    """One training sample and its generator (for noise, timesteps, dropout drawn later)."""

    case: Case
    image: torch.Tensor | None = None  # (1, X, Y, Z) VAE patch, [0, 1]
    latent: torch.Tensor | None = None  # (4, x, y, z)
    labels: torch.Tensor | None = None  # (1, 4x, 4y, 4z) MAISI ids
    generator: torch.Generator | None = None


class SampleSource:
    """Deterministic samples for one stage: VAE patches from images, or latents (+ labels)."""

    def __init__(self, cases: list[Case], stage: str, patch_size, seed: int, global_batch: int):
        self.cases, self.stage, self.patch_size, self.seed = cases, stage, patch_size, seed
        self.order = CaseOrder(len(cases), global_batch, seed)
        self.images = VolumeCache(load_image_unit)
        self.latents = VolumeCache(load_latent)
        self.labels = VolumeCache(load_labels)

    def sample(self, step: int, index: int) -> Sample:
        case = self.cases[self.order.case_index(step, index)]
        generator = sample_generator(self.seed, step, index)
        return self.make(case, generator)

    def make(self, case: Case, generator: torch.Generator) -> Sample:
        if self.stage == "vae":
            image = self.images.get(case.image)
            patch = self.patch_size or image.shape
            start = [random_start(n, p, generator) for n, p in zip(image.shape, patch)]
            crop = crop_or_pad(image, start, patch, fill=0.0)  # 0 = −1000 HU, air
            return Sample(case, image=torch.from_numpy(crop)[None], generator=generator)
        latent = self.latents.get(case.latent)
        labels = self.labels.get(case.label) if self.stage == "controlnet" else None
        if self.patch_size:
            patch = [p // 4 for p in self.patch_size]
            start = [random_start(n, p, generator) for n, p in zip(latent.shape[1:], patch)]
            latent = crop_or_pad(latent, start, patch, fill=0.0)
            if labels is not None:
                labels = crop_or_pad(labels, [4 * s for s in start], [4 * p for p in patch], fill=0)
        return Sample(
            case,
            latent=torch.from_numpy(np.ascontiguousarray(latent)),
            labels=None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))[None],
            generator=generator,
        )

    def local_batch(self, step: int, rank: int, batch_size: int) -> list[Sample]:
        """This process's samples at ``step``: global indices rank·b … rank·b + b − 1."""
        return [self.sample(step, rank * batch_size + j) for j in range(batch_size)]
