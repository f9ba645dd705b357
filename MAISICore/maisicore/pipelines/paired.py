"""Paired generation without a user mask: the mask for ``GenerateRequest.anatomy``, picked from the
candidate mask database (``maisicore.anatomy.maskdb``) and brought onto the requested grid."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import InputError
from ..io.geometry import Volume
from ..models.presets import ModelPreset
from .requests import GenerateRequest

MAX_CANDIDATES_TRIED = 10


def paired_mask(
    request: GenerateRequest, preset: ModelPreset, size, spacing, log: Callable[[str], None] | None = None
) -> Volume:
    """A label volume holding every anatomy of ``request.anatomy`` on ``size`` voxels at ``spacing``
    mm, from ``request.mask_db`` (default: the index ``maisi weights download MODEL
    --include-datasets`` wrote for this model). Seeded by ``request.seed``."""
    from ..anatomy.labels import label_table
    from ..anatomy.maskdb import default_mask_database, load_database, prepare_mask, select_candidates

    mask_db, mask_dir = request.mask_db, request.mask_dir
    if not mask_db:
        mask_db, default_dir = default_mask_database(preset.name)
        mask_dir = mask_dir or default_dir
        if not mask_db.is_file():
            raise InputError(
                f"--anatomy needs a candidate mask database: give --mask-db JSON (none at {mask_db}; "
                f"`maisi weights download {preset.name} --include-datasets` puts one there)"
            )
    table = label_table()
    anatomy_ids = []
    for name in (str(n).strip() for n in request.anatomy if str(n).strip()):
        info = table.by_segment_name(name)
        if info is None:
            raise InputError(f"--anatomy {name!r}: not a MAISI anatomy name (see `maisi labels list`)")
        anatomy_ids.append(info.id)
    rng = np.random.default_rng(request.seed)
    database = load_database(mask_db, mask_dir)
    check_not_candidates(request, database)
    candidates = select_candidates(database, anatomy_ids, request.body_region, size, spacing)
    if candidates[0][1]:  # several on the exact grid: pick among them at random (seeded)
        order = rng.permutation(len(candidates))
        candidates = [candidates[i] for i in order]
    for candidate, on_grid in candidates[:MAX_CANDIDATES_TRIED]:
        mask = prepare_mask(candidate, on_grid, size, spacing, anatomy_ids, rng)
        if mask is not None:
            if log:
                log(f"mask from database: {candidate.path.name}{'' if on_grid else ' (resampled)'}")
            return mask
    raise InputError("no candidate mask keeps the requested anatomy after resampling; change --size or --spacing")


def check_not_candidates(request: GenerateRequest, database) -> None:
    """Refuse (one line) an output that names a candidate mask of the database (resolved, links
    included): a candidate is an input even when another one is picked."""
    from .safety import file_keys

    outputs = {key: (option, path) for option, path in request.output_paths().items() for key in file_keys(path)}
    if not outputs:
        return
    folders: dict = {}  # one resolve per folder: databases list thousands of files
    for candidate in database:
        if candidate.path.parent not in folders:
            folders[candidate.path.parent] = candidate.path.parent.resolve()
        parent = folders[candidate.path.parent]
        clash = next((outputs[key] for key in file_keys(candidate.path, parent) if key in outputs), None)
        if clash is not None:
            raise InputError(f"{clash[0]} {clash[1]} is the candidate mask {candidate.path.name} of --mask-db; "
                             "choose another output file")
