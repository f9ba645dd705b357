"""Reading and writing volumes: NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``), chosen by extension.

Files are read into ``Volume`` (array (x, y, z), affine index → RAS mm). Writes go to a temporary
file beside the target and are renamed into place, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from .geometry import Volume, lps_to_ras, ras_to_lps

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def volume_extension(path: str | os.PathLike) -> str | None:
    """The supported extension ``path`` ends with, or None."""
    name = str(path).lower()
    return next((ext for ext in VOLUME_EXTENSIONS if name.endswith(ext)), None)


def check_output_folder(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any compute, an output path whose folder is missing or not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {path}: folder {folder} is not writable")
    return path


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any compute, an output path with an unknown extension or no writable folder."""
    path = Path(path)
    if volume_extension(path) is None:
        raise InputError(f"{what} {path}: unknown extension; use one of {', '.join(VOLUME_EXTENSIONS)}")
    return check_output_folder(path, what)


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON file ``path``; one-line ``InputError`` (prefixed ``what``, e.g. the option)
    when it is missing or not JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"{what} {path}: not valid JSON ({exc})") from exc


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI or NRRD file as a ``Volume`` (array (x, y, z), affine index → RAS, mm)."""
    path = Path(path)
    ext = volume_extension(path)
    if ext is None:
        raise InputError(f"{path}: unknown extension; use one of {', '.join(VOLUME_EXTENSIONS)}")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        if ext == ".nrrd":
            return _read_nrrd(path)
        return _read_nifti(path)
    except InputError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, in one line
        raise InputError(f"{path}: cannot be read as {ext} ({type(exc).__name__}: {exc})") from exc


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asanyarray(image.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return Volume(array, image.affine)


def _read_nrrd(path: Path) -> Volume:
    import nrrd

    array, header = nrrd.read(str(path))
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {array.shape}")
    directions = np.asarray(header.get("space directions", np.eye(3)), dtype=np.float64)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # rows of 'space directions' are the index axes
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = lps_to_ras(affine)
    elif space not in ("right-anterior-superior", "ras"):
        raise InputError(f"{path}: NRRD space {space!r} is not supported; save it as LPS or RAS")
    return Volume(array, affine)


def write_volume(path: str | os.PathLike, volume: Volume) -> Path:
    """Write ``volume`` to ``path`` (format by extension) through a temporary file and a rename."""
    path = check_output_path(path)
    ext = volume_extension(path)
    writer: Callable[[str, Volume], None] = _write_nrrd if ext == ".nrrd" else _write_nifti
    return atomic_write(path, lambda tmp: writer(tmp, volume), suffix=ext)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_nifti(tmp: str, volume: Volume) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(volume.array, volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp)


def _write_nrrd(tmp: str, volume: Volume) -> None:
    import nrrd

    affine_lps = ras_to_lps(volume.affine)
    header = {
        "space": "left-posterior-superior",
        "space directions": affine_lps[:3, :3].T,
        "space origin": affine_lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    with open(tmp, "wb") as raw:
        nrrd.write(_WithoutWriteTime(raw), np.asarray(volume.array), header, index_order="F")


class _WithoutWriteTime(io.RawIOBase):
    """A binary file that drops pynrrd's "# on DATE(GMT)." header comment, so the same volume
    always gives the same bytes (reproducible outputs, byte-identical across front ends)."""

    def __init__(self, file):
        super().__init__()
        self._file = file

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if data.startswith(b"# on ") and data.endswith(b"(GMT).\n"):
            return len(data)
        return self._file.write(data)
