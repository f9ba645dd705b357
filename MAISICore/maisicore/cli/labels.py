"""``maisi labels list|convert``: the MAISI label vocabulary and conversion to it."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .common import _distinct, _say, subcommands


def add_labels(commands) -> None:
    labels = commands.add_parser("labels", help="the MAISI label vocabulary and conversion to it")
    actions = subcommands(labels, "labels_command")
    listing = actions.add_parser("list", help="list MAISI label ids, names and TotalSegmentator classes")
    listing.add_argument("--json", action="store_true", help="JSON with colours and Slicer terminology strings")
    listing.set_defaults(handler=_cmd_labels_list)
    convert = actions.add_parser(
        "convert",
        help="convert a segmentation to a MAISI label volume (with the body envelope, label 200)",
        description=(
            "Convert a TotalSegmentator result (a multi-label file or a folder of class masks) or named binary "
            "masks (file names or NAME=PATH; names, synonyms or Slicer terminology strings) to MAISI label ids, "
            "then add the body envelope (label 200) from --ct or from the labels. Unmapped classes are listed, "
            "never dropped silently; overlaps resolve tumours over organs over body, smaller over larger."
        ),
    )
    convert.add_argument("--from", dest="source", required=True, choices=("totalsegmentator", "names"))
    convert.add_argument("segmentation", nargs="+", metavar="SEG")
    convert.add_argument("--ct", metavar="CT",
                         help="CT on the same grid (a volume file or a DICOM series (its folder, one of its files, or FOLDER#SeriesInstanceUID)): body envelope from its HU (NVIDIA's add_body_envelope)")
    convert.add_argument("--no-body", action="store_true", help="do not add the body envelope")
    body = convert.add_argument_group("body envelope from --ct (NVIDIA's parameters and defaults)")
    body.add_argument("--body-air-hu", type=float, metavar="HU", help="air below this HU (default -800)")
    body.add_argument("--body-closing", type=int, metavar="VOXELS", help="closing box side, odd (default 3)")
    body.add_argument("--body-bed", type=int, metavar="VOXELS", help="table cut-off erosion box side, odd (default 5)")
    body.add_argument("--body-table-fraction", type=float, metavar="F",
                      help="air regions in the body of at least F of it are table pieces, removed (default 0.05)")
    body.add_argument("--body-lungs", choices=("auto", "yes", "no"), default="auto",
                      help="the labels include the lungs: remove table pieces (auto: a lung lobe is labelled)")
    convert.add_argument("--out", required=True, metavar="MAISI_LABELS")
    convert.add_argument("--report", metavar="JSON", help="write the mapping report (mapped, unmapped, overlaps)")
    convert.set_defaults(handler=_cmd_labels_convert)


def _cmd_labels_list(args) -> int:
    import json

    from ..anatomy.labels import label_table

    table = label_table()
    if args.json:
        rows = [
            {"id": i.id, "name": i.name, "totalsegmentator": list(i.totalsegmentator), "tumor": i.tumor,
             "color": list(i.color), "terminology": i.terminology_entry()}
            for i in table
        ]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':>3}  {'name':<30} {'tumour':<6} TotalSegmentator")
    for info in table:
        print(f"{info.id:>3}  {info.name:<30} {'yes' if info.tumor else '':<6} {', '.join(info.totalsegmentator)}")
    return 0


def _body_options(args):
    """The ``--body-*`` options of ``labels convert`` as ``BodyOptions`` (checked; they need --ct)."""
    from ..anatomy.body import BodyOptions

    given = {name: getattr(args, f"body_{arg}") for name, arg in (
        ("air_hu", "air_hu"), ("closing_voxels", "closing"), ("bed_voxels", "bed"), ("table_fraction", "table_fraction"))}
    given = {name: value for name, value in given.items() if value is not None}
    lungs = {"auto": None, "yes": True, "no": False}[args.body_lungs]
    if (given or lungs is not None) and (args.no_body or not args.ct):
        raise InputError("the --body-* options shape the body envelope from --ct: give --ct (and no --no-body)")
    return BodyOptions(**given, labels_have_lungs=lungs).check()


def _cmd_labels_convert(args) -> int:
    from ..anatomy.labelmap import (
        read_named_masks,
        read_totalsegmentator,
        with_body_envelope,
    )
    from ..io.volumes import (
        check_output_folder,
        check_output_path,
        read_volume,
        write_volume,
    )

    _distinct({"--out": args.out, "--report": args.report},
              {**{f"segmentation {s}": s.split("=", 1)[-1] for s in args.segmentation}, "--ct": args.ct})
    out = check_output_path(args.out)
    if args.report:
        check_output_folder(args.report, "--report")
    body = _body_options(args)
    if args.source == "totalsegmentator":
        if len(args.segmentation) != 1:
            raise InputError("--from totalsegmentator takes one multi-label file or one folder of class masks")
        labels, report = read_totalsegmentator(args.segmentation[0])
    else:
        labels, report = read_named_masks(args.segmentation)
    if not np.any(labels.array):
        raise InputError(f"no voxel of {' '.join(args.segmentation)} maps to a MAISI label (see the unmapped classes "
                         "with --report, or `maisi labels list`)")
    if not args.no_body:
        ct = read_volume(args.ct, modality="CT") if args.ct else None
        labels = with_body_envelope(labels, report, ct, body)
    write_volume(out, labels)
    if args.report:
        report.write_json(args.report)
    for item in report.unmapped:
        _say(f"unmapped: {item['source']} ({item['voxels']} voxels)")
    print(f"wrote {out}: {report.summary()}")
    return 0
