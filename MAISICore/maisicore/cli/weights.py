"""``maisi weights init|list|download|verify|path|remove``: model weight sets."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError
from ..models.presets import MODEL_NAMES, WIDTHS
from .common import _check_seed, _say, add_seed, subcommands

MODEL_HELP = " or ".join(MODEL_NAMES)


def add_weights(commands) -> None:
    weights = commands.add_parser(
        "weights",
        help="manage model weight sets: download NVIDIA's official weights, list, verify, remove, or init random ones",
    )
    actions = subcommands(weights, "weights_command")
    _add_init(actions)
    _add_list(actions)
    _add_download(actions)
    _add_verify(actions)
    path = actions.add_parser("path", help="print the folder a model's official weights are kept in")
    path.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=MODEL_HELP)
    path.set_defaults(handler=_cmd_weights_path)
    _add_remove(actions)


def _add_init(actions) -> None:
    init = actions.add_parser(
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
    add_seed(init, help="initialisation seed (default 0)")
    init.add_argument("--force", action="store_true", help="overwrite a weight set already in --out")
    init.add_argument("--mask-networks", action="store_true",
                      help="also write random mask generation networks (models/mask_generation_autoencoder.pt, "
                           "models/mask_generation_diffusion_unet.pt) for `maisi generate --anatomy-size`")
    init.add_argument("--nonzero-init", action="store_true",
                      help="fill the layers MONAI starts at zero (UNet and ControlNet outputs) with small random "
                           "values, so untrained networks act: for tests and pipeline demos, not for training")
    init.set_defaults(handler=_cmd_weights_init)


def _add_list(actions) -> None:
    listing = actions.add_parser(
        "list",
        help="list the official models: installed or not, folder, size, licence and whether it was accepted",
    )
    listing.add_argument("--json", action="store_true",
                         help='JSON list of {"model", "installed", "path", "files", "size_bytes", "license", '
                              '"license_url", "license_accepted", ...}')
    listing.set_defaults(handler=_cmd_weights_list)


def _add_download(actions) -> None:
    download = actions.add_parser(
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
    download.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=MODEL_HELP)
    download.add_argument("--accept-license", action="store_true",
                          help="accept the model's licence (NVIDIA Open Model License); remembered for later downloads")
    download.add_argument("--base-url", metavar="URL",
                          help="mirror serving URL/nvidia/NV-Generate-CT/resolve/main/PATH as the Hugging Face "
                               "Hub does (default: $MAISI_WEIGHTS_BASE_URL, else $HF_ENDPOINT, else "
                               "https://huggingface.co)")
    download.add_argument("--include-datasets", action="store_true",
                          help="also download what the paired modes need: the candidate mask database (--anatomy) and "
                               "the anatomy size database into $MAISI_HOME/datasets (about 12 GB, unpacked to "
                               "about 14 GB), and the mask generation networks (--anatomy-size) into the model's folder")
    download.set_defaults(handler=_cmd_weights_download)


def _add_verify(actions) -> None:
    verify = actions.add_parser(
        "verify",
        help="check downloaded files against the sha256 recorded at download (exit 1 naming a bad or missing file)",
        description=(
            "Re-hash each downloaded file and compare it with the sha256 recorded in hashes.json. --load also "
            "loads each checkpoint (weights_only=True) against the model's network and reports missing, "
            "unexpected and mis-shaped keys; benign extra keys can be allowed in the weight folder's "
            "maisi_model.json (\"allowed_extra_keys\": {\"ROLE\": [\"PATTERN\", ...]}). Exit 1 on any problem."
        ),
    )
    verify.add_argument("model", nargs="?", choices=MODEL_NAMES, metavar="MODEL",
                        help="model to check (default: every downloaded model)")
    verify.add_argument("--load", action="store_true",
                        help="also load every checkpoint into its network and report key mismatches")
    verify.set_defaults(handler=_cmd_weights_verify)


def _add_remove(actions) -> None:
    remove = actions.add_parser(
        "remove",
        help="delete a downloaded model (checkpoints, partial files, card, recorded hashes)",
        description=(
            "Delete the downloaded files of MODEL from $MAISI_HOME/weights/MODEL, and the folder when nothing else "
            "is left in it. The datasets and the licence acceptance are kept."
        ),
    )
    remove.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help=MODEL_HELP)
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    remove.set_defaults(handler=_cmd_weights_remove)
def _cmd_weights_init(args) -> int:
    from ..models.presets import get_preset
    from ..models.weights import MODEL_CARD, MODELS_SUBDIR, init_weights

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
        from ..models.weights import init_mask_weights

        files.update(init_mask_weights(out, args.width, seed=args.seed, nonzero=args.nonzero_init))
    kind = "random weights" + (" (zero-initialised layers filled)" if args.nonzero_init else "")
    print(f"wrote {preset.key} {kind}, seed {args.seed}, to {out}: {', '.join(p.name for p in files.values())}")
    return 0


def _cmd_weights_list(args) -> int:
    import json

    from ..models.download import OFFICIAL_MODELS, human_bytes, model_status

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
    from ..models.download import download_model, human_bytes

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
    from ..models.download import OFFICIAL_MODELS, model_dir, verify_model
    from ..models.weights import default_weights_root

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
    from ..models.download import model_dir
    from ..models.weights import check_weight_set, resolve_model

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
    from ..models.download import model_dir

    print(model_dir(args.model))
    return 0


def _cmd_weights_remove(args) -> int:
    from ..models.download import model_dir, remove_model

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
