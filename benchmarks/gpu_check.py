"""GPU check, ready for the few minutes a borrowed GPU gives: the code paths no CPU run exercises.

Official-width rflow-ct networks with random weights (MONAI's initialisation under a fixed seed, the
zero-started output layers filled so every block acts), built on the CPU and configured for the
target device as ``maisicore.models.weights.load_model`` does (flash attention, the VAE's float16
norm), then, for each size:

1. generation with a ControlNet mask (a synthetic body with organs) through the pipeline's own
   ``generate_latents`` (float16 autocast on CUDA, as the reference), ``--steps`` steps;
2. the decode of that latent by the split engine (``maisicore.vae.tsp``, plan ``exact``: every slab on
   the device, stored activations in host memory) and by the default plan (MONAI's whole-volume
   decode when it fits the budget), against MONAI's own decode at float16 (autocast, the published
   ``num_splits``), max |Δ| on the [0, 1] scale (1 = 2000 HU).

3. per precision (``--precisions``, default fp32, fp16, bf16; fp16 only on CUDA): seconds of one
   ControlNet forward, one diffusion UNet forward and one VAE decode (the split decoder's default
   plan), each under that precision's numerics (``maisicore.precision.numerics_for``), at the first
   size; printed as a table with a precision column.

Prints, per stage: wall seconds and peak memory (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the process's VmHWM, reset between stages through /proc/self/clear_refs).

    python benchmarks/gpu_check.py                        # CUDA: 256×256×128 and 512×512×512
    python benchmarks/gpu_check.py --device cpu --small   # the same code paths on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = ((256, 256, 128), (512, 512, 512))
SMALL_SIZES = ((64, 64, 32), (96, 64, 32))  # MONAI's num_splits 4 needs latent Y ≥ 16


def _status_bytes(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Stage:
    """Times a stage and reads its peak memory (bytes) on ``device``."""

    def __init__(self, device, rows: list, name: str):
        self.device, self.rows, self.name = device, rows, name

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, value, tb):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_bytes("VmHWM")
        self.rows.append({"stage": self.name, "seconds": time.perf_counter() - self.start,
                          "peak_gib": peak / 2**30, "failed": repr(value)[:160] if value is not None else ""})
        print(f"  {self.name:<38} {self.rows[-1]['seconds']:8.1f} s  peak {self.rows[-1]['peak_gib']:7.2f} GiB"
              + (f"  FAILED {self.rows[-1]['failed']}" if value is not None else ""), flush=True)
        return value is not None and isinstance(value, (torch.cuda.OutOfMemoryError, MemoryError))


def build_model(device):
    """Official-width rflow-ct, random weights, configured for ``device`` and moved there."""
    import torch
    from maisicore.models.networks import (
        build_autoencoder,
        build_controlnet,
        build_diffusion_unet,
        configure_for_device,
    )
    from maisicore.models.presets import get_preset
    from maisicore.models.weights import LoadedModel, fill_zero_initialised, start_controlnet_from_unet

    preset = get_preset("rflow-ct", "official")
    torch.manual_seed(0)
    autoencoder = build_autoencoder(preset, "cpu")
    unet = build_diffusion_unet(preset, "cpu")
    controlnet = build_controlnet(preset, "cpu")
    start_controlnet_from_unet(controlnet, unet)
    generator = torch.Generator().manual_seed(1)
    fill_zero_initialised(unet, generator)
    fill_zero_initialised(controlnet, generator)
    for module, kwargs in ((autoencoder, preset.autoencoder), (unet, preset.diffusion_unet),
                           (controlnet, preset.controlnet)):
        configure_for_device(module, kwargs, device)
    return LoadedModel(preset, autoencoder.to(device), unet.to(device), controlnet.to(device), 1.0, device, None)


def synthetic_mask(size, spacing):
    """Body (200) with liver (1), spleen (3) and a left kidney (14), (x, y, z) int16."""
    import numpy as np
    from maisicore.io.geometry import Volume, centered_affine

    grid = np.indices(size, dtype=np.float32)
    centre = (np.asarray(size, dtype=np.float32) - 1) / 2
    x, y, z = [(g - c) / (s / 2) for g, c, s in zip(grid, centre, size)]
    labels = np.zeros(size, np.int16)
    labels[x**2 + y**2 < 0.8] = 200
    labels[((x + 0.3) / 0.35) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 < 1] = 1
    labels[((x - 0.4) / 0.15) ** 2 + ((y - 0.3) / 0.15) ** 2 + (z / 0.3) ** 2 < 1] = 3
    labels[((x - 0.3) / 0.1) ** 2 + ((y + 0.4) / 0.1) ** 2 + (z / 0.2) ** 2 < 1] = 14
    return Volume(labels, centered_affine(tuple(size), tuple(spacing)))


def check_size(model, size, steps: int, budget_bytes, rows: list) -> dict:
    import torch
    from maisicore.pipelines.generate import generate_latents, plan_generation
    from maisicore.vae.decode import autocast_for
    from maisicore.vae.tsp import decode_exact

    device = model.device
    spacing = (512.0 / size[0], 512.0 / size[1], 640.0 / size[2])
    print(f"{'×'.join(map(str, size))} voxels, latent {'×'.join(str(n // 4) for n in size)}, {steps} steps, "
          f"{device}", flush=True)
    plan = plan_generation(model.preset, mask=synthetic_mask(size, spacing), steps=steps, allow_any_size=True)
    result = {"size": list(size), "steps": steps}
    with Stage(device, rows, "denoise (UNet + ControlNet)"):
        latents = generate_latents(model, plan, seed=0)
    z = latents.float()
    reference = ours = default = None
    with Stage(device, rows, "MONAI decode, float16, num_splits 4"):
        for module in model.autoencoder.modules():  # the published TSP setting of the reference
            if hasattr(module, "num_splits"):
                module.num_splits = model.preset.autoencoder["num_splits"]
        try:
            with torch.no_grad(), autocast_for(device):
                reference = torch.clip(model.autoencoder.decode(z.to(device)).float(), 0, 1).cpu()
        finally:
            for module in model.autoencoder.modules():
                if hasattr(module, "num_splits"):
                    module.num_splits = 1
    with Stage(device, rows, "split decode (exact plan, float32)"):
        ours = torch.clip(decode_exact(model.autoencoder, z, budget_bytes, mode="exact", device=device, log=print), 0, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with Stage(device, rows, "default decode plan"):
        default = torch.clip(decode_exact(model.autoencoder, z, budget_bytes, device=device, log=print), 0, 1)
    for name, image in (("split", ours), ("default", default)):
        if reference is not None and image is not None:
            result[f"max_abs_delta_{name}_vs_monai_fp16"] = float((image - reference).abs().max())
            result[f"mean_abs_delta_{name}_vs_monai_fp16"] = float((image - reference).abs().mean())
    if ours is not None and default is not None:
        result["max_abs_delta_split_vs_default"] = float((ours - default).abs().max())
    print("  " + json.dumps(result), flush=True)
    return result


PRECISION_NAMES = ("fp32", "fp16", "bf16")


def runnable_precisions(device_type: str, names=PRECISION_NAMES) -> tuple[list, list[str]]:
    """(``PrecisionChoice`` per name that runs on ``device_type``, notes on those skipped): fp16 is
    CUDA's autocast only; bf16 on a CPU without native bfloat16 runs emulated (noted)."""
    from maisicore.errors import InputError
    from maisicore.precision import choose_precision, cpu_bf16_native

    choices, notes = [], []
    flag = cpu_bf16_native() if device_type == "cpu" else None
    for name in names:
        try:
            choice = choose_precision(name, device_type, flag)
        except InputError as exc:
            notes.append(f"{name} skipped: {exc}")
            continue
        if choice.name == "bf16" and device_type == "cpu" and not flag:
            notes.append("bf16 on this CPU is emulated (no avx512_bf16/amx_bf16): slower than fp32")
        choices.append(choice)
    return choices, notes


def time_networks(model, plan, choice, repeats: int = 2) -> list[dict]:
    """Seconds (best of ``repeats`` after a warm-up) of one ControlNet forward, one diffusion UNet
    forward and one VAE decode of a random latent under ``choice``'s numerics."""
    import contextlib

    import torch
    from maisicore.pipelines.generate import plan_conditions
    from maisicore.precision import numerics_for, torch_dtype
    from maisicore.vae.decode import decode_latents

    device = model.device
    numerics = numerics_for(choice, device.type)
    dtype = torch.float16 if numerics.float16_inputs else torch.float32
    unet_kwargs, condition = plan_conditions(model.preset, plan, device, dtype)
    x = torch.randn((1, *plan.latent_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    autocast = numerics.loop_autocast or numerics.network_autocast

    def context():
        return torch.autocast(device.type, dtype=torch_dtype(autocast)) if autocast else contextlib.nullcontext()

    def controlnet():
        with context():
            return model.controlnet(x=x, timesteps=t, controlnet_cond=condition, class_labels=unet_kwargs.get("class_labels"))

    down, mid = controlnet()

    def unet():
        with context():
            return model.diffusion_unet(x=x, timesteps=t, **unet_kwargs, down_block_additional_residuals=down,
                                        mid_block_additional_residual=mid)

    def decode():
        return decode_latents(model.autoencoder, x.float(), 1.0, "exact", numerics=numerics)

    rows = []
    for network, fn, warm in (("controlnet", controlnet, True), ("diffusion_unet", unet, True),
                              ("vae_decoder", decode, False)):
        best = None
        with torch.no_grad():
            if warm:
                fn()
            for _ in range(repeats if warm else 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - started
                best = seconds if best is None else min(best, seconds)
        rows.append({"precision": choice.name, "network": network, "seconds": round(best, 4)})
    return rows


def format_precision_table(rows: list[dict]) -> str:
    """Rows of ``time_networks`` as a table: one line per network, one column per precision (seconds,
    and the speed-up over fp32 where fp32 was timed)."""
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    networks = list(dict.fromkeys(r["network"] for r in rows))
    seconds = {(r["network"], r["precision"]): r["seconds"] for r in rows}
    lines = [f"  {'network':<16}" + "".join(f"{p:>18}" for p in precisions)]
    for network in networks:
        cells = []
        for p in precisions:
            value, base = seconds.get((network, p)), seconds.get((network, "fp32"))
            if value is None:
                cells.append(f"{'-':>18}")
            elif base and p != "fp32":
                cells.append(f"{value:9.3f} s ({base / value:4.2f}×)")
            else:
                cells.append(f"{value:16.3f} s")
        lines.append(f"  {network:<16}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help=f"sizes {SMALL_SIZES} (CPU: a few minutes)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 4; 1 with --small)")
    parser.add_argument("--memory-budget", type=float, metavar="GB", help="for the decodes (default: free memory)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--precisions", default=",".join(PRECISION_NAMES),
                        help="precisions timed per network at the first size (default fp32,fp16,bf16; '' for none)")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --small for the CPU run of the same paths")
    rows: list = []
    started = time.perf_counter()
    with Stage(device, rows, "build official-width networks"):
        model = build_model(device)
    info = {"device": str(device), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(json.dumps(info), flush=True)
    budget = int(args.memory_budget * 2**30) if args.memory_budget else None
    results = [check_size(model, size, args.steps or (1 if args.small else 4), budget, rows)
               for size in (SMALL_SIZES if args.small else SIZES)]
    precision_rows: list = []
    names = [n.strip() for n in args.precisions.split(",") if n.strip()]
    if names:
        from maisicore.pipelines.generate import plan_generation

        size = (SMALL_SIZES if args.small else SIZES)[0]
        spacing = (512.0 / size[0], 512.0 / size[1], 640.0 / size[2])
        plan = plan_generation(model.preset, mask=synthetic_mask(size, spacing), steps=1, allow_any_size=True)
        choices, notes = runnable_precisions(device.type, names)
        for note in notes:
            print(f"  {note}")
        print(f"per network and precision, {'×'.join(map(str, size))} voxels:", flush=True)
        for choice in choices:
            precision_rows += time_networks(model, plan, choice)
        print(format_precision_table(precision_rows), flush=True)
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "stages": rows, "results": results, "precisions": precision_rows,
                       "total_s": total}, f, indent=2)


if __name__ == "__main__":
    main()
