"""The ``maisi`` command line.

Exit codes: 0 success; 2 bad input (one line on stderr, nothing written); 1 unexpected failure
(set ``MAISI_DEBUG=1`` for the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .errors import Cancelled, InputError
from .models.presets import BODY_REGIONS, CT_MODEL_NAMES, MODEL_NAMES, SAMPLERS, WIDTHS

MAX_PATCH_SIDE = 768  # voxels: the largest side of a published output grid
DEVICES_HELP = ("spread the exact decode's slabs over these devices, comma-separated (cpu, cuda, cuda:N; one "
                "worker per name, a name may repeat: cuda:0,cuda:1 or cpu,cpu), one autoencoder copy each; the "
                "result equals the one-device decode. The whole-volume decode, when it fits, runs on the first. "
                "The networks still run on --device (default: --device only)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maisi",
        description=("MAISI synthetic CT and MR generation: NVIDIA's MAISI models (rflow-ct, ddpm-ct: CT image "
                     "from a mask, paired CT + mask, CT image only; rflow-mr, rflow-mr-brain: MR image only) "
                     "on CPU or GPU."),
    )
    parser.add_argument("--version", action="version", version=f"maisi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser(
        "generate",
        help="generate a synthetic CT, optionally matching a label mask",
        description=(
            "Generate a synthetic CT (int16 HU) or, with rflow-mr / rflow-mr-brain, an MR image (float32, image "
            "only, --modality). Modes (the reference's names): image from mask (--mask), paired image + mask "
            "(--anatomy: a mask from the candidate database), mask generation with controllable anatomy size "
            "(--anatomy-size: a new mask from the model's mask networks, then the image from it), image only "
            "(none of these); classifier-free guidance with --guidance-scale. "
            "With --mask the ControlNet follows a MAISI label volume "
            "and the CT takes the mask's grid (shape, spacing, direction, origin); voxels where the mask is 0 "
            "are set to -1000 HU. Without a mask the diffusion model runs alone on a grid centred on the origin."
        ),
    )
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
    gen.add_argument("--size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                     help="output size in voxels (default: the mask's, else the model card's grid, else 256 256 256); "
                          "with --mask: generate on this grid around the labels and map back")
    gen.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                     help="voxel size in mm (default: the mask's, else the model card's, else 1.5 1.5 2)")
    gen.add_argument("--body-region", nargs="+", choices=BODY_REGIONS, metavar="REGION",
                     help=f"ddpm-ct only: body region(s) covered, top first ({', '.join(BODY_REGIONS)}); "
                          "default: derived from the mask")
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
    gen.add_argument("--qc-retries", type=int, default=0, metavar="N",
                     help="check organ HU medians (maisi qc) and regenerate with the next seed up to N times")
    gen.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output (default 0)")
    gen.add_argument("--steps", type=_positive_int,
                     help="denoising steps (default: rflow-ct 30, ddpm-ct 1000)")
    gen.add_argument("--sampler", default="euler", choices=SAMPLERS,
                     help="rectified-flow solver: euler (reference, default), heun (2 evaluations per step) or "
                          "ab2 (second order, 1 evaluation per step); e.g. --sampler ab2 --steps 15")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    gen.add_argument("--decode", default="exact", choices=("exact", "sliding-window", "plain"),
                     help="VAE decode: exact tensor splitting in bounded memory (default), the reference's "
                          "sliding window (seams), or MONAI's plain decode")
    gen.add_argument("--memory-budget", type=float, metavar="GB",
                     help="the most memory the process may hold while decoding (CPU: resident, CUDA: device "
                          "memory; default: what it holds plus free memory minus 0.5 GiB)")
    gen.add_argument("--devices", metavar="DEV[,DEV...]", help=DEVICES_HELP)
    gen.add_argument("--allow-any-size", action="store_true",
                     help="accept any size that is a multiple of 32 and any spacing (tests, tiny models)")
    gen.add_argument("--preview", metavar="PNG", help="also write a PNG of the three mid-planes")
    gen.add_argument("--dry-run", action="store_true",
                     help="check the whole request and print the estimated peak memory; run no network, write nothing")
    gen.add_argument("--format", choices=("nifti", "nrrd", "dicom"),
                     help="how --out is written (default: by its extension); dicom: a new folder with the CT as a "
                          "DICOM series (DIR/ct/) and the labels as a DICOM SEG (DIR/labels.dcm), marked synthetic")
    gen.add_argument("--out", required=True, metavar="CT",
                     help="output CT (.nii, .nii.gz or .nrrd), or with --format dicom a new folder")
    gen.set_defaults(handler=_cmd_generate)

    weights = commands.add_parser(
        "weights",
        help="manage model weight sets: download NVIDIA's official weights, list, verify, remove, or init random ones",
    )
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
    init.add_argument("--force", action="store_true", help="overwrite a weight set already in --out")
    init.add_argument("--mask-networks", action="store_true",
                      help="also write random mask generation networks (models/mask_generation_autoencoder.pt, "
                           "models/mask_generation_diffusion_unet.pt) for `maisi generate --anatomy-size`")
    init.add_argument("--nonzero-init", action="store_true",
                      help="fill the layers MONAI starts at zero (UNet and ControlNet outputs) with small random "
                           "values, so untrained networks act: for tests and pipeline demos, not for training")
    init.set_defaults(handler=_cmd_weights_init)
    weights_list = weight_commands.add_parser(
        "list",
        help="list the official models: installed or not, folder, size, licence and whether it was accepted",
    )
    weights_list.add_argument("--json", action="store_true",
                              help='JSON list of {"model", "installed", "path", "files", "size_bytes", "license", '
                                   '"license_url", "license_accepted", ...}')
    weights_list.set_defaults(handler=_cmd_weights_list)
    weights_download = weight_commands.add_parser(
        "download",
        help="download a model's official weights from Hugging Face (nvidia/NV-Generate-CT), resumably",
        description=(
            "Download the three official checkpoints of MODEL from the Hugging Face repo nvidia/NV-Generate-CT "
            "(revision main) into $MAISI_HOME/weights/MODEL/models/ (MAISI_HOME defaults to ~/.maisi) with a "
            "maisi_model.json card, so `maisi generate --model MODEL` finds them. The weights are NVIDIA's, under "
            "the NVIDIA Open Model License: the first download needs --accept-license (remembered in "
            "$MAISI_HOME/licenses_accepted.json; `maisi weights list` shows the licence and its link). The files come "
            "through huggingface_hub (HF_TOKEN for a gated repository, HF_ENDPOINT or --base-url for a mirror): sizes "
            "and the sha256 the Hub publishes are asked first, free disk space is checked, a cut connection is resumed "
            "and complete files are kept when the command is run again. Each file is checked against the Hub's sha256 "
            "(git blob id for small files) and its sha256 recorded in hashes.json for `maisi weights verify`."
        ),
    )
    weights_download.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=" or ".join(MODEL_NAMES))
    weights_download.add_argument("--accept-license", action="store_true",
                                  help="accept the model's licence (NVIDIA Open Model License); remembered for "
                                       "later downloads")
    weights_download.add_argument("--base-url", metavar="URL",
                                  help="mirror serving URL/nvidia/NV-Generate-CT/resolve/main/PATH as the Hugging Face "
                                       "Hub does (default: $MAISI_WEIGHTS_BASE_URL, else $HF_ENDPOINT, else "
                                       "https://huggingface.co)")
    weights_download.add_argument("--include-datasets", action="store_true",
                                  help="also download what the paired modes need: the candidate mask database (--anatomy) and "
                                       "the anatomy size database into $MAISI_HOME/datasets (about 12 GB, unpacked to "
                                       "about 14 GB), and the mask generation networks (--anatomy-size) into the model's folder")
    weights_download.set_defaults(handler=_cmd_weights_download)
    weights_verify = weight_commands.add_parser(
        "verify",
        help="check downloaded files against the sha256 recorded at download (exit 1 naming a bad or missing file)",
        description=(
            "Re-hash each downloaded file and compare it with the sha256 recorded in hashes.json. --load also "
            "loads each checkpoint (weights_only=True) against the model's network and reports missing, "
            "unexpected and mis-shaped keys; benign extra keys can be allowed in the weight folder's "
            "maisi_model.json (\"allowed_extra_keys\": {\"ROLE\": [\"PATTERN\", ...]}). Exit 1 on any problem."
        ),
    )
    weights_verify.add_argument("model", nargs="?", choices=MODEL_NAMES, metavar="MODEL",
                                help="model to check (default: every downloaded model)")
    weights_verify.add_argument("--load", action="store_true",
                                help="also load every checkpoint into its network and report key mismatches")
    weights_verify.set_defaults(handler=_cmd_weights_verify)
    weights_path = weight_commands.add_parser("path", help="print the folder a model's official weights are kept in")
    weights_path.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=" or ".join(MODEL_NAMES))
    weights_path.set_defaults(handler=_cmd_weights_path)
    weights_remove = weight_commands.add_parser(
        "remove",
        help="delete a downloaded model (checkpoints, partial files, card, recorded hashes)",
        description=(
            "Delete the downloaded files of MODEL from $MAISI_HOME/weights/MODEL, and the folder when nothing else "
            "is left in it. The datasets and the licence acceptance are kept."
        ),
    )
    weights_remove.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=" or ".join(MODEL_NAMES))
    weights_remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    weights_remove.set_defaults(handler=_cmd_weights_remove)

    labels = commands.add_parser("labels", help="the MAISI label vocabulary and conversion to it")
    label_commands = labels.add_subparsers(dest="labels_command", metavar="ACTION", parser_class=_Parser)
    listing = label_commands.add_parser("list", help="list MAISI label ids, names and TotalSegmentator classes")
    listing.add_argument("--json", action="store_true", help="JSON with colours and Slicer terminology strings")
    listing.set_defaults(handler=_cmd_labels_list)
    convert = label_commands.add_parser(
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

    vae = commands.add_parser("vae", help="encode a CT to latents or decode latents, exactly and in bounded memory")
    vae_commands = vae.add_subparsers(dest="vae_command", metavar="ACTION", parser_class=_Parser)
    encode = vae_commands.add_parser(
        "encode",
        help="CT → latent [X/4, Y/4, Z/4, 4] NIfTI with a JSON sidecar",
        description=(
            "Encode a CT with the MAISI autoencoder: reoriented to RAS, HU clipped to [-1000, 1000] and scaled "
            "to [0, 1], padded with air to a multiple of 4; the exact split encoder writes the posterior mean "
            "as LATENT (.nii.gz, [X, Y, Z, 4], latent-grid affine) and LATENT.json (image grid, modality)."
        ),
    )
    encode.add_argument("--weights", required=True, metavar="AE.pt", help="autoencoder checkpoint (official or tiny width)")
    encode.add_argument("--image", required=True, metavar="CT", help="CT volume file or a DICOM series (its folder, one of its files, or FOLDER#SeriesInstanceUID)")
    encode.add_argument("--memory-budget", type=float, metavar="GB", help="as for generate")
    encode.add_argument("--device", default="auto")
    encode.add_argument("--out", required=True, metavar="LATENT.nii.gz")
    encode.set_defaults(handler=_cmd_vae_encode)
    decode = vae_commands.add_parser(
        "decode",
        help="latent NIfTI → CT (int16 HU)",
        description="Decode a latent [X, Y, Z, 4] (divided by --scale-factor first) to a CT in HU, int16.",
    )
    decode.add_argument("--weights", required=True, metavar="AE.pt")
    decode.add_argument("--latent", required=True, metavar="LATENT")
    decode.add_argument("--scale-factor", type=float, default=1.0, metavar="F",
                        help="divide the latent by F first (diffusion outputs: the model's scale_factor; default 1)")
    decode.add_argument("--memory-budget", type=float, metavar="GB",
                        help="the most memory the process may hold while decoding (default: free memory)")
    decode.add_argument("--decode", default="exact", choices=("exact", "sliding-window", "plain"))
    decode.add_argument("--device", default="auto")
    decode.add_argument("--devices", metavar="DEV[,DEV...]", help=DEVICES_HELP)
    decode.add_argument("--out", required=True, metavar="CT")
    decode.set_defaults(handler=_cmd_vae_decode)

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
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--steps", type=_positive_int)
    inpaint.add_argument("--device", default="auto")
    inpaint.add_argument("--allow-any-size", action="store_true",
                         help="accepted for symmetry with generate: the inpainting region is always a multiple of 32")
    inpaint.add_argument("--out", required=True, metavar="CT_WITH_TUMOR",
                         help="output CT (.nii, .nii.gz or .nrrd), or with --format dicom a new folder")
    inpaint.add_argument("--format", choices=("nifti", "nrrd", "dicom"),
                         help="how --out is written (default: by its extension); dicom: the CT as a DICOM series "
                              "(DIR/ct/) and the anatomy and tumour as a DICOM SEG (DIR/labels.dcm), marked synthetic "
                              "and derived, under a new synthetic patient")
    inpaint.add_argument("--keep-patient", action="store_true",
                         help="with --format dicom and a DICOM --image: keep the source's patient, study and frame "
                              "of reference, and reference each source slice")
    inpaint.add_argument("--label-out", metavar="L", help="anatomy used and the tumour, dictionary ids")
    inpaint.set_defaults(handler=_cmd_inpaint)

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

    _add_batch_command(commands)
    _add_training_commands(commands)
    _add_evaluate_command(commands)
    return parser


def _add_evaluate_command(commands) -> None:
    """``maisi evaluate`` (metrics and a report) and ``maisi evaluate compare A B``."""
    from .evaluation.run import METRICS

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
    evaluate.add_argument("--memory-budget", type=float, metavar="GB", help="vae: memory budget for the split VAE")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_batch_command(commands) -> None:
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
    batch.add_argument("--seed", type=int, default=0, help="base seed of lines without their own (default 0)")
    batch.add_argument("--device", default="auto", help="auto, cpu, cuda (one GPU per worker) or cuda:N")
    batch.add_argument("--montage", type=int, default=4, metavar="N", help="cases in DIR/montage.png (0: none; default 4)")
    batch.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                       help="torch CPU threads per worker (default 1: on CPU, use --workers for speed; the bytes "
                            "are identical across worker counts and backends for the same --threads)")
    batch.set_defaults(handler=_cmd_batch)


def _cmd_batch(args) -> int:
    from .pipelines.batch import BatchOptions, run_batch
    from .pipelines.runner import HumanReport

    options = BatchOptions(format=args.format, label_set=args.label_set, workers=args.workers, backend=args.backend,
                           ray_address=args.ray_address, retries=args.retries, qc=args.qc, qc_retries=args.qc_retries,
                           device=args.device, seed=args.seed, montage=args.montage, threads=args.threads)
    summary = run_batch(args.manifest, args.out, options, HumanReport())
    if summary is not None:
        print(f"{summary.line()}; summary in {Path(args.out) / 'summary.json'}")
    return 0 if summary is None or not summary.failed else 1


def _add_training_commands(commands) -> None:
    """``maisi prepare`` (datalists, cached latents) and ``maisi train vae|diffusion|controlnet``."""
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
    prepare_commands = prepare.add_subparsers(dest="prepare_command", metavar="ACTION", parser_class=_Parser)
    latents = prepare_commands.add_parser(
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
    latents.add_argument("--device", default="auto")
    latents.add_argument("--memory-budget", type=float, metavar="GB", help="as for generate")
    latents.set_defaults(handler=_cmd_prepare_latents)

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
    train.add_argument("--seed", type=int, help="seed of initialisation, patches, noise and timesteps (default 0)")
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
    train.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    train.set_defaults(handler=_cmd_train)


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):  # stderr closed: nothing left to tell
        pass


def _distinct(outputs: dict, inputs: dict) -> None:
    """An output never names an input or another output (``pipelines.safety``)."""
    from .pipelines.safety import check_distinct

    check_distinct({k: v for k, v in outputs.items() if v}, {k: v for k, v in inputs.items() if v})


def _check_seed(seed: int, option: str = "--seed") -> None:
    from .pipelines.requests import MAX_SEED

    if not 0 <= seed < MAX_SEED:
        raise InputError(f"{option} {seed}: must be an integer from 0 to 2^63-1")


def _check_finite_positive(value, option: str) -> None:
    import math

    if value is not None and (not math.isfinite(value) or value <= 0):
        raise InputError(f"{option} {value:g}: must be a positive finite number")


def _budget_bytes(gigabytes: float | None) -> int | None:
    if gigabytes is None:
        return None
    _check_finite_positive(gigabytes, "--memory-budget")
    return int(gigabytes * 2**30)


def _generate_request(args):
    from .pipelines.requests import GenerateRequest

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
    )


def _cmd_generate(args) -> int:
    from .pipelines.runner import HumanReport, run_generate

    run_generate(_generate_request(args), HumanReport())
    return 0


def _cmd_run(args) -> int:
    """``maisi run REQUEST.json``: JSON-lines events on stdout; errors become an error event too."""
    from . import __version__
    from .pipelines.requests import read_request, request_from_dict
    from .pipelines.runner import EventReport, run_request

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


def _cmd_labels_list(args) -> int:
    import json

    from .anatomy.labels import label_table

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
    from .anatomy.body import BodyOptions

    given = {name: getattr(args, f"body_{arg}") for name, arg in (
        ("air_hu", "air_hu"), ("closing_voxels", "closing"), ("bed_voxels", "bed"), ("table_fraction", "table_fraction"))}
    given = {name: value for name, value in given.items() if value is not None}
    lungs = {"auto": None, "yes": True, "no": False}[args.body_lungs]
    if (given or lungs is not None) and (args.no_body or not args.ct):
        raise InputError("the --body-* options shape the body envelope from --ct: give --ct (and no --no-body)")
    return BodyOptions(**given, labels_have_lungs=lungs).check()


def _cmd_labels_convert(args) -> int:
    from .anatomy.labelmap import (
        read_named_masks,
        read_totalsegmentator,
        with_body_envelope,
    )
    from .io.volumes import (
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


def _cmd_prepare(args) -> int:
    from .training.datalist import prepare_datalist

    if not args.images or not args.out:
        raise InputError("maisi prepare needs --images DIR and --out DATALIST.json (or the action `latents`)")
    from .io.volumes import check_output_folder

    _distinct({"--out": args.out}, {"--images": args.images, "--labels": args.labels})
    check_output_folder(args.out, "--out")
    data = prepare_datalist(args.images, args.labels, args.out, folds=args.folds, modality=args.modality)
    for problem in data["problems"]:
        _say(f"problem: {problem['file']}: {problem['reason']}")
    print(f"wrote {args.out}: {len(data['training'])} cases, {len(data['problems'])} problem(s)")
    return 0


def _cmd_prepare_latents(args) -> int:
    from .io.volumes import check_output_folder
    from .training.latents import prepare_latents
    from .validation import resolve_device

    _distinct({"--out": args.out}, {"--datalist": args.datalist, "--weights": args.weights})
    check_output_folder(args.out, "--out")
    data = prepare_latents(args.datalist, args.weights, args.out_dir, args.out, round_to=args.round_to,
                           device=resolve_device(args.device), memory_budget_bytes=_budget_bytes(args.memory_budget))
    print(f"wrote {args.out}: {len(data['training'])} latents in {args.out_dir}")
    return 0


def _cmd_train(args) -> int:
    from .models.presets import get_preset
    from .training.config import load_config
    from .training.run import train

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


def _cmd_vae_encode(args) -> int:
    from .io.volumes import check_output_folder, read_volume
    from .pipelines.vae import (
        LATENT_EXTENSIONS,
        encode_ct,
        load_autoencoder,
        write_latent,
    )
    from .validation import resolve_device

    if not args.out.lower().endswith(LATENT_EXTENSIONS):
        raise InputError(f"--out {args.out}: latents are written as .nii.gz or .nii")
    _distinct({"--out": args.out, "--out sidecar": f"{args.out}.json"}, {"--image": args.image, "--weights": args.weights})
    check_output_folder(args.out, "--out")
    budget = _budget_bytes(args.memory_budget)
    device = resolve_device(args.device)
    ct = read_volume(args.image, modality="CT")
    autoencoder = load_autoencoder(args.weights, device)
    latent, affine, sidecar = encode_ct(autoencoder, ct, device, budget, log=_say)
    write_latent(args.out, latent, affine, sidecar)
    print(f"wrote {args.out} ({'×'.join(map(str, latent.shape))} float32) and {args.out}.json")
    return 0


def _cmd_vae_decode(args) -> int:
    from .io.volumes import check_output_path, write_volume
    from .pipelines.vae import decode_latent, load_autoencoder, read_latent
    from .validation import resolve_device

    _distinct({"--out": args.out}, {"--latent": args.latent, "--latent sidecar": f"{args.latent}.json",
                                    "--weights": args.weights})
    out = check_output_path(args.out)
    _check_finite_positive(args.scale_factor, "--scale-factor")
    budget = _budget_bytes(args.memory_budget)
    device = resolve_device(args.device)
    devices = None
    if args.devices is not None:
        from .devices import check_decode_method, resolve_devices

        devices = resolve_devices(args.devices)
        check_decode_method(devices, args.decode)
    latent, affine = read_latent(args.latent)
    autoencoder = load_autoencoder(args.weights, device)
    ct = decode_latent(autoencoder, latent, affine, device, args.scale_factor, args.decode, budget, log=_say,
                       devices=devices)
    write_volume(out, ct)
    print(f"wrote {out} (CT int16 HU, {'×'.join(map(str, ct.shape))} voxels)")
    return 0


def _cmd_inpaint(args) -> int:
    from .pipelines.requests import InpaintRequest
    from .pipelines.runner import HumanReport, run_inpaint

    request = InpaintRequest(
        image=args.image, tumor_type=args.tumor_type, tumor_mask=args.tumor_mask,
        tumor_center=list(args.tumor_center) if args.tumor_center is not None else None,
        tumor_diameter=args.tumor_diameter, labels=args.labels, model=args.model, weights_dir=args.weights_dir,
        seed=args.seed, steps=args.steps, device=args.device, out=args.out, label_out=args.label_out,
        format=args.format, keep_patient=args.keep_patient,
    )
    run_inpaint(request, HumanReport())
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import compare, evaluate
    from .evaluation.run import parse_metrics

    if args.compare:
        if len(args.compare) != 3 or args.compare[0] != "compare":
            raise InputError("usage: maisi evaluate compare REPORT_A REPORT_B [--out FILE.md]")
        text, _ = compare(args.compare[1], args.compare[2])
        if args.out:
            from .io.volumes import atomic_write, check_output_folder

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
        from .models.weights import check_weight_files, resolve_model

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


def _cmd_qc(args) -> int:
    import json

    from .anatomy.qc import check_ct, format_table
    from .io.volumes import read_volume
    from .validation import check_mask_values

    if args.json:
        from .io.volumes import check_output_folder

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
        from .io.volumes import atomic_write

        rows = [dict(vars(c), passed=c.passed, checked=c.checked) for c in checks]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2) + "\n"))
    failed = [c.organ for c in checks if not c.passed]
    if failed:
        print(f"quality check failed: {', '.join(failed)} outside the range of real CTs")
        return 1
    checked = [c.organ for c in checks if c.checked]
    print(f"quality check passed for {', '.join(checked) if checked else 'no organ (none present)'}")
    return 0


def _cmd_weights_init(args) -> int:
    from .models.presets import get_preset
    from .models.weights import MODEL_CARD, MODELS_SUBDIR, init_weights

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    _check_seed(args.seed)
    if not args.force and ((out / MODEL_CARD).exists() or (out / MODELS_SUBDIR).exists()):
        raise InputError(f"--out {out} already holds a weight set; add --force to overwrite it, or choose another folder")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    preset = get_preset(args.preset, args.width)
    if args.mask_networks and preset.image_only:
        raise InputError(f"--mask-networks: {preset.name} is an image-only model; it cannot follow a generated mask")
    files = init_weights(preset, out, seed=args.seed, nonzero=args.nonzero_init)
    if args.mask_networks:
        from .models.weights import init_mask_weights

        files.update(init_mask_weights(out, args.width, seed=args.seed, nonzero=args.nonzero_init))
    kind = "random weights" + (" (zero-initialised layers filled)" if args.nonzero_init else "")
    print(f"wrote {preset.key} {kind}, seed {args.seed}, to {out}: {', '.join(p.name for p in files.values())}")
    return 0


def _cmd_weights_list(args) -> int:
    import json

    from .models.download import OFFICIAL_MODELS, human_bytes, model_status

    rows = [model_status(name) for name in OFFICIAL_MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14} {'state':<14} {'size':>9}  {'licence':<55} folder")
    for row in rows:
        size = human_bytes(row["size_bytes"]) if row["installed"] else f"~{human_bytes(row['size_bytes'])}"
        licence = f"{row['license']} ({'accepted' if row['license_accepted'] else 'not accepted'})"
        state = "installed" if row["installed"] else "not installed"
        print(f"{row['model']:<14} {state:<14} {size:>9}  {licence:<55} {row['path']}")
    for licence in {(row["license"], row["license_url"], row["license_summary"]) for row in rows}:
        print(f"\n{licence[0]}: {licence[1]}\n{licence[2]}")
    return 0


def _cmd_weights_download(args) -> int:
    from .models.download import download_model, human_bytes

    report = download_model(args.model, accept_license=args.accept_license, base_url=args.base_url,
                            include_datasets=args.include_datasets, show_progress=True, log=_say)
    if not report.fetched:
        print(f"{args.model}: already downloaded in {report.folder}")
        return 0
    names = ", ".join(path.name for path in report.fetched)
    print(f"downloaded {args.model} to {report.folder}: {names} ({human_bytes(report.bytes_received)} received; "
          f"sha256 recorded in hashes.json)")
    return 0


def _cmd_weights_verify(args) -> int:
    from .models.download import OFFICIAL_MODELS, model_dir, verify_model
    from .models.weights import default_weights_root

    models = [args.model] if args.model else [name for name in OFFICIAL_MODELS if model_dir(name).is_dir()]
    if not models:
        print(f"ok: nothing to verify (no official weights downloaded under {default_weights_root()})")
        return 0
    failed, unrecorded, good = [], 0, 0
    for name in models:
        for check in verify_model(name):
            print(f"{check.state:<10} {check.path}" + (f" ({check.detail})" if check.detail else ""))
            if check.state in ("mismatch", "missing"):
                failed.append((name, check))
            elif check.state == "unrecorded":
                unrecorded += 1
            else:
                good += 1
    if failed:
        names = "; ".join(f"{check.path} ({check.detail})" for _, check in failed)
        redo = " and ".join(sorted({f"`maisi weights download {name}`" for name, _ in failed}))
        fix = "delete the mismatching file(s), then run" if any(c.state == "mismatch" for _, c in failed) else "run"
        _say(f"maisi: verify failed: {names}; {fix} {redo} to fetch them again")
        return 1
    note = f", {unrecorded} without a recorded hash" if unrecorded else ""
    if args.load and not _verify_loading(models):
        return 1
    print(f"ok: {good} file(s) match their recorded sha256{note}" + (", every checkpoint loads" if args.load else ""))
    return 0


def _verify_loading(models: list[str]) -> bool:
    """``weights verify --load``: each checkpoint against its network; prints one line per file."""
    from .models.download import model_dir
    from .models.weights import check_weight_set, resolve_model

    problems = []
    for name in models:
        preset, folder = resolve_model(name, model_dir(name))
        for check in check_weight_set(preset, folder):
            allowed = f", {len(check.allowed)} allowed extra key(s) ignored" if check.allowed else ""
            if check.ok:
                print(f"{'loads':<10} {check.path} ({check.tensors} tensors into the {preset.key} {check.role}{allowed})")
                continue
            parts = [check.error] if check.error else []
            for what, keys in (("missing", check.missing), ("unexpected", check.unexpected),
                               ("mis-shaped", check.wrong_shape)):
                if keys:
                    parts.append(f"{len(keys)} {what} key(s) (first: {', '.join(keys[:3])})")
            print(f"{'mismatch':<10} {check.path} ({'; '.join(parts)})")
            problems.append(f"{check.path.name}: {'; '.join(parts)}")
    if problems:
        _say(f"maisi: verify --load failed: {' | '.join(problems)}; benign extra keys can be allowed in the "
             "weight folder's maisi_model.json (\"allowed_extra_keys\")")
    return not problems


def _cmd_weights_path(args) -> int:
    from .models.download import model_dir

    print(model_dir(args.model))
    return 0


def _cmd_weights_remove(args) -> int:
    from .models.download import model_dir, remove_model

    folder = model_dir(args.model)
    if not folder.exists():
        print(f"{args.model}: nothing to remove ({folder} does not exist)")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError(f"`maisi weights remove {args.model}` deletes {folder}: add --yes to confirm")
        answer = input(f"delete the downloaded {args.model} weights in {folder}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    removed = remove_model(args.model)
    left = f"; {folder} kept: it holds other files" if folder.exists() else ""
    print(f"removed {args.model}: {len(removed)} file(s) deleted from {folder}{left}")
    return 0


def _interrupted_message() -> str:
    """What is on disk after an interruption: the files already complete, or nothing."""
    from .io.volumes import written_files

    done = [str(p) for p in written_files() if p.exists()]
    if done:
        return f"maisi: cancelled; already complete: {', '.join(done)}; nothing else was written"
    return "maisi: cancelled; nothing was written"


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the ``maisi`` command; returns the exit code (0, 1, 2, 130; 141 when stdout was closed)."""
    import signal

    previous = None
    if threading_main():
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # SIGTERM cleans up like Ctrl-C
        # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
        # `kill -INT` must still stop a run cleanly (a terminal's Ctrl-C never reaches a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
        _say(_interrupted_message())
        return 130
    except BrokenPipeError:  # the reader of our output went away (`maisi labels list | head`): end quietly
        _quiet_closed_streams()
        return 141
    except Exception as exc:  # unexpected: one line, traceback on request
        if os.environ.get("MAISI_DEBUG"):
            raise
        _say(f"maisi: unexpected failure: {type(exc).__name__}: {exc} (set MAISI_DEBUG=1 for the traceback)")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be set there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _quiet_closed_streams() -> None:
    """Point stdout/stderr at /dev/null so the interpreter's exit flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
