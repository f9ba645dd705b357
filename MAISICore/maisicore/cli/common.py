"""What every ``maisi`` command shares: the parser class, the option groups several commands take
(device, memory budget, output and format, seed, precision), the checks of their values, and the
exit-code and signal handling of ``main``.

Exit codes: 0 success; 2 bad input (one line on stderr, nothing written); 1 unexpected failure
(set ``MAISI_DEBUG=1`` for the traceback); 130 interrupted; 141 stdout closed.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import Cancelled, InputError

MAX_PATCH_SIDE = 768  # voxels: the largest side of a published output grid
DECODES = ("exact", "sliding-window", "plain")
VOLUME_FORMATS = ("nifti", "nrrd", "dicom")
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default auto)"
DEVICES_HELP = ("spread the exact decode's slabs over these devices, comma-separated (cpu, cuda, cuda:N; one "
                "worker per name, a name may repeat: cuda:0,cuda:1 or cpu,cpu), one autoencoder copy each; the "
                "result equals the one-device decode. The whole-volume decode, when it fits, runs on the first. "
                "The networks still run on --device (default: --device only)")
MEMORY_BUDGET_HELP = ("the most memory the process may hold while {doing} (CPU: resident, CUDA: device "
                      "memory; default: what it holds plus free memory minus 0.5 GiB)")
SEED_HELP = "random seed; same seed, same output (default 0)"
VOLUME_OUT_HELP = "output CT (.nii, .nii.gz or .nrrd), or with --format dicom a new folder"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def subcommands(parser: argparse.ArgumentParser, dest: str):
    """The ``ACTION`` sub-commands of a command group (``maisi weights ACTION``)."""
    return parser.add_subparsers(dest=dest, metavar="ACTION", parser_class=_Parser)


# ---- option groups: one definition each ----------------------------------------------------------


def add_device(parser, help: str = DEVICE_HELP) -> None:
    parser.add_argument("--device", default="auto", help=help)


def add_devices(parser) -> None:
    """``--devices``: the exact decode spread over several devices (``maisicore.devices``)."""
    parser.add_argument("--devices", metavar="DEV[,DEV...]", help=DEVICES_HELP)


def add_decode(parser, help: str | None = None) -> None:
    parser.add_argument("--decode", default="exact", choices=DECODES, help=help)


def add_memory_budget(parser, doing: str = "decoding", help: str | None = None) -> None:
    """``--memory-budget GB`` (for the VAE's split encode or decode); read it with ``_budget_bytes``."""
    parser.add_argument("--memory-budget", type=float, metavar="GB", help=help or MEMORY_BUDGET_HELP.format(doing=doing))


def add_seed(parser, default: int | None = 0, help: str = SEED_HELP) -> None:
    """``--seed``; check it with ``_check_seed``."""
    parser.add_argument("--seed", type=int, default=default, help=help)


def add_volume_format(parser, help: str) -> None:
    """``--format``: how a volume ``--out`` is written (default: by its extension)."""
    parser.add_argument("--format", choices=VOLUME_FORMATS, help=help)


def add_precision(parser, reference_numerics: bool = True, help: str | None = None) -> None:
    """``--precision`` (and, with ``reference_numerics``, ``--reference-numerics``; ``maisicore.precision``):
    the floating-point format the networks compute in. Called by generate and inpaint (both options),
    vae encode/decode and batch (``--precision`` only)."""
    from ..precision import PRECISIONS

    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=help or "auto (float16 autocast on CUDA, bfloat16 on a CPU that runs it natively "
                                     "(AVX-512 BF16, AMX), else float32), fp32, bf16 or fp16 (CUDA only) (default auto)")
    if reference_numerics:
        parser.add_argument("--reference-numerics", action="store_true",
                            help="the reference's numerics (float16 autocast on CUDA, float32 on the CPU, MONAI's own "
                                 "attention): latents equal NVIDIA's code bit for bit on the CPU; slower, more memory")


# ---- value checks and messages -------------------------------------------------------------------


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):  # stderr closed: nothing left to tell
        pass


def _distinct(outputs: dict, inputs: dict) -> None:
    """An output never names an input or another output (``pipelines.safety``)."""
    from ..pipelines.safety import check_distinct

    check_distinct({k: v for k, v in outputs.items() if v}, {k: v for k, v in inputs.items() if v})


def _check_seed(seed: int, option: str = "--seed") -> None:
    from ..pipelines.requests import MAX_SEED

    if not 0 <= seed < MAX_SEED:
        raise InputError(f"{option} {seed}: must be an integer from 0 to 2^63-1")


def _check_finite_positive(value, option: str) -> None:
    import math

    if value is not None and (not math.isfinite(value) or value <= 0):
        raise InputError(f"{option} {value:g}: must be a positive finite number")


def _budget_bytes(gigabytes: float | None) -> int | None:
    if gigabytes is None:
        return None
    _check_finite_positive(gigabytes, "--memory-budget")
    return int(gigabytes * 2**30)


# ---- exit codes and signals ----------------------------------------------------------------------


def _interrupted_message() -> str:
    """What is on disk after an interruption: the files already complete, or nothing."""
    from ..io.volumes import written_files

    done = [str(p) for p in written_files() if p.exists()]
    if done:
        return f"maisi: cancelled; already complete: {', '.join(done)}; nothing else was written"
    return "maisi: cancelled; nothing was written"


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_with_exit_codes(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run its command's handler; every outcome becomes an exit code (module docstring)."""
    import signal

    previous = None
    if threading_main():
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # SIGTERM cleans up like Ctrl-C
        # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
        # `kill -INT` must still stop a run cleanly (a terminal's Ctrl-C never reaches a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except InputError as exc:
        _say(f"maisi: error: {exc}")
        return 2
    except (Cancelled, KeyboardInterrupt):
        _say(_interrupted_message())
        return 130
    except BrokenPipeError:  # the reader of our output went away (`maisi labels list | head`): end quietly
        _quiet_closed_streams()
        return 141
    except Exception as exc:  # unexpected: one line, traceback on request
        if os.environ.get("MAISI_DEBUG"):
            raise
        _say(f"maisi: unexpected failure: {type(exc).__name__}: {exc} (set MAISI_DEBUG=1 for the traceback)")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be set there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _quiet_closed_streams() -> None:
    """Point stdout/stderr at /dev/null so the interpreter's exit flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    except OSError:
        pass
