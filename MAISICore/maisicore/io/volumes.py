"""Reading and writing volumes: NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``), chosen by extension;
DICOM series and DICOM SEG (a folder, ``FOLDER#SeriesInstanceUID`` or a DICOM file) are read through
``maisicore.io.dicom``.

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
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
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


def check_output(path: str | os.PathLike, output_format: str | None, what: str = "--out") -> Path:
    """Check an output before any compute: a new folder for ``output_format == "dicom"``
    (``maisicore.io.dicom.check_dicom_output``), else a volume file (``check_output_path``)."""
    if output_format == "dicom":
        from .dicom import check_dicom_output

        return check_dicom_output(path, what)
    return check_output_path(path, what)


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


def read_volume(path: str | os.PathLike, modality: str | None = None) -> Volume:
    """Read a NIfTI or NRRD file, a DICOM series or a DICOM SEG as a ``Volume`` (array (x, y, z),
    affine index → RAS, mm).

    A folder, ``FOLDER#SeriesInstanceUID`` or a DICOM file is read as DICOM (``maisicore.io.dicom``);
    ``modality`` (``"CT"``) then refuses a series of another modality. A SEG gives MAISI label ids.
    """
    ext = volume_extension(path)
    if ext is None:
        from .dicom import is_dicom_path, read_dicom, split_series

        if not split_series(path)[0].exists():
            raise InputError(f"{path}: no such file or folder")
        if is_dicom_path(path):
            return read_dicom(path, modality)
        raise InputError(f"{path}: unknown extension; use one of {', '.join(VOLUME_EXTENSIONS)}, or a DICOM "
                         "series (its folder or one of its files) or a DICOM SEG")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        volume = _read_nrrd(path) if ext == ".nrrd" else _read_nifti(path)
    except InputError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, in one line
        raise InputError(f"{path}: cannot be read as {ext} ({type(exc).__name__}: {exc})") from exc
    check_volume(volume, str(path))
    return volume


def check_volume(volume: Volume, name: str) -> None:
    """Refuse (one line) a volume whose affine is not finite or not invertible, or whose voxels are
    not all finite numbers."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{name}: its affine (voxel → mm) holds NaN or infinite values; fix the file's geometry")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{name}: its affine (voxel → mm) is singular (a zero or repeated axis); fix the file's "
                         "spacing/direction")
    array = np.asarray(volume.array)
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"{name}: {bad} voxel(s) are NaN or infinite; replace them with finite values "
                             "(e.g. -1000 HU for air) first")


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


TEMP_MARK = ".maisi-"  # temporary files: .NAME.maisi-PID.RANDOM.tmpEXT beside the target
_written_this_run: list[Path] = []


def written_files() -> list[Path]:
    """Files this process has renamed into place so far (for messages after an interruption)."""
    return list(_written_this_run)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete this program's temporary files in ``folder`` whose writing process is gone (left by a
    SIGKILL or a power cut); returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or TEMP_MARK not in name or ".tmp" not in name:
            continue
        pid_text = name.split(TEMP_MARK, 1)[1].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    The temporary file's name carries this process's id, so stale ones (their writer killed) are
    recognised and removed the next time something is written into the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        _written_this_run.append(path)
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
