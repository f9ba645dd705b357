"""The Slicer modules import maisicore's rules, never copies, and stay light: importing their Qt-free
libraries and matching segments to MAISI labels must not load torch or MONAI into Slicer's process
(torch may not be installed yet, and loading it costs seconds and memory). Each check runs in a
fresh interpreter, so what earlier tests imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "monai")


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh Python with the test folder and the module folders on ``sys.path``
    (as conftest.py sets them); return the heavy modules it left in ``sys.modules``."""
    prelude = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = {[str(REPO / "Testing"), str(REPO / "MAISIGenerate"), str(REPO / "MAISITrain")]!r}
    """)
    report = f"\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + report],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", [
    "maisicore.anatomy.labels", "maisicore.anatomy.labelmap", "maisicore.anatomy.tumors", "maisicore.anatomy.grids",
    "maisicore.anatomy.body", "maisicore.anatomy.qc", "maisicore.anatomy.maskdb", "maisicore.anatomy.maskgen",
    "maisicore.models.presets",
    "maisicore.io.geometry", "maisicore.training.config",
])
def test_maisicore_rule_modules_import_without_torch(module):
    assert _heavy_modules_after(f"import {module}") == []


def test_slicer_libraries_import_and_match_segments_without_torch():
    """Import MAISIGenerateLib (logic, mrml, parameters) and MAISITrainLib, then on a real headless
    MRML scene match segments by name and by terminology, suggest a grid and size an inpainting
    region: the rules are maisicore's, and neither torch nor MONAI gets loaded."""
    heavy = _heavy_modules_after("""
        import numpy as np
        from MAISIGenerateLib import logic, mrml, parameters
        from MAISIGenerateLib.headless import headless_scene
        from MAISITrainLib import logic as train_logic
        from slicer_headless import add_segmentation, add_volume, paint_segment

        headless_scene()
        ct = add_volume(np.zeros((16, 16, 16), np.int16), np.diag([2.0, 2.5, 3.0, 1.0]), "CT")
        segmentation = add_segmentation("Segmentation", ct)
        stomach = ("Segmentation category and type - Total Segmentator~SCT^123037004^Anatomical Structure~"
                   "SCT^69695003^Stomach~^^~Anatomic codes - DICOM master list~^^~^^")
        for i, (name, terminology) in enumerate([("Liver", None), ("kidney left", None), ("Segment_3", stomach)]):
            mask = np.zeros((16, 16, 16), bool)
            mask[2 + 4 * i:5 + 4 * i, 4:9, 4:9] = True
            paint_segment(segmentation, name, mask, ct, terminology)

        matches = logic.match_segments(segmentation)
        assert [(m.label_id, m.matched_by) for m in matches] == [(1, "name"), (14, "name"), (12, "terminology")], matches
        size, spacing = logic.suggest_grid(logic.mask_grid(segmentation, ct), "ddpm-ct")
        assert logic.estimate_seconds(size, None, "ddpm-ct") > logic.estimate_seconds(size, None, "rflow-ct") > 0
        # 20 mm ball: (20 * 1.15 + 2 * 24) mm of region over 2, 2.5, 3 mm, up to multiples of 32.
        assert logic.inpaint_region_size(ct, 20.0) == (64, 32, 32), logic.inpaint_region_size(ct, 20.0)
        assert parameters.TUMOR_TYPES[0] == "hepatic tumor" and "lower" in parameters.BODY_REGIONS
        assert parameters.ANATOMY_SIZE_CLASSES[1] == "liver"  # the sliders' classes: maisicore's list
        train_logic.TrainRequest("controlnet", "/run", datalist="/d.json").check()
    """)
    assert heavy == []
