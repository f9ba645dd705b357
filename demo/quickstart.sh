#!/usr/bin/env bash
# Quick start from a clean clone, CPU only: install maisicore (CPU torch), fetch a real CT segmentation
# (TotalSegmentator's example, from PyPI), generate a matching synthetic CT with the bundled demo
# model, and check its organ HU medians. Writes OUT/ct.nii.gz, OUT/ct_labels.nii.gz, OUT/ct.png.
#   bash demo/quickstart.sh [OUT]        (default OUT: quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-quickstart}

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install --quiet torch==2.13.0      # pinned CPU build first
python -m pip install --quiet -e MAISICore

DATA=$(python Testing/fetch_test_data.py | tail -n 1)
mkdir -p "$OUT"
maisi labels convert --from totalsegmentator "$DATA/example_seg.nii.gz" --ct "$DATA/example_ct_sm.nii.gz" \
    --out "$OUT/labels.nii.gz"
# The mask's grid (122×101×30 at 3 mm) is fitted onto the closest grid the demo model takes
# (128×96×32) and the CT and labels are mapped back onto the mask's grid.
maisi generate --model demo --mask "$OUT/labels.nii.gz" --seed 0 --device cpu \
    --out "$OUT/ct.nii.gz" --label-out "$OUT/ct_labels.nii.gz" --preview "$OUT/ct.png"
maisi qc "$OUT/ct.nii.gz" --label "$OUT/ct_labels.nii.gz"
