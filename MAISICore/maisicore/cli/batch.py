"""``maisi batch MANIFEST --out DIR``: many cases from a manifest (``maisicore.pipelines.batch``)."""

from __future__ import annotations

from pathlib import Path

from .common import _positive_int, add_device, add_precision, add_seed


def add_batch(commands) -> None:
    """``maisi batch MANIFEST --out DIR`` (``maisicore.pipelines.batch``)."""
    batch = commands.add_parser(
        "batch",
        help="many cases from a manifest of requests: resumable, on local processes, torchrun or Ray",
        description=(
            "Run every request of MANIFEST (JSON lines, or CSV with a header: the fields of `maisi run` requests, "
            "kind generate or inpaint, plus \"count\" copies and an \"id\") into DIR. Each case gets a stable id and "
            "a seed derived from (line seed or --seed, line, copy), so the bytes do not depend on the workers. "
            "DIR/status.jsonl records every item; running the same command again skips finished items, redoes "
            "the rest and retries failed ones. Under `torchrun --nproc_per_node N -m maisicore batch ...` each rank "
            "is one worker on its own device. DIR/summary.json and DIR/montage.png are written at the end."
        ),
    )
    batch.add_argument("manifest", metavar="MANIFEST", help="requests, one JSON object per line (.jsonl) or CSV (.csv)")
    batch.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    batch.add_argument("--format", default="nifti", choices=("nifti", "monai", "nnunet"),
                       help="nifti: DIR/images, DIR/labels (default); monai: the same plus DIR/datalist.json; "
                            "nnunet: nnU-Net v2 raw layout (imagesTr, labelsTr, dataset.json)")
    batch.add_argument("--label-set", metavar="NAMES",
                       help="comma-separated MAISI label names to keep, written as 1..n in this order (others 0); "
                            "needed for --format nnunet; the mapping goes to DIR/label_map.json")
    batch.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                       help="local processes, or Ray actors with --backend ray, each loading the model once (default 1)")
    batch.add_argument("--backend", default="local", choices=("local", "ray"),
                       help="local processes (default) or Ray actors (pip install \"maisicore[ray]\")")
    batch.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local Ray)")
    batch.add_argument("--retries", type=int, default=0, metavar="N", help="attempts after a failure, per run (default 0)")
    batch.add_argument("--qc", action="store_true",
                       help="keep only cases passing the organ HU check (maisi qc), regenerating with the next seed")
    batch.add_argument("--qc-retries", type=int, default=3, metavar="N", help="regenerations per case with --qc (default 3)")
    add_seed(batch, help="base seed of lines without their own (default 0)")
    add_device(batch, help="auto, cpu, cuda (one GPU per worker) or cuda:N (default auto)")
    add_precision(batch, reference_numerics=False,
                  help="precision of lines without their own \"precision\" field (as for generate; default auto)")
    batch.add_argument("--montage", type=int, default=4, metavar="N", help="cases in DIR/montage.png (0: none; default 4)")
    batch.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                       help="torch CPU threads per worker (default 1: on CPU, use --workers for speed; the bytes "
                            "are identical across worker counts and backends for the same --threads)")
    batch.set_defaults(handler=_cmd_batch)


def _cmd_batch(args) -> int:
    from ..pipelines.batch import BatchOptions, run_batch
    from ..pipelines.runner import HumanReport

    options = BatchOptions(format=args.format, label_set=args.label_set, workers=args.workers, backend=args.backend,
                           ray_address=args.ray_address, retries=args.retries, qc=args.qc, qc_retries=args.qc_retries,
                           device=args.device, seed=args.seed, montage=args.montage, threads=args.threads,
                           precision=args.precision)
    summary = run_batch(args.manifest, args.out, options, HumanReport())
    if summary is not None:
        print(f"{summary.line()}; summary in {Path(args.out) / 'summary.json'}")
    return 0 if summary is None or not summary.failed else 1
