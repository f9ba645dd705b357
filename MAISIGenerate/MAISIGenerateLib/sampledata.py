"""The MAISI demo case in Slicer's Sample Data module: a segmentation shipped with the extension, so a
new user can try MAISI Generate with one click and no network.

The file is TotalSegmentator's example segmentation (Apache-2.0, from its source distribution),
converted to MAISI labels with ``maisi labels convert --from totalsegmentator ... --ct ...`` (41
classes and the body envelope, 122x101x30 voxels of 3 mm) and saved as a Slicer segmentation whose
segments carry MAISI names, colours and terminology (``Utilities/make_sample_data.py`` makes it).
Sample Data copies it from the extension's folder (a ``file:`` URI) into its cache, checks the
SHA-256 and loads it. No Qt here: ``MAISIGenerate.py`` registers what ``sample_data_sources`` returns.
"""

from __future__ import annotations

from pathlib import Path

CATEGORY = "MAISI"
SAMPLE_NAME = "MAISIDemoSegmentation"
FILE_NAME = "MAISIDemoSegmentation.seg.nrrd"
NODE_NAME = "MAISI demo segmentation"
SHA256 = "9739c792a1eac0b07b4e338c607519e53c61d2eada9c0d6322f8a6fad24ef86a"


def sample_data_folder(module_folder: Path) -> Path:
    """``Resources/SampleData`` of the MAISIGenerate module (installed or in the source tree)."""
    return Path(module_folder) / "Resources" / "SampleData"


def sample_data_sources(module_folder: Path) -> list[dict]:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``, one dict
    per sample."""
    folder = sample_data_folder(module_folder)
    return [{
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [(folder / FILE_NAME).resolve().as_uri()],
        "fileNames": [FILE_NAME],
        "nodeNames": [NODE_NAME],
        "checksums": [f"SHA256:{SHA256}"],
        "loadFileType": ["SegmentationFile"],
        "thumbnailFileName": str((Path(module_folder) / "Resources" / "Icons" / f"{SAMPLE_NAME}.png").resolve()),
    }]
