"""Where maisicore keeps things on disk: ``$MAISI_HOME`` (default ``~/.maisi``) holds ``weights/``
(one folder per downloaded model), ``datasets/`` (the candidate mask database) and the licence
acceptances. The one place that knows this layout; imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MAISI_HOME"
WEIGHTS_SUBDIR = "weights"
DATASETS_SUBDIR = "datasets"


def maisi_home() -> Path:
    """``$MAISI_HOME``, default ``~/.maisi``."""
    return Path(os.environ.get(HOME_ENV, Path.home() / ".maisi"))


def weights_root() -> Path:
    """Folder of downloaded weight sets: ``$MAISI_HOME/weights``."""
    return maisi_home() / WEIGHTS_SUBDIR


def datasets_dir() -> Path:
    """Folder of downloaded datasets: ``$MAISI_HOME/datasets``."""
    return maisi_home() / DATASETS_SUBDIR
