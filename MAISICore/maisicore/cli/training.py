"""``maisi prepare`` (datalists, cached latents) and ``maisi train vae|diffusion|controlnet``."""

from __future__ import annotations

from ..errors import InputError
from ..models.presets import CT_MODEL_NAMES, WIDTHS
from .common import (
    MAX_PATCH_SIDE,
    _budget_bytes,
    _check_finite_positive,
    _check_seed,
    _distinct,
    _positive_int,
    _say,
    add_device,
    add_memory_budget,
    add_seed,
    subcommands,
)


def add_prepare(commands) -> None:
    """``maisi prepare`` (a datalist) and ``maisi prepare latents`` (cached latents)."""
    prepare = commands.add_parser(
        "prepare",
        help="index training data into a datalist, or encode it to cached latents",
        description=(
            "maisi prepare --images DIR [--labels DIR] --out DATALIST.json: scan NIfTI/NRRD images and DICOM series "
            "(each subfolder's, and those directly in DIR; labels: NIfTI/NRRD or DICOM SEG .dcm files matched by "
            "file or folder name), record dim, spacing, modality, body region (from the labels) and fold; unreadable files and "
            "labels on another grid are reported under 'problems' and skipped. "
            "maisi prepare latents: encode a datalist's images with the VAE for diffusion/ControlNet training."
        ),
    )
    prepare.add_argument("--images", metavar="DIR",
                         help="folder of CT images (.nii, .nii.gz, .nrrd) and/or DICOM series (subfolders)")
    prepare.add_argument("--labels", metavar="DIR", help="folder of MAISI label volumes, same file names as the images")
    prepare.add_argument("--modality", default="ct", choices=("ct",), help="image modality (default ct)")
    prepare.add_argument("--folds", type=_positive_int, default=5, help="number of folds, assigned round robin (default 5)")
    prepare.add_argument("--out", metavar="DATALIST.json", help="datalist to write")
    prepare.set_defaults(handler=_cmd_prepare)
    latents = subcommands(prepare, "prepare_command").add_parser(
        "latents",
        help="encode a datalist's images to cached latents (skips those already done)",
        description=(
            "Reorient each image to RAS, clip HU to [-1000, 1000], resize (trilinear) to a size rounded to a multiple "
            "of --round-to voxels (field of view kept), encode with the VAE (exact split encoder, posterior mean) "
            "into OUT_DIR/NAME_emb.nii.gz + .json; labels resized (nearest) to NAME_label.nii.gz. Writes a datalist "
            "naming them for `maisi train diffusion|controlnet`."
        ),
    )
    latents.add_argument("--datalist", required=True, metavar="DATALIST.json")
    latents.add_argument("--weights", required=True, metavar="AE.pt|DIR", help="autoencoder checkpoint or weight folder")
    latents.add_argument("--out-dir", required=True, metavar="DIR", help="folder for the latent files")
    latents.add_argument("--out", required=True, metavar="LATENTS.json", help="datalist of the latents to write")
    latents.add_argument("--round-to", type=_positive_int, default=128, metavar="N",
                         help="image sizes rounded to a multiple of N voxels before encoding (default 128, as the "
                              "reference; a multiple of 32)")
    add_device(latents)
    add_memory_budget(latents, doing="encoding")
    latents.set_defaults(handler=_cmd_prepare_latents)


def add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train or fine-tune the VAE, the diffusion UNet or the ControlNet (resumable; torchrun for several processes)",
        description=(
            "Train one MAISI stage on a datalist (`maisi prepare`) into RUN_DIR: metrics.jsonl (step, losses, lr, "
            "time_s; val_l1 (and val_bone_l1 in a bone-aware or decoder-only VAE run) or val_loss), checkpoint/last.pt (every --checkpoint-every steps and at the end, written "
            "atomically), weights/ (a weight folder for `maisi generate --model RUN_DIR/weights`). Defaults come from "
            "the reference training configs; --config (reference format) and then the flags override them. "
            "Several processes: torchrun --nproc_per_node N -m maisicore train ... (NCCL on GPUs, gloo on CPU); "
            "--batch-size is per process."
        ),
    )
    train.add_argument("stage", choices=("vae", "diffusion", "controlnet"),
                       help="vae (images), diffusion (latents), controlnet (latents + labels)")
    train.add_argument("--datalist", required=True, metavar="DATALIST.json")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; must not hold a run unless --resume)")
    train.add_argument("--model", default="rflow-ct", choices=CT_MODEL_NAMES, help="architecture and objective (default rflow-ct)")
    train.add_argument("--width", default="official", choices=WIDTHS, help="official or tiny networks (default official)")
    train.add_argument("--config", metavar="CONFIG.json", help="training settings in the reference format; unknown keys are refused")
    train.add_argument("--init", metavar="WEIGHTS_DIR",
                       help="start from this weight folder (fine-tuning; the ControlNet stage's frozen UNet and scale factor)")
    train.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    train.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimiser steps (default: n_epochs passes over the data)")
    train.add_argument("--batch-size", type=_positive_int, metavar="N", help="samples per process and step")
    train.add_argument("--lr", type=float, metavar="LR", help="learning rate")
    train.add_argument("--patch-size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                       help="image voxels: VAE patches (multiple of 4), or latent crops (multiple of 32) for diffusion/controlnet")
    add_seed(train, default=None, help="seed of initialisation, patches, noise and timesteps (default 0)")
    train.add_argument("--checkpoint-every", type=_positive_int, metavar="N", help="steps between checkpoints (default 100)")
    train.add_argument("--validate-every", type=_positive_int, metavar="N", help="steps between validations (default 10)")
    train.add_argument("--validation-fold", type=int, metavar="K", help="validate on fold K only and train on the others "
                       "(default: validate on fixed samples of the training cases)")
    train.add_argument("--weighted-labels", nargs="+", type=int, metavar="ID",
                       help="controlnet: MAISI label ids whose voxels weigh --label-weight in the loss (default 23)")
    train.add_argument("--label-weight", type=float, metavar="W", help="controlnet: weight of those voxels (default 100)")
    train.add_argument("--controlnet-from-unet", action="store_true",
                       help="controlnet: start from the UNet's weights even when --init has a ControlNet checkpoint")
    train.add_argument("--perceptual-weights", metavar="PT",
                       help="vae: LPIPS-squeeze weights file for the perceptual loss (off without it; needs the lpips package)")
    train.add_argument("--train-decoder-only", action="store_true",
                       help="vae: fine-tune only the decoder of the --init VAE; the encoder, hence its latents and the "
                            "diffusion UNet and ControlNet trained on them, stay valid")
    train.add_argument("--bone-weight", type=float, metavar="W",
                       help="vae: weight in the L1 of voxels at or above --bone-threshold-hu (default 1: plain L1)")
    train.add_argument("--bone-threshold-hu", type=float, metavar="HU",
                       help="vae: real value (HU) from which a voxel counts as bone for --bone-weight (default 200)")
    train.add_argument("--no-amp", action="store_true", help="CUDA: train in float32 instead of bf16/fp16 autocast")
    add_device(train, help="auto, cpu, cuda (default auto)")
    train.set_defaults(handler=_cmd_train)


def _cmd_prepare(args) -> int:
    from ..training.datalist import prepare_datalist

    if not args.images or not args.out:
        raise InputError("maisi prepare needs --images DIR and --out DATALIST.json (or the action `latents`)")
    from ..io.volumes import check_output_folder

    _distinct({"--out": args.out}, {"--images": args.images, "--labels": args.labels})
    check_output_folder(args.out, "--out")
    data = prepare_datalist(args.images, args.labels, args.out, folds=args.folds, modality=args.modality)
    for problem in data["problems"]:
        _say(f"problem: {problem['file']}: {problem['reason']}")
    print(f"wrote {args.out}: {len(data['training'])} cases, {len(data['problems'])} problem(s)")
    return 0


def _cmd_prepare_latents(args) -> int:
    from ..io.volumes import check_output_folder
    from ..training.latents import prepare_latents
    from ..validation import resolve_device

    _distinct({"--out": args.out}, {"--datalist": args.datalist, "--weights": args.weights})
    check_output_folder(args.out, "--out")
    data = prepare_latents(args.datalist, args.weights, args.out_dir, args.out, round_to=args.round_to,
                           device=resolve_device(args.device), memory_budget_bytes=_budget_bytes(args.memory_budget))
    print(f"wrote {args.out}: {len(data['training'])} latents in {args.out_dir}")
    return 0


def _cmd_train(args) -> int:
    from ..models.presets import get_preset
    from ..training.config import load_config
    from ..training.run import train

    _check_finite_positive(args.lr, "--lr")
    _check_finite_positive(args.label_weight, "--label-weight")
    _check_finite_positive(args.bone_weight, "--bone-weight")
    if args.seed is not None:
        _check_seed(args.seed)
    if args.patch_size and any(not 1 <= s <= MAX_PATCH_SIDE for s in args.patch_size):
        raise InputError(f"--patch-size {' '.join(map(str, args.patch_size))}: each side must be 1 to {MAX_PATCH_SIDE} "
                         "voxels (the largest published image side)")
    config = load_config(
        args.stage, args.config, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
        patch_size=tuple(args.patch_size) if args.patch_size else None, seed=args.seed,
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        weighted_loss_label=tuple(args.weighted_labels) if args.weighted_labels else None,
        weighted_loss=args.label_weight, perceptual_weights=args.perceptual_weights,
        amp=False if args.no_amp else None, decoder_only=True if args.train_decoder_only else None,
        bone_weight=args.bone_weight, bone_threshold_hu=args.bone_threshold_hu,
    )
    try:
        result = train(args.stage, args.datalist, args.out, get_preset(args.model, args.width), config, init=args.init,
                       resume=args.resume, device=args.device, validation_fold=args.validation_fold,
                       controlnet_from_unet=args.controlnet_from_unet, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        _say(f"maisi: training cancelled; {args.out}/checkpoint/last.pt holds the last checkpoint (add --resume to continue)")
        return 130
    return 0 if result.steps else 1
