"""Fetch the real CT test data: TotalSegmentator 2.18.0's source distribution from PyPI (Apache-2.0).

Only ``tests/reference_files/example_*`` is extracted, into a cache git ignores:
``$MAISI_TEST_DATA`` or ``<repo>/.cache/test-data``. Run ``python Testing/fetch_test_data.py``; it
prints the folder holding ``example_ct.nii.gz`` etc. Exit codes: 0 ok, 3 registry unreachable,
1 anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "totalsegmentator==2.18.0"
SDIST = "totalsegmentator-2.18.0.tar.gz"
MEMBER_PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
EXPECTED = ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_fast")
_NETWORK_SIGNS = (
    "NewConnectionError",
    "ConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version",
    "ReadTimeout",
)


class RegistryUnreachable(RuntimeError):
    """PyPI could not be reached; tests that need the data skip with this reason."""


def cache_dir() -> Path:
    override = os.environ.get("MAISI_TEST_DATA")
    return Path(override) if override else Path(__file__).resolve().parent.parent / ".cache" / "test-data"


def reference_files() -> Path:
    """Folder with the TotalSegmentator reference files, downloading them on first use."""
    root = cache_dir()
    target = root / "reference_files"
    if all((target / name).exists() for name in EXPECTED):
        return target
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST
    if not sdist.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(root)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.is_file():
            log = result.stdout + result.stderr
            if any(sign in log for sign in _NETWORK_SIGNS):
                raise RegistryUnreachable(f"cannot download {PACKAGE} from the package registry")
            raise RuntimeError(f"pip download {PACKAGE} failed:\n{log[-2000:]}")
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(MEMBER_PREFIX + "example_")]
        tar.extractall(tmp, members=members, filter="data")
        extracted = Path(tmp) / MEMBER_PREFIX
        if target.exists():
            import shutil

            shutil.rmtree(target)
        extracted.rename(target)
    return target


def main() -> int:
    try:
        print(reference_files())
    except RegistryUnreachable as exc:
        print(f"fetch_test_data: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
