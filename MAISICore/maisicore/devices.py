"""``--devices``: the devices the exact split decode spreads its slabs over.

The rule is a pure function of the text and the number of CUDA devices present
(``parse_devices``), so it is checked without a GPU; ``resolve_devices`` asks torch for that number.
This module imports no torch at import time (requests are checked without it).
"""

from __future__ import annotations

from typing import Sequence

from .errors import InputError

DEVICE_TYPES = ("cpu", "cuda")


def _items(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        return [part.strip() for part in spec.split(",")]
    return [str(part).strip() for part in spec]


def parse_devices(spec: str | Sequence[str], cuda_count: int | None = None) -> list[str]:
    """``"cuda:0,cuda:1"`` (or a list of names) → ``["cuda:0", "cuda:1"]``, or a one-line ``InputError``.

    Names: ``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N``; all of one type (a CPU worker would hold the
    GPUs back); a device may repeat (two workers on it: ``cpu,cpu``). ``cuda_count``: CUDA devices
    present (``None``: only the spelling is checked, as a request's ``check()`` does)."""
    items = _items(spec)
    shown = ",".join(items)
    if not items or any(not item for item in items):
        raise InputError(f"--devices {shown!r}: give one or more devices, comma-separated (cpu, cuda or cuda:N)")
    devices = []
    for item in items:
        kind, colon, index = item.lower().partition(":")
        if kind not in DEVICE_TYPES:
            raise InputError(f"--devices {shown}: unknown device type {kind!r} in {item!r}; use cpu, cuda or cuda:N")
        if kind == "cpu":
            if colon:
                raise InputError(f"--devices {shown}: {item!r}: the CPU takes no index; write cpu (repeat it for "
                                 "more workers: cpu,cpu)")
            devices.append("cpu")
            continue
        if colon and not (index.isascii() and index.isdigit()):
            raise InputError(f"--devices {shown}: {item!r}: a CUDA index is a whole number 0 or more (cuda:0, cuda:1)")
        devices.append(f"cuda:{int(index) if colon else 0}")
    if len({d.partition(":")[0] for d in devices}) > 1:
        raise InputError(f"--devices {shown}: give devices of one type (all cpu or all cuda)")
    if cuda_count is not None and devices[0] != "cpu":
        if cuda_count == 0:
            raise InputError(f"--devices {shown}: CUDA is not available on this machine; use cpu or leave "
                             "--devices out")
        missing = [d for d in devices if int(d.partition(":")[2]) >= cuda_count]
        if missing:
            raise InputError(f"--devices {shown}: {missing[0]} is not available: {cuda_count} CUDA device(s) "
                             f"present (cuda:0 to cuda:{cuda_count - 1})")
    return devices


def check_decode_method(devices, method: str) -> None:
    """``--devices`` spreads the exact decode only."""
    if devices and method != "exact":
        raise InputError(f"--devices spreads the exact decode over devices; leave out --decode {method} (or --devices)")


def cuda_device_count() -> int:
    """CUDA devices torch can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(spec: str | Sequence[str] | None):
    """``torch.device`` objects for ``spec`` on this machine (``None`` stays ``None``)."""
    if spec is None:
        return None
    import torch

    names = parse_devices(spec, cuda_device_count() if any("cuda" in str(s).lower() for s in _items(spec)) else 0)
    return [torch.device(name) for name in names]

