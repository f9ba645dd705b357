"""``maisi generate``, ``maisi inpaint``, ``maisi run`` and ``maisi serve``: the commands that carry out
requests of ``maisicore.pipelines.requests`` (generate, inpaint, or any kind from JSON: one from a file,
or many in a row from a warm worker's standard input)."""

from __future__ import annotations

import sys

from ..errors import Cancelled, InputError
from ..models.presets import BODY_REGIONS, MODEL_NAMES, SAMPLERS
from .common import (
    VOLUME_OUT_HELP,
    _positive_int,
    add_decode,
    add_device,
    add_devices,
    add_memory_budget,
    add_precision,
    add_seed,
    add_volume_format,
)

# ---- maisi generate ------------------------------------------------------------------------------

GENERATE_DESCRIPTION = (
    "Generate a synthetic CT (int16 HU) or, with rflow-mr / rflow-mr-brain, an MR image (float32, image "
    "only, --modality). Modes (the reference's names): image from mask (--mask), paired image + mask "
    "(--anatomy: a mask from the candidate database), mask generation with controllable anatomy size "
    "(--anatomy-size: a new mask from the model's mask networks, then the image from it), image only "
    "(none of these); classifier-free guidance with --guidance-scale. "
    "With --mask the ControlNet follows a MAISI label volume "
    "and the CT takes the mask's grid (shape, spacing, direction, origin); voxels where the mask is 0 "
    "are set to -1000 HU. Without a mask the diffusion model runs alone on a grid centred on the origin."
)


def add_generate(commands) -> None:
    gen = commands.add_parser("generate", help="generate a synthetic CT, optionally matching a label mask",
                              description=GENERATE_DESCRIPTION)
    _generate_model_options(gen)
    _generate_grid_options(gen)
    _generate_mask_options(gen)
    _generate_run_options(gen)
    _generate_draft_and_update_options(gen)
    gen.set_defaults(handler=_cmd_generate)


def _generate_model_options(gen) -> None:
    """Which model, modality and guidance."""
    gen.add_argument("--model", default="rflow-ct", metavar="|".join((*MODEL_NAMES, "demo", "DIR")),
                     help="model name: rflow-ct and ddpm-ct (CT: from a mask, paired with a mask, or image only), "
                          "rflow-mr and rflow-mr-brain (MR image only: no mask; NVIDIA's names), demo (the small "
                          "model shipped with maisicore, for trying things out on CPU), or a weight folder with a "
                          "maisi_model.json card (default: rflow-ct)")
    gen.add_argument("--modality", metavar="NAME",
                     help="modality code by its reference name (modality_mapping.json): ct for the CT models; "
                          "for rflow-mr mri, mri_t1, mri_t2, mri_flair; for rflow-mr-brain mri_t1, mri_t2, mri_flair, "
                          "mri_swi, mri_mra and their *_skull_stripped forms (default: ct, MR models mri_t1)")
    gen.add_argument("--guidance-scale", type=float, metavar="S",
                     help="classifier-free guidance scale as the reference computes it (0: none; default the "
                          "reference config's: CT 0, rflow-mr 15, rflow-mr-brain 2). Image only: guidance on the "
                          "modality; with a mask: on the tumours (unconditional = the mask without tumours). "
                          "Doubles the denoising work")
    gen.add_argument("--weights-dir", metavar="DIR",
                     help="folder of the model's weight files (reference layout, models/*.pt); "
                          "default: $MAISI_HOME/weights/MODEL")


def _generate_grid_options(gen) -> None:
    """The output grid and the body region."""
    gen.add_argument("--size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                     help="output size in voxels (default: the mask's, else the model card's grid, else 256 256 256); "
                          "with --mask: generate on this grid around the labels and map back")
    gen.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                     help="voxel size in mm (default: the mask's, else the model card's, else 1.5 1.5 2)")
    gen.add_argument("--body-region", nargs="+", choices=BODY_REGIONS, metavar="REGION",
                     help=f"ddpm-ct only: body region(s) covered, top first ({', '.join(BODY_REGIONS)}); "
                          "default: derived from the mask")


def _generate_mask_options(gen) -> None:
    """The labels the CT follows: a mask, one from the database (--anatomy) or a generated one (--anatomy-size)."""
    gen.add_argument("--mask", metavar="LABELS",
                     help="MAISI label volume (.nii, .nii.gz, .nrrd) to follow, or a DICOM SEG (segments matched to "
                          "MAISI labels by name, else by their codes)")
    fit = gen.add_mutually_exclusive_group()
    fit.add_argument("--fit-grid", action="store_true",
                     help="always resample the mask (nearest) onto --size/--spacing or the closest grid the model "
                          "takes, and write the results on that grid (add --on-mask-grid to map them back)")
    fit.add_argument("--no-fit", action="store_true",
                     help="refuse a mask whose grid the model cannot take instead of fitting it (default: fit it "
                          "onto the closest valid grid and map the CT and labels back onto the mask's grid)")
    gen.add_argument("--on-mask-grid", action="store_true",
                     help="write the CT (and --label-out) on the mask's own grid (the default when a mask is "
                          "fitted automatically)")
    gen.add_argument("--anatomy", metavar="NAMES",
                     help="paired generation without a mask: comma-separated MAISI anatomy names (e.g. "
                          "\"liver,hepatic tumor\") a mask from --mask-db must contain")
    gen.add_argument("--mask-db", metavar="JSON",
                     help="candidate mask database (reference candidate_masks_*.json) for --anatomy; default "
                          "the index `maisi weights download MODEL --include-datasets` wrote in $MAISI_HOME/datasets")
    gen.add_argument("--mask-dir", metavar="DIR", help="folder of the database's mask files (default: the JSON's folder)")
    gen.add_argument("--anatomy-size", metavar="NAME=SIZE,...",
                     help="mask generation with controllable anatomy size (reference: controllable_anatomy_size): "
                          "generate a new mask with the model's mask networks (models/mask_generation_*.pt) for these "
                          "sizes, e.g. \"liver=0.6,hepatic tumor=0.1\", then the CT from it. NAME: gallbladder, liver, "
                          "stomach, pancreas, colon, lung tumor, pancreatic tumor, hepatic tumor, colon cancer "
                          "primaries, bone lesion (at most one tumour); SIZE: 0-1 (a fraction of the range seen in "
                          "training) or -1 (absent). The other sizes come from the closest entry of "
                          "all_anatomy_size_conditions.json. The mask (256³ at 1.5 mm) is resampled onto --size/--spacing")
    gen.add_argument("--anatomy-size-db", metavar="JSON",
                     help="the anatomy size database for --anatomy-size (default: all_anatomy_size_conditions.json in "
                          "$MAISI_HOME/datasets, from NVIDIA's NV-Generate-CT datasets/)")
    gen.add_argument("--mask-steps", type=_positive_int, metavar="N",
                     help="DDPM steps of the mask generation (default: all the mask scheduler's train timesteps, 1000 "
                          "for NVIDIA's networks, as the reference; fewer leave the mask noisy)")
    gen.add_argument("--label-out", metavar="LABELS", help="also write the label volume the CT was generated from")


def _generate_run_options(gen) -> None:
    """Seed, sampling, device, decode and what is written."""
    gen.add_argument("--qc-retries", type=int, default=0, metavar="N",
                     help="check organ HU medians (maisi qc) and regenerate with the next seed up to N times")
    add_seed(gen)
    gen.add_argument("--steps", type=_positive_int,
                     help="denoising steps (default: rflow-ct 30, ddpm-ct 1000)")
    gen.add_argument("--sampler", default="euler", choices=SAMPLERS,
                     help="rectified-flow solver: euler (reference, default), heun (2 evaluations per step) or "
                          "ab2 (second order, 1 evaluation per step); e.g. --sampler ab2 --steps 15")
    add_device(gen)
    add_precision(gen)
    add_decode(gen, help="VAE decode: exact tensor splitting in bounded memory (default), the reference's "
                         "sliding window (seams), or MONAI's plain decode")
    add_memory_budget(gen)
    add_devices(gen)
    gen.add_argument("--allow-any-size", action="store_true",
                     help="accept any size that is a multiple of 32 and any spacing (tests, tiny models)")
    gen.add_argument("--preview", metavar="PNG", help="also write a PNG of the three mid-planes")
    gen.add_argument("--dry-run", action="store_true",
                     help="check the whole request and print the estimated peak memory; run no network, write nothing")
    add_volume_format(gen, help="how --out is written (default: by its extension); dicom: a new folder with the CT as "
                                "a DICOM series (DIR/ct/) and the labels as a DICOM SEG (DIR/labels.dcm), marked synthetic")
    gen.add_argument("--out", required=True, metavar="CT", help=VOLUME_OUT_HELP)


def _generate_draft_and_update_options(gen) -> None:
    """Drafts and region updates (``pipelines.draft``, ``pipelines.update``): the loop of editing a mask."""
    gen.add_argument("--draft", action="store_true",
                     help="a quick look: sample 4x fewer voxels per axis over the same field of view with the ab2 "
                          "sampler (at most 10 network evaluations; rectified-flow models), then resample the CT "
                          "onto the requested grid (the labels stay the mask's). Marked DRAFT in the result line, "
                          "the notes and the file's header")
    gen.add_argument("--update", metavar="PREVIOUS_CT",
                     help="regenerate only where --mask differs from --previous-labels (plus --update-margin), "
                          "following --mask; every other voxel is PREVIOUS_CT's, bit for bit. The three volumes "
                          "must share one grid")
    gen.add_argument("--previous-labels", metavar="LABELS",
                     help="with --update: the labels PREVIOUS_CT was generated from")
    gen.add_argument("--update-margin", type=float, metavar="MM",
                     help="with --update: also regenerate the voxels within MM mm of a changed label (default 10)")


def _generate_request(args):
    from ..pipelines.requests import GenerateRequest

    return GenerateRequest(
        model=args.model, weights_dir=args.weights_dir, out=args.out, label_out=args.label_out, preview=args.preview,
        mask=args.mask, anatomy=[n.strip() for n in args.anatomy.split(",")] if args.anatomy is not None else None,
        mask_db=args.mask_db, mask_dir=args.mask_dir, size=list(args.size) if args.size else None,
        spacing=list(args.spacing) if args.spacing else None, body_region=args.body_region,
        fit="always" if args.fit_grid else ("never" if args.no_fit else "auto"),
        on_mask_grid=True if args.on_mask_grid else None, seed=args.seed, steps=args.steps,
        qc_retries=args.qc_retries, device=args.device, decode=args.decode, memory_budget_gb=args.memory_budget,
        allow_any_size=args.allow_any_size, dry_run=args.dry_run, format=args.format,
        modality=args.modality, guidance_scale=args.guidance_scale,
        sampler=args.sampler, devices=args.devices.split(",") if args.devices is not None else None,
        anatomy_size=args.anatomy_size, anatomy_size_db=args.anatomy_size_db, mask_steps=args.mask_steps,
        draft=args.draft, update=args.update, previous_labels=args.previous_labels,
        update_margin_mm=args.update_margin,
        precision=args.precision, reference_numerics=args.reference_numerics,
    )


def _cmd_generate(args) -> int:
    from ..pipelines.runner import HumanReport, run_generate

    run_generate(_generate_request(args), HumanReport())
    return 0


# ---- maisi inpaint -------------------------------------------------------------------------------


def add_inpaint(commands) -> None:
    inpaint = commands.add_parser(
        "inpaint",
        help="inpaint a tumour into a CT (latent blending with the ControlNet models)",
        description=(
            "Generate a tumour inside a real CT: from --tumor-mask, or a smooth irregular ball at --tumor-center "
            "(RAS mm) of --tumor-diameter (mm), clipped to its host organ when --labels are given. Only a region "
            "around the tumour is encoded, regenerated and decoded; voxels outside the dilated tumour are "
            "copied unchanged. The output has the input's shape, dtype (int16) and affine."
        ),
    )
    inpaint.add_argument("--image", required=True, metavar="CT", help="CT volume file or a DICOM series (its folder, one of its files, or FOLDER#SeriesInstanceUID)")
    inpaint.add_argument("--tumor-mask", metavar="M", help="binary tumour mask on the CT's grid (a volume file or a DICOM SEG)")
    inpaint.add_argument("--tumor-center", nargs=3, type=float, metavar=("X", "Y", "Z"), help="RAS, mm")
    inpaint.add_argument("--tumor-diameter", type=float, metavar="MM")
    inpaint.add_argument("--tumor-type", required=True, metavar="NAME",
                         help='"hepatic tumor", "pancreatic tumor", "lung tumor", "colon cancer primaries", "bone lesion"')
    inpaint.add_argument("--labels", metavar="LABELS", help="MAISI anatomy labels on the CT's grid (a volume file or a DICOM SEG)")
    inpaint.add_argument("--model", default="rflow-ct", metavar="rflow-ct|ddpm-ct|demo|DIR")
    inpaint.add_argument("--weights-dir", metavar="DIR")
    add_seed(inpaint)
    inpaint.add_argument("--steps", type=_positive_int)
    add_device(inpaint)
    add_precision(inpaint)
    inpaint.add_argument("--allow-any-size", action="store_true",
                         help="accepted for symmetry with generate: the inpainting region is always a multiple of 32")
    inpaint.add_argument("--out", required=True, metavar="CT_WITH_TUMOR", help=VOLUME_OUT_HELP)
    add_volume_format(inpaint, help="how --out is written (default: by its extension); dicom: the CT as a DICOM series "
                                    "(DIR/ct/) and the anatomy and tumour as a DICOM SEG (DIR/labels.dcm), marked "
                                    "synthetic and derived, under a new synthetic patient")
    inpaint.add_argument("--keep-patient", action="store_true",
                         help="with --format dicom and a DICOM --image: keep the source's patient, study and frame "
                              "of reference, and reference each source slice")
    inpaint.add_argument("--label-out", metavar="L", help="anatomy used and the tumour, dictionary ids")
    inpaint.set_defaults(handler=_cmd_inpaint)


def _cmd_inpaint(args) -> int:
    from ..pipelines.requests import InpaintRequest
    from ..pipelines.runner import HumanReport, run_inpaint

    request = InpaintRequest(
        image=args.image, tumor_type=args.tumor_type, tumor_mask=args.tumor_mask,
        tumor_center=list(args.tumor_center) if args.tumor_center is not None else None,
        tumor_diameter=args.tumor_diameter, labels=args.labels, model=args.model, weights_dir=args.weights_dir,
        seed=args.seed, steps=args.steps, device=args.device, out=args.out, label_out=args.label_out,
        format=args.format, keep_patient=args.keep_patient,
        precision=args.precision, reference_numerics=args.reference_numerics,
    )
    run_inpaint(request, HumanReport())
    return 0


# ---- maisi run -----------------------------------------------------------------------------------


def add_run(commands) -> None:
    run = commands.add_parser(
        "run",
        help="carry out a request file (generate, inpaint, weights) and write JSON-lines events: for programs",
        description=(
            "Carry out the request in REQUEST.json ({\"kind\": \"generate\"|\"inpaint\"|\"weights\", ...}, the fields of "
            "maisicore.pipelines.requests) and write one JSON object per line on stdout: start, info, note, "
            "progress (stage, done, total), result (files written, seed, qc, timings) or error (code, message). "
            "Exit codes as for the other commands."
        ),
    )
    run.add_argument("request", metavar="REQUEST.json", help="the request (JSON); - reads standard input")
    run.set_defaults(handler=_cmd_run)


def _cmd_run(args) -> int:
    """``maisi run REQUEST.json``: JSON-lines events on stdout; errors become an error event too."""
    from .. import __version__
    from ..pipelines.requests import read_request, request_from_dict
    from ..pipelines.runner import EventReport, run_request

    report = EventReport(sys.stdout)
    try:
        if args.request == "-":
            import json

            try:
                data = json.loads(sys.stdin.read())
            except ValueError as exc:
                raise InputError(f"request on standard input: not valid JSON ({exc})") from exc
            request = request_from_dict(data, "request on standard input")
        else:
            request = read_request(args.request)
        report.emit("start", kind=request.kind, version=__version__, protocol=1)
        run_request(request, report)
    except InputError as exc:
        report.emit("error", code=2, message=str(exc))
        raise
    except (Cancelled, KeyboardInterrupt):
        report.emit("error", code=130, message="cancelled; nothing was written")
        raise
    except Exception as exc:
        report.emit("error", code=1, message=f"{type(exc).__name__}: {exc}")
        raise
    return 0


def add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="a warm worker: JSON-lines requests with an id on stdin, their events on stdout, networks kept loaded",
        description=(
            "Read requests ({\"id\": ID, \"kind\": ...}, the fields of `maisi run`) and cancels ({\"cancel\": ID}) as "
            "JSON lines on stdin; answer with `maisi run`'s events, each with its request's id, on stdout. One request "
            "at a time; loaded networks are kept between requests. Ends (exit 0) when stdin closes, and when the "
            "parent process dies. See maisicore.pipelines.serve."
        ),
    )
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    """``maisi serve``: the warm worker (``maisicore.pipelines.serve``)."""
    from ..pipelines.serve import serve_main

    return serve_main()
