"""The ``maisi`` command line.

Exit codes: 0 success; 2 bad input (one line on stderr, nothing written); 1 unexpected failure
(set ``MAISI_DEBUG=1`` for the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError
from .presets import BODY_REGIONS, MODEL_NAMES, WIDTHS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maisi",
        description="MAISI synthetic CT generation: NVIDIA's MAISI models (rflow-ct, ddpm-ct) on CPU or GPU.",
    )
    parser.add_argument("--version", action="version", version=f"maisi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser(
        "generate",
        help="generate a synthetic CT, optionally matching a label mask",
        description=(
            "Generate a synthetic CT (int16 HU). With --mask the ControlNet follows a MAISI label volume "
            "and the CT takes the mask's grid (shape, spacing, direction, origin); voxels where the mask is 0 "
            "are set to -1000 HU. Without a mask the diffusion model runs alone on a grid centred on the origin."
        ),
    )
    gen.add_argument("--model", default="rflow-ct", metavar="rflow-ct|ddpm-ct|DIR",
                     help="model name, or a weight folder with a maisi_model.json card (default: rflow-ct)")
    gen.add_argument("--weights-dir", metavar="DIR",
                     help="folder of the model's weight files (reference layout, models/*.pt); "
                          "default: $MAISI_HOME/weights/MODEL")
    gen.add_argument("--size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                     help="output size in voxels (default: the mask's, else 256 256 256)")
    gen.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                     help="voxel size in mm (default: the mask's, else 1.5 1.5 2)")
    gen.add_argument("--body-region", nargs="+", choices=BODY_REGIONS, metavar="REGION",
                     help=f"ddpm-ct only: body region(s) covered, top first ({', '.join(BODY_REGIONS)}); "
                          "default: derived from the mask")
    gen.add_argument("--mask", metavar="LABELS", help="MAISI label volume (.nii, .nii.gz, .nrrd) to follow")
    gen.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output (default 0)")
    gen.add_argument("--steps", type=_positive_int,
                     help="denoising steps (default: rflow-ct 30, ddpm-ct 1000)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    gen.add_argument("--allow-any-size", action="store_true",
                     help="accept any size that is a multiple of 32 and any spacing (tests, tiny models)")
    gen.add_argument("--preview", metavar="PNG", help="also write a PNG of the three mid-planes")
    gen.add_argument("--out", required=True, metavar="CT", help="output CT (.nii, .nii.gz or .nrrd)")
    gen.set_defaults(handler=_cmd_generate)

    weights = commands.add_parser("weights", help="manage model weight sets")
    weight_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION", parser_class=_Parser)
    init = weight_commands.add_parser(
        "init",
        help="write a randomly initialised weight set in the reference layout",
        description=(
            "Write a randomly initialised weight set (autoencoder, diffusion UNet, ControlNet) in the "
            "reference file layout DIR/models/*.pt with a DIR/maisi_model.json card: the start for "
            "training from scratch, and test fixtures."
        ),
    )
    init.add_argument("--preset", required=True, choices=MODEL_NAMES)
    init.add_argument("--width", default="official", choices=WIDTHS,
                      help="official (published sizes) or tiny (same architecture, few channels)")
    init.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    init.add_argument("--nonzero-init", action="store_true",
                      help="fill the layers MONAI starts at zero (UNet and ControlNet outputs) with small random "
                           "values, so untrained networks act: for tests and pipeline demos, not for training")
    init.set_defaults(handler=_cmd_weights_init)
    return parser


class _ProgressBars:
    """tqdm bars on stderr for the pipeline's (stage, done, total) callbacks."""

    def __init__(self):
        self.bars = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step" if stage == "denoise" else "vol",
                                          file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_generate(args) -> int:
    from .io import check_output_path, read_volume
    from .validation import resolve_device
    from .weights import check_weight_files, resolve_model

    # 1. Check everything the user gave before building any network.
    out = check_output_path(args.out)
    preview = None
    if args.preview:
        preview = Path(args.preview)
        if not preview.name.lower().endswith(".png"):
            raise InputError(f"--preview {preview}: must end with .png")
        if not (preview.parent if str(preview.parent) else Path(".")).is_dir():
            raise InputError(f"--preview {preview}: folder {preview.parent} does not exist")
    preset, weights_dir = resolve_model(args.model, args.weights_dir)
    check_weight_files(preset, weights_dir)
    device = resolve_device(args.device)
    mask = read_volume(args.mask) if args.mask else None

    from .pipelines.generate import generate, plan_generation

    plan = plan_generation(preset, args.size, args.spacing, mask, args.body_region, args.steps, args.allow_any_size)
    for note in plan.notes:
        _say(f"note: {note}")
    region = f", body region {plan.body_region[0]}→{plan.body_region[1]}" if plan.body_region else ""
    _say(
        f"{preset.key} on {device}: {'×'.join(map(str, plan.size))} voxels at "
        f"{'×'.join(f'{s:g}' for s in plan.spacing)} mm, {plan.steps} steps, seed {args.seed}"
        f"{', following ' + args.mask if args.mask else ''}{region}"
    )

    # 2. Load and run.
    from .io import write_volume
    from .weights import load_model

    model = load_model(preset, weights_dir, device)
    ct = generate(model, plan, seed=args.seed, progress=_ProgressBars())

    # 3. Write (temporary file + rename).
    write_volume(out, ct)
    written = [str(out)]
    if preview is not None:
        from .geometry import Volume
        from .preview import write_preview

        labels = Volume(mask.array, mask.affine) if mask is not None else None
        write_preview(preview, ct, labels)
        written.append(str(preview))
    spacing = "×".join(f"{s:.4g}" for s in ct.spacing)
    print(f"wrote {' and '.join(written)} (CT int16 HU, {'×'.join(map(str, ct.shape))} voxels, {spacing} mm)")
    return 0


def _cmd_weights_init(args) -> int:
    from .presets import get_preset
    from .weights import init_weights

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    preset = get_preset(args.preset, args.width)
    files = init_weights(preset, out, seed=args.seed, nonzero=args.nonzero_init)
    kind = "random weights" + (" (zero-initialised layers filled)" if args.nonzero_init else "")
    print(f"wrote {preset.key} {kind}, seed {args.seed}, to {out}: {', '.join(p.name for p in files.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except InputError as exc:
        _say(f"maisi: error: {exc}")
        return 2
    except (Cancelled, KeyboardInterrupt):
        _say("maisi: cancelled; nothing was written")
        return 130
    except Exception as exc:  # unexpected: one line, traceback on request
        if os.environ.get("MAISI_DEBUG"):
            raise
        _say(f"maisi: unexpected failure: {type(exc).__name__}: {exc} (set MAISI_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
