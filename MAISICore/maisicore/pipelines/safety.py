"""Output safety shared by every command: an output never replaces an input or another output."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return a.resolve() == b.resolve()


def file_keys(path: str | os.PathLike, parent: Path | None = None) -> set:
    """What identifies the file ``path`` names: its resolved path and, when it exists, its (device,
    inode), so two paths name the same file (through links included) exactly when their keys
    intersect, as ``_same_file`` decides for a pair. ``parent``: ``path``'s folder already resolved
    (many files of one folder resolve one folder once). ``FOLDER#UID`` counts as FOLDER."""
    path = Path(path)
    if "#" in str(path) and not path.exists():
        path = Path(str(path).split("#")[0])
    keys: set = {str(parent / path.name) if parent is not None else str(path.resolve())}
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return keys
    keys.add((status.st_dev, status.st_ino))
    return keys


def check_distinct(outputs: dict[str, str], inputs: dict[str, str], folders: set[str] = frozenset()) -> None:
    """Refuse (one line) an output path that names an input or another output; ``outputs`` and
    ``inputs`` map option names to paths (``FOLDER#UID`` inputs count as FOLDER); ``folders``: the
    output options that are folders (DICOM output), which may not hold an input either."""
    seen: list[tuple[str, Path]] = []
    for option, path in outputs.items():
        path = Path(path)
        for other_option, other in inputs.items():
            other = Path(other) if Path(other).exists() else Path(str(other).split("#")[0])
            if _same_file(path, other):
                raise InputError(f"{option} {path} is the input {other_option}; choose another output file")
            if option in folders and path.resolve() in other.resolve().parents:
                raise InputError(f"{option} {path} holds the input {other_option}; choose a new folder")
        for other_option, other in seen:
            if _same_file(path, other):
                raise InputError(f"{option} and {other_option} name the same file {path}; choose different files")
        if path.is_dir() and option not in folders:
            raise InputError(f"{option} {path} is a folder; give a file name")
        seen.append((option, path))


def check_output_paths(request) -> None:
    """``check_distinct`` for a request's outputs and inputs (``output_paths``/``input_paths``)."""
    check_distinct(request.output_paths(), request.input_paths(), request.output_folders())
