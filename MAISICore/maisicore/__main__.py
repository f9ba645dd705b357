"""``python -m maisicore`` is the ``maisi`` command (also for ``torchrun -m maisicore``)."""

import sys

from .cli import main

sys.exit(main())
