"""``maisi qc CT --label LABELS``: organ HU medians against the ranges of real CTs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .common import _distinct


def add_qc(commands) -> None:
    qc = commands.add_parser(
        "qc",
        help="check organ HU medians of a CT against real-CT ranges",
        description=(
            "Median HU of liver, spleen, pancreas, kidneys, lungs, bone and brain inside their MAISI labels, "
            "against the reference ranges of real CTs. Exit code 1 when an organ is out of range."
        ),
    )
    qc.add_argument("ct", metavar="CT")
    qc.add_argument("--label", required=True, metavar="LABELS", help="MAISI label volume on the CT's grid")
    qc.add_argument("--json", metavar="JSON", help="also write the results as JSON")
    qc.set_defaults(handler=_cmd_qc)


def _cmd_qc(args) -> int:
    import json

    from ..anatomy.qc import check_ct, format_table
    from ..io.volumes import read_volume
    from ..validation import check_mask_values

    if args.json:
        from ..io.volumes import check_output_folder

        _distinct({"--json": args.json}, {"CT": args.ct, "--label": args.label})
        check_output_folder(args.json, "--json")
    ct = read_volume(args.ct, modality="CT")
    labels = read_volume(args.label)
    if not labels.same_grid(ct):
        raise InputError(f"--label {args.label} is not on the CT's grid (shape and affine must match)")
    label_ids = check_mask_values(labels.array, f"--label {args.label}")
    if not label_ids.any():
        raise InputError(f"--label {args.label}: every voxel is background (0); nothing to check")
    checks = check_ct(ct.array.astype(np.float32), label_ids.astype(np.int32))
    print(format_table(checks))
    if args.json:
        from ..io.volumes import atomic_write

        rows = [dict(vars(c), passed=c.passed, checked=c.checked) for c in checks]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2) + "\n"))
    failed = [c.organ for c in checks if not c.passed]
    if failed:
        print(f"quality check failed: {', '.join(failed)} outside the range of real CTs")
        return 1
    checked = [c.organ for c in checks if c.checked]
    print(f"quality check passed for {', '.join(checked) if checked else 'no organ (none present)'}")
    return 0
