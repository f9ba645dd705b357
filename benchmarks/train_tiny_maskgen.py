"""Train the tiny mask generation networks kept as a test fixture (Testing/data/tiny_maskgen/).

Why: with random weights the liver's size in a generated mask does not follow the size vector, so
``--anatomy-size`` cannot be checked to move it in the requested direction. This trains the
``tiny`` mask networks (``models.presets.get_mask_generation_preset("tiny")``: about 0.6 M
parameters) on synthetic masks in a few CPU minutes:

- masks of 32³ voxels (latent 4×8×8×8; 12 mm voxels, the official 384 mm field of view): a body
  ellipsoid (MAISI 200, class 124 of the decoder) holding a liver ball (MAISI 1, class 1) whose
  radius grows with the liver entry s of the size vector (2.5 + 5·s voxels), positions jittered;
- the mask autoencoder: the labels' 8 bit planes → 125 class logits decoded from the latent mean
  plus noise of 0.25 × its standard deviation (not the KL sampling: that collapsed to one mean mask
  in our tries; without noise the decoder broke on the diffusion's small latent errors),
  cross-entropy + soft Dice (liver, body) + 1e-6·KL, on random 16³ crops, then a few steps on whole masks;
- the diffusion UNet: DDPM on the autoencoder's latent means scaled by 1 / their standard
  deviation, conditioned by cross-attention on the size vector (the other entries fixed: those of
  the fixture database, tumours −1), with the tiny preset's own scheduler
  (``presets._TINY_MASK_SCHEDULER``): 50 train timesteps, all sampled (``default_steps``), the
  network predicting the clean latent (``prediction_type="sample"``).

Why that scheduler: MONAI's ``DDPMScheduler.step`` takes ``alphas_cumprod[t - 1]`` as the previous
step, so it is only right when every train timestep is sampled (10 of the official 1000 left the
latent pure noise), and 1000 steps cost about 20 s per mask on the CPU; and a network this small
trained to predict the noise (2500 UNet steps; 1175 s with the autoencoder) drifted away from the
training latents over the 1000 steps (latent standard deviation 4.4 instead of 1: liver voxels 4350
for 0.1, 3761 for 0.9), where predicting the clean latent follows the requested size after a few
hundred steps.

Measured (the fixture in Testing/data/tiny_maskgen is this command's output: seed 0, 2 threads,
torch 2.13 CPU, `/usr/bin/time`): 630 s of training (autoencoder 800 + 60 steps, voxel accuracy
0.9913; 600 UNet steps), 11 min 19 s wall with the report, peak RSS 1.6 GB. Liver voxels of the
masks generated with the 50 steps, seeds 0-3 (the synthetic balls: about 180 voxels for 0.2, 1150
for 0.8):

    liver=0.0: [87, 44, 79, 155]       liver=0.8: [1182, 1162, 1113, 1153]
    liver=0.2: [205, 135, 169, 259]    liver=1.0: [1490, 1441, 1380, 1465]
    liver=0.5: [602, 569, 546, 615]

Writes OUT/models/mask_generation_{autoencoder,diffusion_unet}.pt (float16 tensors, loaded into the
float32 networks), OUT/maisi_model.json (its ``mask_generation`` entry: width, latent shape,
spacing), OUT/all_anatomy_size_conditions.json (21 entries, liver 0–1) and prints the liver voxel
counts of masks generated for a few sizes.

    flock /tmp/heavy.lock python benchmarks/train_tiny_maskgen.py --out Testing/data/tiny_maskgen
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

N = 32  # mask voxels per side
CROP = 16  # autoencoder training crops
AE_WHOLE_STEPS = 60  # autoencoder steps on whole masks after the crops
LATENT_NOISE = 0.25  # noise added to the latent mean while training the autoencoder, × its standard deviation
SPACING_MM = 12.0
OTHER_SIZES = {"gallbladder": 0.3, "stomach": 0.4, "pancreas": 0.5, "colon": 0.6}  # fixed entries of the vector
BODY_CLASS, LIVER_CLASS = 124, 1  # the decoder's class indices (label_dict_124_to_132.json: body, liver)


def size_vector(liver: float) -> list[float]:
    from maisicore.anatomy.maskgen import ANATOMY_SIZE_CLASSES

    return [liver if name == "liver" else OTHER_SIZES.get(name, -1.0) for name in ANATOMY_SIZE_CLASSES]


def synthetic_mask(liver: float, rng: np.random.Generator) -> np.ndarray:
    """Decoder class indices (x, y, z), int64: body ellipsoid with a liver ball of radius 2.5 + 5·liver."""
    grid = np.indices((N, N, N), dtype=np.float32) - (N - 1) / 2
    centre = rng.uniform(-1, 1, 3)
    radii = np.array([13.0, 10.0, 14.0]) + rng.uniform(-1, 1, 3)
    body = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1
    liver_centre = centre + np.array([-5.0, 1.0, 2.0]) + rng.uniform(-1, 1, 3)
    radius = 2.5 + 5.0 * liver
    ball = sum((grid[i] - liver_centre[i]) ** 2 for i in range(3)) <= radius**2
    labels = np.zeros((N, N, N), dtype=np.int64)
    labels[body] = BODY_CLASS
    labels[ball & body] = LIVER_CLASS
    return labels


def bits(labels: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z) class indices → (B, 8, X, Y, Z) float bit planes."""
    planes = 2 ** torch.arange(8)
    return (labels[:, None].bitwise_and(planes[None, :, None, None, None]) != 0).float()


def train(out: Path, seed: int, ae_steps: int, unet_steps: int, pool: int, log=print) -> dict:
    from maisicore.models.networks import build_mask_networks, build_scheduler
    from maisicore.models.presets import get_mask_generation_preset

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    preset = get_mask_generation_preset("tiny")
    autoencoder, unet = build_mask_networks(preset, "cpu")
    sizes = rng.uniform(0, 1, pool)
    masks = torch.from_numpy(np.stack([synthetic_mask(s, rng) for s in sizes]))
    started = time.perf_counter()

    autoencoder.train()
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=2e-3)
    for step in range(ae_steps + AE_WHOLE_STEPS):
        whole = step >= ae_steps  # random 16³ crops first (8× cheaper), then whole masks for their statistics
        index = torch.randint(0, pool, (4 if whole else 8,))
        if whole:
            batch = masks[index]
        else:
            corners = torch.randint(0, N - CROP + 1, (len(index), 3)).tolist()
            batch = torch.stack([masks[i, x:x + CROP, y:y + CROP, z:z + CROP] for i, (x, y, z) in zip(index.tolist(), corners)])
        z_mu, z_sigma = autoencoder.encode(bits(batch))
        # Decode the mean plus noise of a quarter of its spread: no KL sampling collapse (the liver's
        # size is learnt in a few hundred steps) and a decoder that tolerates the diffusion's small errors.
        logits = autoencoder.decode(z_mu + LATENT_NOISE * z_mu.detach().std() * torch.randn_like(z_mu))
        kl = 0.5 * torch.mean(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-10) - 1)
        probabilities = torch.softmax(logits, dim=1)
        dice = sum(1 - (2 * (probabilities[:, c] * (batch == c)).sum() + 1) / (probabilities[:, c].sum() + (batch == c).sum() + 1)
                   for c in (LIVER_CLASS, BODY_CLASS))
        loss = torch.nn.functional.cross_entropy(logits, batch) + dice + 1e-6 * kl
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == ae_steps + AE_WHOLE_STEPS - 1:
            log(f"autoencoder step {step}: loss {loss.item():.4f}")
    autoencoder.eval()
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(bits(masks[i:i + 16]))[0] for i in range(0, pool, 16)])
        recon = torch.cat([autoencoder.decode_stage_2_outputs(latents[i:i + 16]).argmax(1) for i in range(0, pool, 16)])
    accuracy = (recon == masks).float().mean().item()
    scale_factor = 1.0 / latents.std().item()
    log(f"autoencoder voxel accuracy {accuracy:.4f}; scale factor {scale_factor:.4f}")

    scheduler = build_scheduler(preset)
    contexts = torch.tensor([size_vector(float(s)) for s in sizes], dtype=torch.float32).half().float()[:, None]
    x0 = latents * scale_factor
    unet.train()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, unet_steps, eta_min=1e-4)
    for step in range(unet_steps):
        index = torch.randint(0, pool, (16,))
        noise = torch.randn_like(x0[index])
        t = torch.randint(0, scheduler.num_train_timesteps, (16,))
        noisy = scheduler.add_noise(original_samples=x0[index], noise=noise, timesteps=t)
        target = x0[index] if scheduler.prediction_type == "sample" else noise
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps=t, context=contexts[index]), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    unet.eval()
    seconds = time.perf_counter() - started

    from maisicore.models.weights import save_checkpoint

    (out / "models").mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in autoencoder.state_dict().items()}
    save_checkpoint(out / "models" / preset.weight_files[0], half)
    half = {k: v.half() if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    save_checkpoint(out / "models" / preset.weight_files[1], {"unet_state_dict": half,
                                                              "scale_factor": torch.tensor(scale_factor)})
    card = {"model": "rflow-ct", "width": "tiny",
            "origin": "benchmarks/train_tiny_maskgen.py: mask networks only, trained on synthetic body + liver masks",
            "mask_generation": {"width": "tiny", "latent_shape": [4, N // 4, N // 4, N // 4], "spacing_mm": SPACING_MM},
            "training": {"seed": seed, "autoencoder_steps": [ae_steps, AE_WHOLE_STEPS], "unet_steps": unet_steps, "masks": pool,
                         "seconds": round(seconds, 1), "autoencoder_voxel_accuracy": round(accuracy, 4),
                         "threads": torch.get_num_threads(), "torch": torch.__version__}}
    (out / "maisi_model.json").write_text(json.dumps(card, indent=2) + "\n")
    database = [{"organ_size": size_vector(round(i / 20, 2))} for i in range(21)]
    (out / "all_anatomy_size_conditions.json").write_text(json.dumps(database) + "\n")
    return card


def report(out: Path, steps: int, seeds, sizes, log=print) -> None:
    """Liver voxels of masks generated from OUT for each size and seed."""
    from maisicore.pipelines.maskgen import generate_anatomy_mask, load_mask_model, mask_generation_settings

    model = load_mask_model(mask_generation_settings(out, "tiny"))
    for size in sizes:
        counts = [int((generate_anatomy_mask(model, size_vector(size), steps, seed) == 1).sum()) for seed in seeds]
        log(f"liver={size}: liver voxels {counts} ({steps} DDPM steps, seeds {list(seeds)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("Testing/data/tiny_maskgen"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-steps", type=int, default=800, help="autoencoder steps on crops")
    parser.add_argument("--unet-steps", type=int, default=600)
    parser.add_argument("--pool", type=int, default=256, help="synthetic masks to train on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="only generate from OUT and print liver counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report_only:
        card = train(args.out, args.seed, args.ae_steps, args.unet_steps, args.pool)
        print(json.dumps(card["training"]))
    from maisicore.models.presets import get_mask_generation_preset

    report(args.out, get_mask_generation_preset("tiny").default_steps, range(4), (0.0, 0.2, 0.5, 0.8, 1.0))


if __name__ == "__main__":
    main()
