"""The three things MAISI trains, each as a stage: networks, losses, one optimiser step, validation,
and the checkpoint it contributes to a weight set.

- ``VAEStage``: AutoencoderKlMaisi on image patches; L1 + KL + least-squares adversarial
  (PatchDiscriminator) + perceptual (LPIPS-squeeze, only with an explicit weights file). Optionally
  bone-aware (voxels at or above ``bone_threshold_hu`` weigh ``bone_weight`` in the L1) and
  decoder-only (the encoder frozen: the latent space, and the diffusion models trained on it, stay valid).
- ``DiffusionStage``: the diffusion UNet on cached latents × scale factor; rectified-flow target
  x0 − ε (rflow-ct) or the noise (ddpm-ct), L1; spacing ×100 and modality (rflow-ct, dropped to 0
  with p = 0.1) or body-region one-hots ×100 (ddpm-ct) as conditions.
- ``ControlNetStage``: the UNet frozen, the ControlNet (started from the UNet's weights) trained
  with L1, weighted ``weighted_loss`` on the voxels of ``weighted_loss_label``.
All randomness comes from each sample's generator (``training.data``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diffusion.conditioning import controlnet_condition, unet_inputs
from ..diffusion.schedulers import Schedule
from ..errors import InputError
from ..models.networks import (
    build_autoencoder,
    build_controlnet,
    build_diffusion_unet,
)
from ..models.presets import CT_MODALITY, ModelPreset, discriminator_kwargs
from ..models.weights import (
    load_checkpoint,
    load_state,
    start_controlnet_from_unet,
    state_dict_from,
    weight_file,
)
from .config import TrainConfig
from .data import Sample, derived_seed
from .distributed import Processes, all_sum, average_gradients

MODALITY_CODES = {"ct": CT_MODALITY}  # reference modality_mapping.json


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when supported (else fp16); nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_scaler(device: torch.device, enabled: bool) -> bool:
    return device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()


class Stage:
    """Base: holds modules/optimisers by name so the loop can checkpoint them generically."""

    name = ""
    needs: tuple[str, ...] = ()
    weight_role = ""

    def __init__(self, preset: ModelPreset, config: TrainConfig, processes: Processes, total_steps: int):
        self.preset, self.config, self.processes, self.device = preset, config, processes, processes.device
        self.total_steps = total_steps
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler(self.device, config.amp))
        self.scale_factor: float | None = None
        self.notes: list[str] = []

    def accumulate(self, name: str, losses) -> dict[str, float]:
        """One optimiser step of ``name`` over this process's samples, one sample at a time.

        ``losses`` yields, per sample, a dict whose ``"loss"`` is backpropagated (÷ samples: the
        gradients sum to the batch mean). Gradients are then averaged over processes. Running
        samples one at a time bounds memory to one sample and makes P processes × b samples give
        the same update, bit for bit, as one process × P·b samples for P·b = 2 (halving is exact).
        """
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        count = 0
        for values in losses:
            count += 1
            self.scaler.scale(values["loss"] / values.pop("count")).backward()
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
        average_gradients(self.modules[name].parameters(), self.processes)
        self.scaler.step(optimizer)
        self.scaler.update()
        if name in self.schedulers:
            self.schedulers[name].step()
        return {key: value / count for key, value in totals.items()}

    def learning_rate(self) -> float:
        return float(next(iter(self.optimizers.values())).param_groups[0]["lr"])

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        tensor = all_sum(tensor.to(self.device), self.processes).cpu() / self.processes.world_size
        return {k: float(v) for k, v in zip(keys, tensor)}


# --------------------------------------------------------------------------------------- VAE


def hu_threshold_unit(hu: float) -> float:
    """A HU value on the VAE's [0, 1] scale (−1000 ↦ 0, 1000 ↦ 1)."""
    return (float(hu) + 1000.0) / 2000.0


def weighted_l1(reconstruction: torch.Tensor, image: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Mean absolute error with the voxels whose real value is at least ``threshold`` ([0, 1] scale)
    weighted ``weight`` (the others 1); ``weight`` 1 is the plain L1."""
    error = torch.abs(reconstruction - image)
    if weight == 1.0:
        return error.mean()
    return (error * torch.where(image >= threshold, weight, 1.0)).mean()


DECODER_PARTS = ("post_quant_conv", "decoder")  # what a decoder-only run trains; the encoder side stays


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over latent voxels and channels, mean over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.sum(dim=tuple(range(1, kl.ndim))).mean()


class VAEStage(Stage):
    name = "vae"
    needs = ("image",)
    weight_role = "autoencoder"

    def __init__(self, preset, config, processes, total_steps, init_dir: Path | None):
        super().__init__(preset, config, processes, total_steps)
        from monai.losses.adversarial_loss import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        torch.manual_seed(config.seed)
        autoencoder = build_autoencoder(preset, self.device)
        if init_dir is not None:
            path = weight_file(init_dir, preset.weight_files.autoencoder)
            load_state(autoencoder, state_dict_from(load_checkpoint(path), None, path, preset), path, preset)
        elif config.decoder_only:
            raise InputError("--train-decoder-only needs --init: the trained VAE whose decoder is fine-tuned "
                             "(a random encoder would fix a meaningless latent space)")
        discriminator = PatchDiscriminator(**discriminator_kwargs(preset.width)).to(self.device)
        self.modules = {"autoencoder": autoencoder.train(), "discriminator": discriminator.train()}
        trained = autoencoder.parameters()
        if config.decoder_only:
            autoencoder.requires_grad_(False)
            parts = [getattr(autoencoder, name) for name in DECODER_PARTS]
            for part in parts:
                part.requires_grad_(True)
            trained = [p for part in parts for p in part.parameters()]
            self.notes.append("decoder only: the encoder and its latent space stay as --init has them")
        self.bone_threshold = hu_threshold_unit(config.bone_threshold_hu)
        if config.bone_weight != 1.0:
            self.notes.append(f"bone-aware L1: voxels at or above {config.bone_threshold_hu:g} HU weigh {config.bone_weight:g}")
        self.optimizers = {
            "autoencoder": torch.optim.Adam(trained, lr=config.lr),
            "discriminator": torch.optim.Adam(discriminator.parameters(), lr=config.lr),
        }
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual = None
        if config.perceptual_weights:
            self.perceptual = _perceptual_loss(config.perceptual_weights, self.device)
            self.notes.append(f"perceptual loss on (LPIPS-squeeze weights {config.perceptual_weights}, weight {config.perceptual_weight})")
        else:
            self.notes.append("perceptual loss OFF: no --perceptual-weights file given (the reference adds 0.3 × LPIPS-squeeze)")

    def encode_decode(self, images: torch.Tensor, noise: torch.Tensor | None):
        autoencoder = self.modules["autoencoder"]
        z_mu, z_sigma = autoencoder.encode(images)
        z = z_mu if noise is None else z_mu + z_sigma * noise
        return autoencoder.decode(z), z_mu, z_sigma

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        autoencoder, discriminator = self.modules["autoencoder"], self.modules["discriminator"]
        config = self.config
        reconstructions = []

        def generator_losses():
            for sample in samples:
                image = sample.image[None].to(self.device)
                with autocast(self.device, config.amp):
                    with torch.no_grad() if config.decoder_only else contextlib.nullcontext():
                        z_mu, z_sigma = autoencoder.encode(image)
                    noise = torch.randn(z_mu.shape[1:], generator=sample.generator)[None].to(self.device, z_mu.dtype)
                    reconstruction = autoencoder.decode(z_mu + z_sigma * noise)
                    recon_loss = F.l1_loss(reconstruction.float(), image)
                    kl_loss = kl_divergence(z_mu.float(), z_sigma.float())
                    discriminator.requires_grad_(False)
                    fake_logits = discriminator(reconstruction.contiguous().float())[-1]
                    generator_adv = self.adversarial(fake_logits, target_is_real=True, for_discriminator=False)
                    discriminator.requires_grad_(True)
                    values = {"recon_l1": recon_loss, "kl": kl_loss, "adv_g": generator_adv}
                    if config.bone_weight != 1.0:
                        values["recon_weighted"] = weighted_l1(reconstruction.float(), image, config.bone_weight,
                                                               self.bone_threshold)
                    loss = (values.get("recon_weighted", recon_loss) + config.kl_weight * kl_loss
                            + config.adv_weight * generator_adv)
                    if self.perceptual is not None:
                        values["perceptual"] = self.perceptual(reconstruction.float(), image)
                        loss = loss + config.perceptual_weight * values["perceptual"]
                reconstructions.append((reconstruction.detach(), image))
                yield {"loss": loss, "count": len(samples), **values}

        def discriminator_losses():
            for reconstruction, image in reconstructions:
                with autocast(self.device, config.amp):
                    fake = discriminator(reconstruction.contiguous().float())[-1]
                    real = discriminator(image.contiguous().float())[-1]
                    loss_d = config.adv_weight * 0.5 * (
                        self.adversarial(fake, target_is_real=False, for_discriminator=True)
                        + self.adversarial(real, target_is_real=True, for_discriminator=True)
                    )
                yield {"loss": loss_d, "count": len(samples)}

        values = self.accumulate("autoencoder", generator_losses())
        values["loss_d"] = self.accumulate("discriminator", discriminator_losses())["loss"]
        return values

    @torch.no_grad()
    def validate(self, samples: list[Sample]) -> dict[str, float]:
        """Mean absolute reconstruction error (posterior mean, [0, 1] scale) over fixed patches."""
        autoencoder = self.modules["autoencoder"]
        autoencoder.eval()
        errors, bone_sum, bone_count = [], 0.0, 0
        for sample in samples:
            image = sample.image[None].to(self.device)
            with autocast(self.device, self.config.amp):
                reconstruction, _, _ = self.encode_decode(image, None)
            error = torch.abs(reconstruction.float() - image)
            errors.append(float(torch.mean(error)))
            bone = image >= self.bone_threshold
            bone_sum, bone_count = bone_sum + float(error[bone].double().sum()), bone_count + int(bone.sum())
        autoencoder.train()
        values = {"val_l1": sum(errors) / len(errors)}
        if self.config.bone_weight != 1.0 or self.config.decoder_only:
            # the L1 over the validation voxels at or above the bone threshold (NaN when there are none)
            values["val_bone_l1"] = bone_sum / bone_count if bone_count else float("nan")
        return values

    def export(self) -> dict:
        return self.modules["autoencoder"].state_dict()


def _perceptual_loss(path: str, device: torch.device):
    from monai.losses import PerceptualLoss

    if not Path(path).is_file():
        raise InputError(f"--perceptual-weights {path}: file not found")
    try:
        return PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True, fake_3d_ratio=0.2,
                              pretrained_path=str(path)).to(device)
    except (ImportError, ModuleNotFoundError, OptionalImportErrorTypes) as exc:
        raise InputError(f"the perceptual loss needs the 'lpips' package ({exc}); pip install lpips, or leave out --perceptual-weights") from exc


try:  # MONAI raises its own error type when an optional package is missing
    from monai.utils import OptionalImportError as OptionalImportErrorTypes
except ImportError:  # pragma: no cover
    OptionalImportErrorTypes = ImportError


# ----------------------------------------------------------------------------- diffusion models


class LatentStage(Stage):
    """What the diffusion UNet and the ControlNet stages share: noise, timesteps, conditions."""

    def __init__(self, preset, config, processes, total_steps):
        super().__init__(preset, config, processes, total_steps)
        self.schedule = Schedule(preset)
        self.noise_scheduler = self.schedule.scheduler

    def noise_and_timesteps(self, samples: list[Sample], shape) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.stack([torch.randn(shape, generator=s.generator) for s in samples])
        t = self.schedule.training_timesteps([s.generator for s in samples], shape)
        return noise.to(self.device), t.to(self.device)

    def conditions(self, samples: list[Sample], train: bool) -> dict[str, torch.Tensor]:
        codes = None
        if self.preset.uses_modality:
            codes = []
            for s in samples:
                code = MODALITY_CODES.get(s.case.modality)
                if code is None:
                    raise InputError(f"{s.case.latent}: modality {s.case.modality!r} is not one this model knows ({', '.join(MODALITY_CODES)})")
                dropped = train and float(torch.rand((1,), generator=s.generator)) < self.config.modality_dropout
                codes.append(0 if dropped else code)
        regions = [s.case.body_region for s in samples] if self.preset.uses_body_region else None
        return unet_inputs(self.preset, [s.case.spacing for s in samples], codes, regions,
                           device=self.device, half_rounded=False)

    def target(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.schedule.training_target(clean, noise)

    def set_scale_factor(self, samples: list[Sample], first_index: int, global_batch: int) -> float:
        """1 / std of the first global batch's latents (reference), over all processes: per-sample
        sums in a table indexed by global sample, added in the same order whatever the split."""
        table = torch.zeros((global_batch, 3), dtype=torch.float64)
        for offset, sample in enumerate(samples):
            latent = sample.latent.double()
            table[first_index + offset] = torch.stack([latent.sum(), latent.pow(2).sum(), torch.tensor(float(latent.numel()), dtype=torch.float64)])
        table = all_sum(table.to(self.device), self.processes).cpu()
        total, squares, count = (float(v) for v in table.sum(dim=0))
        variance = (squares - total * total / count) / (count - 1)
        self.scale_factor = float(1.0 / variance**0.5)
        return self.scale_factor

    def batch(self, samples: list[Sample]):
        latents = torch.stack([s.latent for s in samples]).to(self.device) * self.scale_factor
        noise, t = self.noise_and_timesteps(samples, latents.shape[1:])
        noisy = self.noise_scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
        return latents, noise, t, noisy

    @torch.no_grad()
    def validate(self, samples: list[Sample]) -> dict[str, float]:
        """The training loss on a fixed batch (fixed noise and timesteps, no condition dropout)."""
        for module in self.trained_modules():
            module.eval()
        losses = []
        for sample in samples:
            with autocast(self.device, self.config.amp):
                losses.append(float(self.loss([sample], train=False)))
        for module in self.trained_modules():
            module.train()
        return {"val_loss": sum(losses) / len(losses)}

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        def losses():
            for sample in samples:
                with autocast(self.device, self.config.amp):
                    yield {"loss": self.loss([sample], train=True), "count": len(samples)}

        return self.accumulate(next(iter(self.optimizers)), losses())


def _load_unet(preset: ModelPreset, init_dir: Path | None, device) -> tuple[torch.nn.Module, float | None]:
    unet = build_diffusion_unet(preset, device)
    if init_dir is None:
        return unet, None
    path = weight_file(init_dir, preset.weight_files.diffusion_unet)
    checkpoint = load_checkpoint(path)
    load_state(unet, state_dict_from(checkpoint, "unet_state_dict", path, preset), path, preset)
    scale = checkpoint.get("scale_factor")
    return unet, None if scale is None else float(torch.as_tensor(scale).float().reshape(-1)[0])


class DiffusionStage(LatentStage):
    name = "diffusion"
    needs = ("latent",)
    weight_role = "diffusion_unet"

    def __init__(self, preset, config, processes, total_steps, init_dir: Path | None):
        super().__init__(preset, config, processes, total_steps)
        torch.manual_seed(config.seed)
        unet, _ = _load_unet(preset, init_dir, self.device)
        self.modules = {"diffusion_unet": unet.train()}
        optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
        self.optimizers = {"diffusion_unet": optimizer}
        self.schedulers = {"diffusion_unet": torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=2.0)}

    def trained_modules(self):
        return [self.modules["diffusion_unet"]]

    def loss(self, samples: list[Sample], train: bool) -> torch.Tensor:
        latents, noise, t, noisy = self.batch(samples)
        prediction = self.modules["diffusion_unet"](x=noisy, timesteps=t, **self.conditions(samples, train))
        return F.l1_loss(prediction.float(), self.target(latents, noise).float())

    def export(self) -> dict:
        return {"unet_state_dict": self.modules["diffusion_unet"].state_dict(),
                "scale_factor": torch.tensor(self.scale_factor, dtype=torch.float32)}


class ControlNetStage(LatentStage):
    name = "controlnet"
    needs = ("latent", "label")
    weight_role = "controlnet"

    def __init__(self, preset, config, processes, total_steps, init_dir: Path | None, from_unet: bool = False):
        super().__init__(preset, config, processes, total_steps)
        torch.manual_seed(config.seed)
        unet, self.init_scale_factor = _load_unet(preset, init_dir, self.device)
        if init_dir is None:
            self.notes.append("no --init: the frozen diffusion UNet is randomly initialised (give the weights it was trained with)")
        unet.eval().requires_grad_(False)
        controlnet = build_controlnet(preset, self.device)
        shared = start_controlnet_from_unet(controlnet, unet)
        path = weight_file(init_dir, preset.weight_files.controlnet) if init_dir else None
        if path is not None and path.is_file() and not from_unet:
            state = state_dict_from(load_checkpoint(path), "controlnet_state_dict", path, preset)
            load_state(controlnet, state, path, preset, allow_missing=frozenset(shared))
            self.notes.append(f"ControlNet fine-tuned from {path}")
        else:
            self.notes.append("ControlNet started from the diffusion UNet's weights")
        self.unet = unet
        self.modules = {"controlnet": controlnet.train()}
        optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.lr)
        self.optimizers = {"controlnet": optimizer}
        self.schedulers = {"controlnet": torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=2.0)}

    def trained_modules(self):
        return [self.modules["controlnet"]]

    def loss(self, samples: list[Sample], train: bool) -> torch.Tensor:
        latents, noise, t, noisy = self.batch(samples)
        labels = torch.stack([s.labels for s in samples]).to(self.device)
        conditions = self.conditions(samples, train)
        condition = controlnet_condition(labels, self.preset)
        down, mid = self.modules["controlnet"](x=noisy, timesteps=t, controlnet_cond=condition,
                                              class_labels=conditions.get("class_labels"))
        prediction = self.unet(x=noisy, timesteps=t, **conditions, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid)
        error = F.l1_loss(prediction.float(), self.target(latents, noise).float(), reduction="none")
        if self.config.weighted_loss > 1.0 and self.config.weighted_loss_label:
            small = F.interpolate(labels.float(), size=latents.shape[2:], mode="nearest")
            roi = torch.isin(small, torch.tensor(self.config.weighted_loss_label, device=small.device, dtype=small.dtype))
            weights = torch.where(roi, self.config.weighted_loss, 1.0).expand_as(error)
            return (error * weights).mean()
        return error.mean()

    def export(self) -> dict:
        return {"controlnet_state_dict": self.modules["controlnet"].state_dict()}


def validation_samples(source, cases, count: int, seed: int) -> list[Sample]:
    """Fixed samples for validation: ``count`` draws over ``cases``, the same at every call (fresh
    generators with fixed seeds)."""
    return [source.make(cases[k % len(cases)], torch.Generator().manual_seed(derived_seed(seed, 3, k)))
            for k in range(count)]
