"""The bundled demo model: small enough to ship, loads by name, and the README quick start's
generation from the real segmentation passes `maisi qc` for every organ it checks (liver, spleen,
pancreas, kidneys, lung, bone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_maisi
from maisicore.io.volumes import read_volume
from maisicore.models.weights import demo_weights_dir, read_model_card

ORGANS = ("liver", "spleen", "pancreas", "kidney", "lung", "bone")


def test_demo_model_is_bundled_small_and_documented():
    folder = demo_weights_dir()
    card = read_model_card(folder)
    assert card["model"] == "rflow-ct" and card["width"] == "tiny"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25e6, f"{size / 1e6:.1f} MB"
    text = (folder / "MODEL_CARD.md").read_text()
    for words in ("TotalSegmentator", "Apache-2.0", "not for", "train_demo_model.py"):
        assert words in text
    assert card["metrics"]["qc_passed"] is True
    # the card's check of the quick start's request over seeds 0-9: at least 9 pass, with real bone
    seeds = card["metrics"]["seeds_qc"]
    assert len(seeds) == 10 and card["metrics"]["seeds_passed"] == sum(row["passed"] for row in seeds.values()) >= 9
    assert all(row["bone"] >= 150 for row in seeds.values() if row["passed"]), seeds


@pytest.mark.slow
def test_quick_start_generation_passes_qc(converted_labels, tmp_path, maisi):
    labels = converted_labels[0]  # the quick start's `maisi labels convert` of the real segmentation
    ct, ct_labels, preview = tmp_path / "ct.nii.gz", tmp_path / "ct_labels.nii.gz", tmp_path / "ct.png"
    card = read_model_card(demo_weights_dir())
    # The real program, as the README runs it.
    result = run_maisi("generate", "--model", "demo", "--mask", labels, "--fit-grid",
                       "--size", *card["grid"]["size"], "--spacing", *card["grid"]["spacing"], "--allow-any-size",
                       "--on-mask-grid", "--seed", 0, "--device", "cpu", "--out", ct, "--label-out", ct_labels,
                       "--preview", preview)
    assert result.returncode == 0, result.stderr
    mask = read_volume(labels)
    image = read_volume(ct)
    assert image.shape == mask.shape and np.array_equal(image.affine, mask.affine)
    assert preview.stat().st_size > 1000
    report = tmp_path / "qc.json"
    result = maisi("qc", ct, "--label", ct_labels, "--json", report)
    rows = {row["organ"]: row for row in json.loads(report.read_text())}
    assert all(rows[organ]["checked"] and rows[organ]["passed"] for organ in ORGANS), result.stdout
    # the same medians the model card records (same seed, same machine kind: within 10 %)
    for organ in ORGANS:
        recorded = card["metrics"]["seeds_qc"]["0"][organ]
        assert abs(rows[organ]["median_hu"] - recorded) <= max(0.1 * abs(recorded), 10.0), (organ, rows[organ], recorded)
