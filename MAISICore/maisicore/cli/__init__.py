"""The ``maisi`` command line: ``main`` and ``build_parser``.

One module per command group, each defining its commands' options next to their handlers:

- ``generate``: ``maisi generate``, ``inpaint``, ``run`` (one request each) and ``serve`` (a warm worker)
- ``weights``: ``maisi weights init|list|download|verify|path|remove``
- ``labels``: ``maisi labels list|convert``
- ``vae``: ``maisi vae encode|decode``
- ``qc``: ``maisi qc``
- ``batch``: ``maisi batch``
- ``training``: ``maisi prepare [latents]`` and ``maisi train``
- ``evaluate``: ``maisi evaluate [compare]``
- ``common``: what several commands share: the parser class, the option groups (device, memory budget,
  output format, seed, precision), the value checks, and the exit codes and signal handling of ``main``.

Exit codes: 0 success; 2 bad input (one line on stderr, nothing written); 1 unexpected failure
(set ``MAISI_DEBUG=1`` for the traceback); 130 interrupted; 141 stdout closed.
"""

from __future__ import annotations

import argparse

from .. import __version__
from . import batch, evaluate, generate, labels, qc, training, vae, weights
from .common import _interrupted_message, _Parser, run_with_exit_codes

__all__ = ["COMMANDS", "build_parser", "main", "_interrupted_message"]

# Each adds one top-level command to the parser's sub-commands, in the order `maisi --help` lists them.
# A new command: an ``add_NAME(commands)`` in its group's module (or a new module), listed here.
COMMANDS = (
    generate.add_generate,
    weights.add_weights,
    labels.add_labels,
    vae.add_vae,
    generate.add_inpaint,
    qc.add_qc,
    generate.add_run,
    generate.add_serve,
    batch.add_batch,
    training.add_prepare,
    training.add_train,
    evaluate.add_evaluate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maisi",
        description=("MAISI synthetic CT and MR generation: NVIDIA's MAISI models (rflow-ct, ddpm-ct: CT image "
                     "from a mask, paired CT + mask, CT image only; rflow-mr, rflow-mr-brain: MR image only) "
                     "on CPU or GPU."),
    )
    parser.add_argument("--version", action="version", version=f"maisi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``maisi`` command; returns the exit code (0, 1, 2, 130; 141 when stdout was closed)."""
    return run_with_exit_codes(build_parser(), argv)
