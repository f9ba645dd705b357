"""DICOM in and out: CT series and DICOM SEG label maps, read and written with pydicom and highdicom.

What lives here:
- ``read_dicom``: a folder (or one file) of a single-frame DICOM series as a ``Volume``: array
  (x, y, z) = (column, row, slice), int16 HU when the rescaled values are whole numbers, affine
  index → RAS mm computed from Image Orientation/Position (Patient) (PS3.3 C.7.6.2.1.1), so a tilted
  gantry gives a sheared affine rather than misplaced slices. Each slice's own Rescale Slope/Intercept
  (or Modality LUT) is applied by pydicom. ``FOLDER#SeriesInstanceUID`` picks one of several series.
  One-line ``InputError`` for several series, missing or irregular slices, and a wrong modality.
- ``read_seg``: a DICOM SEG (highdicom) as a MAISI label volume, each segment matched to a MAISI
  label by its name, else by its coded terminology (the label table's rules, as for Slicer segments).
- ``write_dicom``: a CT as a new DICOM series and its labels as a DICOM SEG that references it,
  marked synthetic (see ``Provenance`` and docs/dicom.md for the attributes used).

What is NOT here: NIfTI/NRRD (``maisicore.io.volumes``), label ids and names (``anatomy.labels``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import InputError
from .geometry import Volume, lps_to_ras, ras_to_lps

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
CT_FOLDER = "ct"  # --format dicom: DIR/ct/ holds the CT series
SEG_FILE = "labels.dcm"  # ... and DIR/labels.dcm the DICOM SEG of the labels
SERIES_SEPARATOR = "#"  # FOLDER#SeriesInstanceUID
SYNTHETIC_PATIENT_NAME = "SYNTHETIC^MAISI"
SYNTHETIC_ISSUER = "SlicerMAISI synthetic data, not a patient"
_ORIENTATION_TOL = 1e-4  # direction cosines
_SPACING_RTOL = 0.01  # slice steps may differ by 1 % (+ 0.01 mm) before a series counts as irregular


# ---- paths ----------------------------------------------------------------------------------------


def split_series(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``FOLDER#UID`` → (FOLDER, UID); a path that exists as written is never split."""
    text = os.fspath(path)
    if SERIES_SEPARATOR in text and not Path(text).exists():
        base, _, uid = text.rpartition(SERIES_SEPARATOR)
        return Path(base), uid.strip() or None
    return Path(text), None


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` (``FOLDER#UID`` allowed) names a folder or a DICOM file, i.e. is read as DICOM."""
    base, _ = split_series(path)
    return base.is_dir() or (base.is_file() and is_dicom_file(base))


def require_dicom_libraries() -> None:
    """Refuse (one line) when pydicom ≥ 3 or highdicom is missing: they are the optional extra
    ``maisicore[dicom]``, left out of what the Slicer extension installs (Slicer ships its own
    pydicom, and its DICOM module imports and exports series)."""
    try:
        import highdicom  # noqa: F401
        import pydicom
    except ImportError:
        raise InputError("reading or writing DICOM needs pydicom and highdicom: pip install 'maisicore[dicom]' "
                         "(in Slicer, load DICOM with the DICOM module)") from None
    if int(pydicom.__version__.split(".")[0]) < 3:
        raise InputError(f"reading or writing DICOM needs pydicom 3 or newer (found {pydicom.__version__}): "
                         "pip install 'maisicore[dicom]' in an environment of its own")


# ---- reading --------------------------------------------------------------------------------------


@dataclass
class SeriesFiles:
    """One series found in a folder: its UID (may be empty in anonymised data), modality, files."""

    uid: str
    modality: str
    description: str
    files: list[Path]
    is_seg: bool

    def label(self) -> str:
        uid = self.uid or "(no SeriesInstanceUID)"
        what = f"{self.modality or '?'}, {len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        return f"{uid} ({what}{', ' + repr(self.description) if self.description else ''})"


def _header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _is_seg(ds) -> bool:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return sop_class == SEG_SOP_CLASS or ds.get("Modality", "") == "SEG"


def find_series(folder: Path) -> list[SeriesFiles]:
    """Every DICOM series directly in ``folder`` (non-DICOM files are ignored), sorted by UID."""
    require_dicom_libraries()
    found: dict[str, SeriesFiles] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not is_dicom_file(path):
            continue
        try:
            ds = _header(path)
        except Exception:  # a broken file: left out (a gap it leaves is reported as missing slices)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        entry = found.setdefault(uid, SeriesFiles(uid, str(ds.get("Modality", "") or ""),
                                                  str(ds.get("SeriesDescription", "") or ""), [], _is_seg(ds)))
        entry.files.append(path)
    return [found[uid] for uid in sorted(found)]


def _select(path: str | os.PathLike) -> SeriesFiles:
    """The one series ``path`` names: a folder holding one series, ``FOLDER#UID``, or a file (its
    series in its folder, or the file alone for a SEG)."""
    base, uid = split_series(path)
    if base.is_file():
        if not is_dicom_file(base):
            raise InputError(f"{base}: not a DICOM file (no DICM marker)")
        ds = _header(base)
        if _is_seg(ds) or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return SeriesFiles(str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("Modality", "") or ""),
                               str(ds.get("SeriesDescription", "") or ""), [base], _is_seg(ds))
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        folder = base.parent
    elif base.is_dir():
        folder = base
    else:
        raise InputError(f"{base}: no such file or folder")
    series = find_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM files (and no .nii, .nii.gz or .nrrd file given)")
    if uid is not None:
        chosen = [s for s in series if s.uid == uid]
        if not chosen:
            raise InputError(f"{folder}: no series {uid}; it holds {'; '.join(s.label() for s in series)}")
        return chosen[0]
    if len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} DICOM series: {'; '.join(s.label() for s in series)}; "
            f"name one as {folder}{SERIES_SEPARATOR}SeriesInstanceUID"
        )
    return series[0]


def _check_modality(series: SeriesFiles, where: str, modality: str | None) -> None:
    if modality and series.modality and series.modality != modality:
        kind = "a DICOM SEG" if series.is_seg else f"a series of modality {series.modality}"
        raise InputError(f"{where}: {kind}; the MAISI models are {modality} models: give a {modality} series")


def read_dicom(path: str | os.PathLike, modality: str | None = None) -> Volume:
    """Read a DICOM series (folder, ``FOLDER#UID`` or one file of it) or a DICOM SEG as a ``Volume``.

    Args:
        modality: when given (``"CT"``), a series of another modality is refused in one line.

    Returns:
        array (x, y, z) = (column, row, slice), slices in increasing order along the slice normal;
        HU as int16 when every rescaled value is a whole number in range, else float32; affine
        index → RAS, mm. A SEG gives MAISI label ids (int16) on the SEG's own grid.
    """
    require_dicom_libraries()
    series = _select(path)
    where = os.fspath(path)
    _check_modality(series, where, modality)
    if series.is_seg:
        return read_seg(series.files[0])
    if len(series.files) == 1 and int(_header(series.files[0]).get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{where}: an enhanced multi-frame image; only single-frame series (one file per slice) are read")
    return _read_slices(series.files, where)


def _read_slices(files: list[Path], where: str) -> Volume:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    headers = [pydicom.dcmread(f) for f in files]  # pixel data is decoded only below, slice by slice
    for attribute in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        lacking = [f.name for f, h in zip(files, headers) if h.get(attribute) in (None, "")]
        if lacking:
            raise InputError(f"{where}: {len(lacking)} file(s) without {attribute} (first: {lacking[0]}); "
                             "not an image series with a patient geometry")
    order, affine_lps = series_geometry(headers, where)
    array = np.empty((int(headers[0].Columns), int(headers[0].Rows), len(order)), dtype=np.float32)
    for k, index in enumerate(order):
        ds = headers[index]
        try:
            values = apply_modality_lut(ds.pixel_array, ds)
        except Exception as exc:  # a compressed syntax without its decoder, or broken pixel data
            syntax = ds.file_meta.get("TransferSyntaxUID", "?")
            raise InputError(f"{files[index]}: pixel data cannot be decoded ({syntax}: {exc})") from exc
        array[:, :, k] = np.asarray(values, dtype=np.float32).T  # (rows, columns) → (x = column, y = row)
        del ds.PixelData  # decoded: let the encoded bytes go
    if np.all(np.isfinite(array)) and np.all(array == np.rint(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return Volume(array, lps_to_ras(affine_lps))


def series_geometry(headers: list, where: str) -> tuple[list[int], np.ndarray]:
    """Slice order (increasing along the slice normal) and the index → LPS affine of a series.

    Column 0 is the row direction × column spacing, column 1 the column direction × row spacing
    (PS3.3 C.7.6.2.1.1), column 2 the step between consecutive Image Positions (exact, also for a
    tilted gantry), column 3 the first slice's position. Refuses mixed orientations or pixel sizes,
    two slices at one position, missing slices and irregular spacing (one line each).
    """
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        raise InputError(f"{where}: the slices have different orientations (Image Orientation (Patient)); "
                         "they are not one volume")
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    pixel_spacings = {tuple(round(float(v), 6) for v in h.PixelSpacing) for h in headers}
    if len(shapes) > 1 or len(pixel_spacings) > 1:
        raise InputError(f"{where}: the slices have different sizes or pixel spacings; they are not one volume")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 3] = positions[order[0]]
    if len(order) == 1:
        thickness = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
        affine[:3, 2] = normal * thickness
        return order, affine
    sorted_along = along[order]
    gaps = np.diff(sorted_along)
    if gaps.min() < 1e-3:
        i = int(np.argmin(gaps))
        raise InputError(f"{where}: two slices at the same position ({sorted_along[i]:.3f} mm along the normal); "
                         "the folder holds several acquisitions: keep one")
    typical = float(np.median(gaps))
    if gaps.max() > 1.5 * typical:
        i = int(np.argmax(gaps))
        missing = int(round(gaps[i] / typical)) - 1
        raise InputError(
            f"{where}: missing slices: a gap of {gaps[i]:.3g} mm after slice {i + 1} of {len(order)} where the "
            f"others are {typical:.3g} mm apart (about {missing} slice(s) absent); give the complete series"
        )
    if np.abs(gaps - typical).max() > _SPACING_RTOL * typical + 0.01:
        raise InputError(f"{where}: irregular slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm); "
                         "resample it to a regular grid first")
    affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    return order, affine


def series_headers(path: str | os.PathLike) -> list:
    """The headers (no pixel data) of the series ``path`` names, in the ``read_dicom`` slice order."""
    series = _select(path)
    headers = [_header(f) for f in series.files]
    if series.is_seg:
        return headers
    order, _ = series_geometry(headers, os.fspath(path))
    return [headers[i] for i in order]


def dicom_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """Array shape (x, y, z) ``read_dicom`` gives for ``path``, from the headers only."""
    series = _select(path)
    if series.is_seg:
        return read_seg(series.files[0]).shape
    first = _header(series.files[0])
    return int(first.Columns), int(first.Rows), len(series.files)


# ---- DICOM SEG in ----------------------------------------------------------------------------------


def _terminology_entry(description) -> str:
    """A Slicer-style terminology string of a segment's codes, for ``LabelTable.by_terminology``."""

    def code(sequence) -> str:
        if not sequence:
            return "^^"
        item = sequence[0]
        return f"{item.CodingSchemeDesignator}^{item.CodeValue}^{item.CodeMeaning}"

    types = description.get("SegmentedPropertyTypeCodeSequence") or []
    modifier = types[0].get("SegmentedPropertyTypeModifierCodeSequence") if types else None
    regions = description.get("AnatomicRegionSequence") or []
    region_modifier = regions[0].get("AnatomicRegionModifierSequence") if regions else None
    return "~".join(("", code(description.get("SegmentedPropertyCategoryCodeSequence")), code(types),
                     code(modifier), "", code(regions), code(region_modifier)))


def segment_labels(seg) -> tuple[dict[int, int], list[str]]:
    """Segment number → MAISI id (by segment name, else by terminology codes), and the segments
    that match no MAISI label (``"NUMBER 'NAME'"``)."""
    from ..anatomy.labels import label_table

    table = label_table()
    mapping, unmapped = {}, []
    for description in seg.SegmentSequence:
        name = str(description.get("SegmentLabel", "") or "")
        info = table.resolve(name) if name else None
        if info is None:
            info = table.by_terminology(_terminology_entry(description))
        if info is None:
            unmapped.append(f"{int(description.SegmentNumber)} {name!r}")
        else:
            mapping[int(description.SegmentNumber)] = info.id
    return mapping, unmapped


def read_seg(path: str | os.PathLike) -> Volume:
    """A DICOM SEG as a MAISI label volume (int16 ids, (x, y, z) = (column, row, frame), affine
    index → RAS mm) on the grid its frames span. Segments are matched to MAISI labels by name, else
    by terminology; a segment that matches none is refused in one line (rename it, or convert the
    segmentation with ``maisi labels convert``). Where segments overlap the later one wins."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        mapping, unmapped = segment_labels(seg)
        if unmapped:
            raise InputError(f"{path}: segment(s) {', '.join(unmapped)} match no MAISI label; rename them to MAISI "
                             "names (`maisi labels list`) or remove them")
        numbers = sorted(mapping)
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=True, skip_overlap_checks=True,
                                dtype=np.int32)
    except InputError:
        raise
    except Exception as exc:  # not a SEG highdicom can read as a volume
        raise InputError(f"{path}: cannot be read as a DICOM SEG volume ({type(exc).__name__}: {exc})") from exc
    lut = np.zeros(max(numbers, default=0) + 1, dtype=np.int16)
    for number, label_id in mapping.items():
        lut[number] = label_id
    array = lut[np.asarray(volume.array)]  # (frame, row, column) in highdicom's order
    affine_lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    labels = _increasing_slices(Volume(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), lps_to_ras(affine_lps)))
    return _onto_referenced_series(labels, seg, Path(path).parent)


def _onto_referenced_series(labels: Volume, seg, folder: Path) -> Volume:
    """A SEG leaves out frames without segments, so its frames may span fewer slices than the series
    it references. When that series lies in the SEG's folder or a subfolder of it (as ``write_dicom``
    puts them), the labels are placed on its whole grid (zeros elsewhere); else they keep their own."""
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        for series in find_series(candidate):
            if series.uid not in referenced or series.is_seg:
                continue
            headers = [_header(f) for f in series.files]
            _, affine_lps = series_geometry(headers, str(candidate))
            grid = Volume(np.zeros((int(headers[0].Columns), int(headers[0].Rows), len(headers)), np.int16),
                          lps_to_ras(affine_lps))
            start = np.rint(np.linalg.solve(grid.affine, labels.affine[:, 3])[:3]).astype(int)
            end = start + np.asarray(labels.shape)
            if np.any(start < 0) or np.any(end > np.asarray(grid.shape)):
                return labels
            placed = grid.array
            placed[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = labels.array
            shifted = labels.affine.copy()
            shifted[:3, 3] = (grid.affine @ np.append(start, 1.0))[:3]
            if not np.allclose(shifted, labels.affine, atol=1e-3):
                return labels  # not the same lattice
            return grid
    return labels


def _increasing_slices(volume: Volume) -> Volume:
    """Flip the slice axis when it runs against the row × column normal, as ``read_dicom`` orders."""
    a = ras_to_lps(volume.affine)
    if np.dot(np.cross(a[:3, 0], a[:3, 1]), a[:3, 2]) >= 0:
        return volume
    flipped = a.copy()
    flipped[:3, 3] = a[:3, 3] + a[:3, 2] * (volume.shape[2] - 1)
    flipped[:3, 2] = -a[:3, 2]
    return Volume(np.ascontiguousarray(volume.array[:, :, ::-1]), lps_to_ras(flipped))


# ---- writing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What made a synthetic image, recorded in every file: model (preset key), seed, denoising
    steps, and what was done (``generate`` or ``inpaint``)."""

    model: str
    seed: int
    steps: int
    action: str = "generate"

    def description(self) -> str:
        from .. import __version__

        what = "tumour inpainted into a CT" if self.action == "inpaint" else "CT generated"
        return (f"SYNTHETIC: {what} by NVIDIA MAISI {self.model}, seed {self.seed}, {self.steps} steps, "
                f"maisicore {__version__}; not an acquisition of a patient")


def check_dicom_output(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any compute, a DICOM output folder that exists with files in it, or whose
    parent folder is missing or not writable."""
    require_dicom_libraries()
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{what} {path}: exists and is not an empty folder; --format dicom writes a new folder")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {path}: folder {parent} is not writable")
    return path


_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription")


def _identity(source: list | None, now: datetime) -> dict:
    """Patient, study and frame of reference: the source's (``--keep-patient``), else a new synthetic
    patient whose ID (a random UUID under its own issuer) cannot collide with a real one."""
    from pydicom.uid import generate_uid

    if source:
        first = source[0]
        identity = {key: first.get(key, "") for key in _PATIENT_STUDY}
        identity["StudyInstanceUID"] = identity["StudyInstanceUID"] or generate_uid()
        identity["FrameOfReferenceUID"] = str(first.get("FrameOfReferenceUID", "") or "") or generate_uid()
        return identity
    return {
        "PatientName": SYNTHETIC_PATIENT_NAME, "PatientID": f"SYNTHETIC-{uuid.uuid4().hex}",
        "IssuerOfPatientID": SYNTHETIC_ISSUER, "PatientBirthDate": "", "PatientSex": "", "PatientAge": "",
        "StudyInstanceUID": generate_uid(), "StudyDate": now.strftime("%Y%m%d"), "StudyTime": now.strftime("%H%M%S"),
        "StudyID": "MAISI", "AccessionNumber": "", "ReferringPhysicianName": "",
        "StudyDescription": "SYNTHETIC MAISI", "FrameOfReferenceUID": generate_uid(),
    }


def _synthesizing_equipment(provenance: Provenance, now: datetime):
    """Contributing Equipment item for the generator, purpose (109100, DCM, "Synthesizing Equipment")."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    return hd.ContributingEquipment(
        manufacturer="SlicerMAISI", purpose_of_reference=codes.DCM.SynthesizingEquipment,
        manufacturer_model_name=f"NVIDIA MAISI {provenance.model}"[:64], software_versions=f"maisicore {__version__}",
        contribution_datetime=now, contribution_description=provenance.description()[:1024],
    )


def _ct_datasets(ct: Volume, provenance: Provenance, identity: dict, source: list | None, now: datetime) -> list:
    """One CT Image Storage dataset per slice (uncompressed, int16 HU, rescale 1/0)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from .. import __version__

    affine = ras_to_lps(ct.affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir, col_dir = affine[:3, 0] / spacing[0], affine[:3, 1] / spacing[1]
    if abs(float(np.dot(row_dir, col_dir))) > 1e-4:
        raise InputError("the CT's first two index axes are not perpendicular; DICOM slices need a rectangular pixel grid")
    array = np.asarray(ct.array)
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array)
    array = np.clip(array, -32768, 32767).astype(np.int16)
    series_uid = generate_uid()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    equipment = _synthesizing_equipment(provenance, now)
    description = provenance.description()
    series_text = f"SYNTHETIC MAISI {provenance.model} seed {provenance.seed}"
    if provenance.action == "inpaint":
        series_text = f"SYNTHETIC TUMOUR MAISI {provenance.model} seed {provenance.seed}"
    datasets = []
    for k in range(ct.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_SOP_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.SyntheticData = "YES"  # PS3.3 C.12.1 SOP Common Module
        ds.ContributingEquipmentSequence = Sequence([equipment])
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.DerivationDescription = description
        ds.ImageComments = description
        ds.BurnedInAnnotation = "NO"
        for key, value in identity.items():
            setattr(ds, key, value)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 9001 if source else 1
        ds.SeriesDescription = series_text[:64]
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "SlicerMAISI"
        ds.ManufacturerModelName = f"NVIDIA MAISI {provenance.model}"[:64]
        ds.SoftwareVersions = f"maisicore {__version__}"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        position = affine[:3, 3] + affine[:3, 2] * k
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along a column), column spacing
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(ct.shape[1]), int(ct.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T).tobytes()  # (x, y) → (rows, columns)
        if source:
            reference = Dataset()
            reference.ReferencedSOPClassUID = _uid_of(source[k], "SOPClassUID", "MediaStorageSOPClassUID")
            reference.ReferencedSOPInstanceUID = _uid_of(source[k], "SOPInstanceUID", "MediaStorageSOPInstanceUID")
            purpose = Dataset()
            purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
            purpose.CodeMeaning = "Source image for image processing operation"
            reference.PurposeOfReferenceCodeSequence = Sequence([purpose])
            ds.SourceImageSequence = Sequence([reference])
        datasets.append(ds)
    return datasets


def _uid_of(ds, key: str, meta_key: str) -> str:
    return str(ds.get(key, "") or ds.file_meta.get(meta_key, "") or "")


def _ds(value: float) -> str:
    """A DS (decimal string, at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _seg_dataset(labels: Volume, ct_datasets: list, provenance: Provenance, now: datetime):
    """A binary DICOM SEG of the MAISI labels present (one segment per label), referencing the CT."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..anatomy.labels import label_table

    table = label_table()
    present = [int(v) for v in np.unique(labels.array) if int(v) != 0]
    algorithm = hd.AlgorithmIdentificationSequence(name="NVIDIA MAISI", family=codes.cid7162.ArtificialIntelligence,
                                                   version=f"{provenance.model}, maisicore {__version__}")
    descriptions, lut = [], np.zeros(int(np.max(labels.array, initial=0)) + 1, dtype=np.uint16)
    for number, label_id in enumerate(present, start=1):
        info = table.by_id(label_id)
        lut[label_id] = number
        category = _coded(info.category) or hd.sr.CodedConcept("85756007", "SCT", "Tissue")
        kind = _coded(info.type) or hd.sr.CodedConcept("85756007", "SCT", "Tissue")
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=info.name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_coded(info.anatomic_region)] if info.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*info.color) if hasattr(hd.color.CIELabColor, "from_rgb") else None,
        )
        if info.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(info.type_modifier)]
        descriptions.append(description)
    label_map = lut[np.clip(np.asarray(labels.array).astype(np.int64), 0, None)]
    frames = np.ascontiguousarray(np.transpose(label_map, (2, 1, 0)))  # (slice, row, column) as the CT files
    from pydicom.uid import generate_uid

    seg = hd.seg.Segmentation(
        source_images=ct_datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=ct_datasets[0].SeriesNumber + 1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="SlicerMAISI",
        manufacturer_model_name=f"NVIDIA MAISI {provenance.model}"[:64], software_versions=f"maisicore {__version__}",
        device_serial_number="none", series_description=f"SYNTHETIC MAISI labels seed {provenance.seed}"[:64],
        content_label="MAISI_LABELS", content_description="labels the synthetic CT follows"[:64],
        contributing_equipment=[_synthesizing_equipment(provenance, now)],
    )
    seg.SyntheticData = "YES"  # derived from synthetic data (PS3.3 C.12.1)
    return seg


def _coded(code):
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning) if code is not None else None


def write_dicom(
    folder: str | os.PathLike,
    ct: Volume,
    labels: Volume | None,
    provenance: Provenance,
    source: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write ``ct`` as a DICOM CT series in ``folder/ct/`` and ``labels`` (MAISI ids on the CT's
    grid) as a DICOM SEG ``folder/labels.dcm`` referencing it; returns role → path (``ct``, ``seg``).

    Everything is new (UIDs, a synthetic patient and study) unless ``source`` names the DICOM
    series the CT was derived from (inpainting with ``--keep-patient``): then its patient, study and
    frame of reference are copied and each slice references its source slice. The folder is built
    beside its final place and renamed into it, so it is complete or absent.
    """
    require_dicom_libraries()
    from pydicom.filewriter import dcmwrite

    folder = check_dicom_output(folder)
    now = datetime.now().astimezone()
    source_headers = series_headers(source) if source is not None else None
    if source_headers is not None and len(source_headers) != ct.shape[2]:
        raise InputError(f"{source}: {len(source_headers)} slices, the CT has {ct.shape[2]}; it is not the source")
    identity = _identity(source_headers, now)
    datasets = _ct_datasets(ct, provenance, identity, source_headers, now)
    seg = None
    if labels is not None and np.any(labels.array):
        if not labels.same_grid(ct):
            raise InputError("the labels are not on the CT's grid; they cannot be written as its DICOM SEG")
        seg = _seg_dataset(labels, datasets, provenance, now)
    parent = folder.absolute().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    try:
        (staging / CT_FOLDER).mkdir()
        for k, ds in enumerate(datasets):
            dcmwrite(staging / CT_FOLDER / f"CT{k + 1:05d}.dcm", ds, enforce_file_format=True)
        if seg is not None:
            seg.save_as(staging / SEG_FILE)
        umask = os.umask(0)
        os.umask(umask)
        for path in [staging, staging / CT_FOLDER]:
            os.chmod(path, 0o777 & ~umask)
        for path in staging.rglob("*.dcm"):
            os.chmod(path, 0o666 & ~umask)
        os.replace(staging, folder)  # an empty folder at the target is replaced too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = {"ct": folder / CT_FOLDER}
    if seg is not None:
        written["seg"] = folder / SEG_FILE
    return written
