"""The body envelope from a CT: agreement with NVIDIA's ``add_body_envelope``, the time of
`maisi labels convert --ct`, and the envelope's time and memory on a large CT.

    python benchmarks/body_envelope.py [--repeat 3] [--stack 15]

1. On TotalSegmentator's example_ct_sm + example_seg and the 20-slice DICOM series +
   example_seg_dicom (labels converted to MAISI ids as `maisi labels convert` does): Dice of the body
   (every non-zero voxel) and the voxels that differ, ours (``envelope_from_ct``) against NVIDIA's
   function (imported from ../shared/reference/nv-generate-ctmr, ``device="cpu"``), with both
   functions' times.
2. `maisi labels convert --from totalsegmentator example_seg_dicom.nii.gz --ct example_ct_dicom`
   run as a program (Python start, DICOM read, conversion, envelope, NIfTI write): wall time, best of
   ``--repeat``.
3. The series stacked ``--stack`` times along z (512×512×20·stack): ``envelope_from_ct`` time and
   its peak of NumPy allocations (tracemalloc), the envelope's memory beyond the CT and labels.
Needs the real test data (``python Testing/fetch_test_data.py``) and scikit-image (the reference's
largest-component step).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "MAISICore"))
sys.path.insert(0, str(REPO / "Testing"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stack", type=int, default=15)
    args = parser.parse_args()

    import fetch_test_data
    from maisicore.anatomy.body import envelope_from_ct
    from maisicore.anatomy.labelmap import read_totalsegmentator
    from maisicore.io.geometry import onto_grid_of
    from maisicore.io.volumes import read_volume
    from nvidia_reference import import_reference

    data = fetch_test_data.reference_files()
    with tempfile.TemporaryDirectory() as tmp:
        reference = import_reference(Path(tmp)).utils
        cases = {}
        for seg, ct in (("example_seg.nii.gz", "example_ct_sm.nii.gz"), ("example_seg_dicom.nii.gz", "example_ct_dicom")):
            labels, _ = read_totalsegmentator(data / seg)
            hu = onto_grid_of(read_volume(data / ct, modality="CT"), labels).array
            cases[ct] = labels.array, hu
            lungs = bool(np.isin(labels.array, (28, 29, 30, 31, 32)).any())
            start = time.perf_counter()
            theirs = reference.add_body_envelope(labels.array, hu, device="cpu", seg_has_lung=lungs)
            t_theirs = time.perf_counter() - start
            start = time.perf_counter()
            ours = envelope_from_ct(labels.array, hu, 200)
            t_ours = time.perf_counter() - start
            a, b = theirs != 0, ours != 0
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            print(f"{ct} {labels.shape}: body {int(a.sum())} voxels (reference), Dice {dice:.6f}, "
                  f"{int((a ^ b).sum())} voxels differ ({100 * (a ^ b).sum() / a.sum():.3f} %), labels identical: "
                  f"{np.array_equal(ours, theirs)}; ours {t_ours:.2f} s, reference {t_theirs:.2f} s")

        out = Path(tmp) / "labels.nii.gz"
        command = [sys.executable, "-m", "maisicore", "labels", "convert", "--from", "totalsegmentator",
                   str(data / "example_seg_dicom.nii.gz"), "--ct", str(data / "example_ct_dicom"), "--out", str(out)]
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={"PYTHONPATH": str(REPO / "MAISICore"),
                                                                            "PATH": "/usr/bin:/bin"})
            times.append(time.perf_counter() - start)
        print(f"maisi labels convert --ct (512×512×20 series): best {min(times):.2f} s of "
              f"{', '.join(f'{t:.2f}' for t in times)}")

    labels, hu = cases["example_ct_dicom"]
    big_labels, big_hu = np.concatenate([labels] * args.stack, axis=2), np.concatenate([hu] * args.stack, axis=2)
    tracemalloc.start()
    start = time.perf_counter()
    envelope_from_ct(big_labels, big_hu, 200)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"envelope_from_ct on {big_hu.shape} ({big_hu.size / 1e6:.0f} M voxels): {seconds:.1f} s, "
          f"peak allocations {peak / 2**20:.0f} MiB ({peak / big_hu.size:.1f} bytes per voxel, output included)")


if __name__ == "__main__":
    main()
