"""``maisi evaluate`` (metrics and a report) and ``maisi evaluate compare A B``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .common import (
    _budget_bytes,
    _check_finite_positive,
    _distinct,
    _positive_int,
    _say,
    add_device,
    add_memory_budget,
)


def add_evaluate(commands) -> None:
    """``maisi evaluate`` (metrics and a report) and ``maisi evaluate compare A B``."""
    from ..evaluation.run import METRICS

    evaluate = commands.add_parser(
        "evaluate",
        help="measure how real, faithful and diverse synthetic CTs are (FID, FRD, VAE, organ HU, MS-SSIM); "
             "`evaluate compare A B` compares two reports",
        description=(
            "Compute the chosen metrics for real and synthetic CTs (a folder: CTs with NAME_labels beside them; or a "
            "datalist) and write REPORT_DIR/report.md, metrics.json and PNG plots. `maisi evaluate compare A B` prints "
            "how report B differs from report A."
        ),
    )
    evaluate.add_argument("compare", nargs="*", metavar="compare A B", help="compare two report folders instead")
    evaluate.add_argument("--real", metavar="DIR|DATALIST", help="real CTs (labels optional)")
    evaluate.add_argument("--synthetic", metavar="DIR|DATALIST", help="synthetic CTs (labels for fidelity)")
    evaluate.add_argument("--out", metavar="REPORT_DIR", help="new or empty folder for the report (compare: a .md file)")
    evaluate.add_argument("--metrics", metavar="LIST",
                          help=f"comma-separated, from {','.join(METRICS)} (default vae,fidelity,diversity)")
    evaluate.add_argument("--vae-weights", metavar="AE.pt", help="vae: the autoencoder checkpoint")
    evaluate.add_argument("--model", metavar="MODEL", help="vae: take the autoencoder of this model (demo, rflow-ct, DIR)")
    evaluate.add_argument("--feature-weights", metavar="PT",
                          help="fid-2.5d: RadImageNet ResNet-50 state dict (RadImageNet-ResNet50_notop.pth)")
    evaluate.add_argument("--fid-size", type=_positive_int, nargs=3, default=(512, 512, 512), metavar=("X", "Y", "Z"),
                          help="fid-2.5d: pad/crop to this many voxels (default 512 512 512, the reference's)")
    evaluate.add_argument("--fid-spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                          help="fid-2.5d: resample to this voxel size in mm (default 1 1 1)")
    evaluate.add_argument("--fid-ratio", type=float, default=0.4, help="fid-2.5d: central fraction of slices (0.4)")
    evaluate.add_argument("--fid-batch", type=_positive_int, default=8, help="fid-2.5d: slices per network call (8)")
    evaluate.add_argument("--frd-full", action="store_true",
                          help="frd: the package's full feature set (LoG and wavelet images too; about a minute per CT)")
    add_memory_budget(evaluate, help="vae: memory budget for the split VAE")
    add_device(evaluate, help="auto, cpu, cuda (default auto)")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from ..evaluation import compare, evaluate
    from ..evaluation.run import parse_metrics

    if args.compare:
        if len(args.compare) != 3 or args.compare[0] != "compare":
            raise InputError("usage: maisi evaluate compare REPORT_A REPORT_B [--out FILE.md]")
        text, _ = compare(args.compare[1], args.compare[2])
        if args.out:
            from ..io.volumes import atomic_write, check_output_folder

            _distinct({"--out": args.out}, {"A": args.compare[1], "B": args.compare[2]})
            check_output_folder(args.out, "--out")
            atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(text, end="")
        return 0
    if not args.out:
        raise InputError("--out REPORT_DIR is required (see `maisi evaluate --help`)")
    metrics = parse_metrics(args.metrics)
    for value, option in ((args.fid_spacing, "--fid-spacing"),):
        for v in value:
            _check_finite_positive(v, option)
    if not 0 < args.fid_ratio <= 1:
        raise InputError(f"--fid-ratio {args.fid_ratio:g}: must be in (0, 1]")
    vae_weights = args.vae_weights
    if args.model and "vae" in metrics:
        if vae_weights:
            raise InputError("give --vae-weights or --model, not both")
        from ..models.weights import check_weight_files, resolve_model

        preset, folder = resolve_model(args.model, None)
        vae_weights = check_weight_files(preset, folder)["autoencoder"]
    result = evaluate(args.real, args.synthetic, args.out, metrics, vae_weights=vae_weights,
                      feature_weights=args.feature_weights, fid_shape=tuple(args.fid_size),
                      fid_spacing=tuple(args.fid_spacing), fid_ratio=args.fid_ratio, fid_batch=args.fid_batch,
                      frd_full=args.frd_full, device=args.device, memory_budget_bytes=_budget_bytes(args.memory_budget), log=_say)
    for name, value in result["summary"].items():
        print(f"{name}: {value:.4g}")
    print(f"wrote {args.out}/report.md, metrics.json and the plots")
    return 0
