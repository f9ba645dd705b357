"""The demo segmentation MAISIGenerate offers in Sample Data: shipped with the extension (listed in
CMake), fetched from the module folder with no network the way Sample Data fetches any URI
(``urllib.request.urlretrieve`` into its cache, then the SHA-256 check), loaded with Slicer's
segmentation reader, and it is the converted TotalSegmentator example: MAISI Generate matches every
segment by name and gets back exactly the labels ``maisi labels convert`` writes."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import slicer
from maisicore.io.volumes import read_volume
from MAISIGenerateLib import mrml, sampledata
from MAISIGenerateLib.logic import labels_from_segmentation, mask_grid, match_segments
from PIL import Image
from slicer_headless import REPO

MODULE = REPO / "MAISIGenerate"


def test_the_sample_is_registered_as_a_shipped_file_with_its_checksum(tmp_path):
    (source,) = sampledata.sample_data_sources(MODULE)
    assert source["category"] == "MAISI" and source["loadFileType"] == ["SegmentationFile"]
    uri = source["uris"][0]
    assert uri.startswith("file:") and uri.endswith("/MAISIGenerate/Resources/SampleData/MAISIDemoSegmentation.seg.nrrd")
    algorithm, digest = source["checksums"][0].split(":")
    shipped = MODULE / "Resources" / "SampleData" / source["fileNames"][0]
    assert algorithm == "SHA256" and hashlib.sha256(shipped.read_bytes()).hexdigest() == digest
    assert shipped.stat().st_size < 100_000  # small enough to ship

    cached, _headers = urllib.request.urlretrieve(uri, tmp_path / source["fileNames"][0])  # what Sample Data does
    assert hashlib.sha256(Path(cached).read_bytes()).hexdigest() == digest

    with Image.open(source["thumbnailFileName"]) as thumbnail:
        assert thumbnail.format == "PNG" and min(thumbnail.size) >= 100
    listed = (MODULE / "CMakeLists.txt").read_text()
    for name in ("Resources/SampleData/MAISIDemoSegmentation.seg.nrrd", "Resources/SampleData/README.md",
                 "Resources/Icons/MAISIDemoSegmentation.png", "${MODULE_NAME}Lib/sampledata.py"):
        assert name in listed, f"{name} is not packaged"
    assert "Apache License 2.0" in (MODULE / "Resources" / "SampleData" / "README.md").read_text()


def test_the_sample_loads_and_gives_the_converted_example_back(scene, converted_labels):
    (source,) = sampledata.sample_data_sources(MODULE)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", source["nodeNames"][0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(Path(urllib.request.url2pathname(source["uris"][0].removeprefix("file:")))))
    assert storage.ReadData(node)

    matches = match_segments(node)
    assert len(matches) == 42 and all(m.matched_by == "name" for m in matches)  # 41 organs + body
    grid = mask_grid(node)  # the segmentation carries its grid: no reference volume needed
    converted = read_volume(converted_labels[0])
    assert grid.shape == converted.shape == (122, 101, 30)

    build = labels_from_segmentation(node, None, add_body=False)
    np.testing.assert_allclose(build.labels.affine, converted.affine, atol=1e-4)
    np.testing.assert_array_equal(build.labels.array, np.rint(converted.array).astype(np.int16))
    assert slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, matches[0].segment_id) is not None
    assert mrml.segment_terminology(node.GetSegmentation().GetSegment(matches[0].segment_id))
