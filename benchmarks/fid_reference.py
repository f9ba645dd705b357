"""2.5D FID of `maisi evaluate` side by side with NVIDIA's own `scripts/compute_fid_2-5d_ct.py`, on CPU.

    python benchmarks/fid_reference.py --reference-git /work/.mirror/NVIDIA-Medtech+NV-Generate-CTMR/repo \
        --hub-git /work/.mirror/Warvito+radimagenet-models/repo \
        --real REAL_DIR --synthetic SYNTH_DIR [--size 128] [--work DIR]

REAL_DIR and SYNTH_DIR hold .nii.gz CTs only. The feature network is RadImageNet's ResNet-50
architecture with seeded random weights (torch.manual_seed(0), PyTorch's default initialisation),
saved to WORK/resnet50_seed0.pt; both sides load that file.

How the reference runs: its script is exported from the git repository (``git show
HEAD:scripts/compute_fid_2-5d_ct.py``) into WORK and imported as a module, after four text
replacements, each checked to match exactly once:
  1. ``backend="nccl"`` → ``backend="gloo"`` (one CPU process: RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
     MASTER_ADDR=127.0.0.1, a free MASTER_PORT);
  2. ``device = torch.device("cuda", local_rank)`` → ``device = torch.device("cpu")``;
  3. ``torch.cuda.set_device(device)`` → ``pass``;
  4. the ``torch.hub.load("Warvito/radimagenet-models", ...)`` line → a call that builds the hub
     repository's own ``ResNet50`` class (its ``radimagenet_models/models/resnet.py``, exported from
     its git repository the same way) and loads WORK/resnet50_seed0.pt into it (strict), instead of
     fetching the weights from Google Drive.
Two imports the script and the hub file make but never use here are stubbed when missing (``fire``,
the command-line wrapper; ``gdown``, the Drive downloader), and the module's ``FIDMetric`` name is
bound to a subclass that records each value it returns (the script only logs them, rounded).
Everything else, ``main()`` included (MONAI transforms, DataLoader with 6 workers, feature
extraction, all-gather, FID), runs as written, with the script's documented arguments and
``target_shape``/resampling as given here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPLACEMENTS = [
    ('backend="nccl"', 'backend="gloo"'),
    ('device = torch.device("cuda", local_rank)', 'device = torch.device("cpu")'),
    ("torch.cuda.set_device(device)", "pass"),
    ('feature_network = torch.hub.load("Warvito/radimagenet-models", model="radimagenet_resnet50", verbose=True, '
     'trust_repo=True)', "feature_network = _offline_radimagenet()"),
]


def _export(git_dir: str, path: str, target: Path) -> Path:
    text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout
    target.write_text(text)
    return target


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_reference(args, work: Path, weights: Path) -> dict[str, float]:
    for name in ("fire", "gdown"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    hub = _import(_export(args.hub_git, "radimagenet_models/models/resnet.py", work / "hub_resnet.py"), "hub_resnet")
    script = _export(args.reference_git, "scripts/compute_fid_2-5d_ct.py", work / "reference_fid.py")
    text = script.read_text()
    for old, new in REPLACEMENTS:
        assert text.count(old) == 1, f"expected one {old!r} in the reference script"
        text = text.replace(old, new)
    script.write_text(text)
    reference = _import(script, "reference_fid")

    def offline_radimagenet():
        network = hub.ResNet50()
        network.load_state_dict(torch.load(weights, weights_only=True), strict=True)
        return network

    recorded = []

    class RecordingFID(reference.FIDMetric):
        def __call__(self, *a, **k):
            value = super().__call__(*a, **k)
            recorded.append(float(value))
            return value

    reference._offline_radimagenet = offline_radimagenet
    reference.FIDMetric = RecordingFID
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    lists = {}
    for side, folder in (("real", args.real), ("synth", args.synthetic)):
        names = sorted(p.name for p in Path(folder).glob("*.nii.gz"))
        lists[side] = work / f"{side}_filelist.txt"
        lists[side].write_text("\n".join(names) + "\n")
    size = args.size
    reference.main(real_dataset_root=str(Path(args.real).resolve()), real_filelist=str(lists["real"]),
                   real_features_dir="real", synth_dataset_root=str(Path(args.synthetic).resolve()),
                   synth_filelist=str(lists["synth"]), synth_features_dir="synth", enable_center_slices_ratio=0.4,
                   enable_padding=True, enable_center_cropping=True, enable_resampling_spacing="1.0x1.0x1.0",
                   ignore_existing=True, model_name="radimagenet_resnet50", num_images=100,
                   output_root=str(work / "reference_features"), target_shape=f"{size}x{size}x{size}")
    assert len(recorded) == 3, recorded
    return dict(zip(("xy", "yz", "zx"), recorded))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-git", required=True, help="bare git dir of NVIDIA-Medtech/NV-Generate-CTMR")
    parser.add_argument("--hub-git", required=True, help="bare git dir of Warvito/radimagenet-models")
    parser.add_argument("--real", required=True)
    parser.add_argument("--synthetic", required=True)
    parser.add_argument("--size", type=int, default=128, help="target_shape side in voxels (reference: 512)")
    parser.add_argument("--work", default="fid_reference_work")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from maisicore.evaluation import evaluate
    from maisicore.evaluation.fid import RadImageNetResNet50

    torch.manual_seed(0)
    weights = work / "resnet50_seed0.pt"
    torch.save(RadImageNetResNet50().state_dict(), weights)

    start = time.perf_counter()
    ours = evaluate(args.real, args.synthetic, work / f"ours_{int(time.time())}", ("fid-2.5d",), feature_weights=weights,
                    fid_shape=(args.size,) * 3, fid_spacing=(1.0, 1.0, 1.0), fid_ratio=0.4, fid_batch=16,
                    device="cpu")["fid_2_5d"]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = run_reference(args, work, weights)
    reference_s = time.perf_counter() - start
    worst = 0.0
    print(f"\n{'plane':<8}{'maisi evaluate':>22}{'reference script':>22}{'relative difference':>22}")
    for plane in ("xy", "yz", "zx"):
        relative = abs(ours[plane] - reference[plane]) / abs(reference[plane])
        worst = max(worst, relative)
        print(f"{plane:<8}{ours[plane]:>22.10g}{reference[plane]:>22.10g}{relative:>22.3e}")
    average = sum(reference.values()) / 3
    print(f"{'average':<8}{ours['average']:>22.10g}{average:>22.10g}{abs(ours['average'] - average) / abs(average):>22.3e}")
    print(f"slices (real, synthetic): {ours['slices']}; target {args.size}³ at 1 mm; "
          f"time: ours {ours_s:.1f} s, reference {reference_s:.1f} s")
    print(f"largest relative difference {worst:.3e} ({'within' if worst <= 1e-6 else 'ABOVE'} 1e-6)")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
