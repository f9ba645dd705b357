"""``--precision``: which floating-point format the networks compute in, decided per device.

The rule is a pure function of the request, the device type and what the CPU executes natively
(``choose_precision``), so it is checked without a GPU; ``cpu_bf16_native`` reads the CPU's flags.
This module imports no torch at import time (requests are checked without it).

- ``auto``: float16 autocast on CUDA, as NVIDIA's reference runs; bfloat16 on a CPU that executes it
  natively (x86 AVX-512 BF16 or AMX, Arm BF16); float32 elsewhere.
- ``fp32``: float32 everywhere: today's numbers, byte for byte.
- ``bf16``: bfloat16 autocast (CPU or CUDA); ``fp16``: float16 autocast (CUDA only).
- ``--reference-numerics``: the reference's settings (float16 autocast on CUDA, float32 on the CPU,
  MONAI's own attention), so the latents equal NVIDIA's code bit for bit on the CPU.

What each precision changes, per network (decided from measured error, see docs/memory-and-speed.md):
the diffusion UNet and the ControlNet run under autocast (their prediction is cast back to float32
before the sampler's step, whose arithmetic and latents stay float32); the VAE decoder runs its
convolutions in the reduced format with float32 GroupNorm statistics and activations; the VAE
encoder (inpainting, region updates, ``vae encode``, training latents) stays float32 on the CPU
(bfloat16 encoding measured 18.6 HU mean error); the mask generation networks keep their own rule
(float16 autocast on CUDA as the reference, float32 on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REDUCED = ("bf16", "fp16")
# CPU feature flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic runs natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses (``fp32``, ``bf16`` or ``fp16``) and why, in words for the plan line."""

    name: str
    reason: str
    reference_numerics: bool = False

    @property
    def reduced(self) -> bool:
        return self.name in REDUCED

    @property
    def dtype(self):
        """The torch dtype of the reduced-precision work (float32 for ``fp32``)."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def attention(self) -> str:
        """The attention the networks run: MONAI's own N × N attention for the reference's numbers,
        else ``scaled_dot_product_attention`` (``maisicore.models.networks``)."""
        return attention_for(self.reference_numerics)

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"


def attention_for(reference_numerics: bool) -> str:
    """MONAI's own N × N attention for the reference's numbers, else ``scaled_dot_product_attention``."""
    return "monai" if reference_numerics else "sdpa"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` text (read when None; empty where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_bf16_native(flags: set[str] | None = None) -> str | None:
    """The flag by which this CPU executes bfloat16 natively (``avx512_bf16``, ``amx_bf16``, Arm
    ``bf16``), or None. ``MAISI_CPU_BF16=0``/``1`` overrides the detection (tests, odd kernels)."""
    forced = os.environ.get("MAISI_CPU_BF16")
    if forced is not None and forced.strip() in ("0", "1"):
        return "MAISI_CPU_BF16=1" if forced.strip() == "1" else None
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def check_precision(precision, reference_numerics: bool = False) -> None:
    """The spelling of ``--precision`` and its agreement with ``--reference-numerics`` (one line)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not isinstance(reference_numerics, bool):
        raise InputError(f"reference_numerics {reference_numerics!r}: must be true or false")
    if reference_numerics and precision != "auto":
        raise InputError(f"--reference-numerics sets the reference's precision (float16 on CUDA, float32 on the CPU); "
                         f"leave out --precision {precision}")


def choose_precision(precision: str, device_type: str, bf16_flag: str | None = None,
                     reference_numerics: bool = False) -> PrecisionChoice:
    """The precision a run on ``device_type`` (``cpu`` or ``cuda``) uses for ``--precision``.

    ``bf16_flag``: the CPU flag by which bfloat16 runs natively (``cpu_bf16_native()``), None if it
    does not. A pure function: the CUDA decisions are tested on machines without a GPU."""
    check_precision(precision, reference_numerics)
    cuda = device_type == "cuda"
    if reference_numerics:
        return PrecisionChoice("fp16" if cuda else "fp32", "--reference-numerics: NVIDIA's float16 autocast on CUDA"
                               if cuda else "--reference-numerics: float32 on the CPU, as NVIDIA's code there", True)
    if precision == "auto":
        if cuda:
            return PrecisionChoice("fp16", "auto: float16 autocast on CUDA, as NVIDIA's reference")
        if bf16_flag:
            return PrecisionChoice("bf16", f"auto: this CPU executes bfloat16 natively ({bf16_flag})")
        return PrecisionChoice("fp32", "auto: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16)")
    if precision == "fp16" and not cuda:
        raise InputError("--precision fp16 is CUDA's float16 autocast; on the CPU use bf16 (or fp32, or auto)")
    if precision == "bf16" and not cuda and not bf16_flag:
        return PrecisionChoice("bf16", "asked for; this CPU has no native bfloat16, so it may be slower than fp32")
    return PrecisionChoice(precision, "asked for")


def resolve_precision(precision: str, device, reference_numerics: bool = False) -> PrecisionChoice:
    """``choose_precision`` for a torch device (or its type) on this machine."""
    device_type = getattr(device, "type", str(device).partition(":")[0])
    return choose_precision(precision, device_type, cpu_bf16_native() if device_type == "cpu" else None,
                            reference_numerics)


@dataclass(frozen=True)
class Numerics:
    """How each stage of a run computes, decided from its ``PrecisionChoice`` and the device type
    alone (``numerics_for``; like ``models.networks.device_settings``, testable without a GPU).
    Data types are named as strings (``float32``, ``bfloat16``, ``float16``); ``torch_dtype`` maps them.

    - ``loop_autocast``: the whole sampling loop and the decode run under this CUDA autocast with
      float16 noise and conditions (the reference's path, and the path of every CUDA run before
      ``--precision``): CUDA + fp16 only, else None.
    - ``network_autocast``: each UNet/ControlNet call runs under ``torch.autocast`` in this format and
      its prediction is cast back to float32 before the sampler's step (latents and step arithmetic
      stay float32); None: float32 networks (or covered by ``loop_autocast``).
    - ``decode_conv``: the split decoder's convolutions (GroupNorm statistics, norm and SiLU float32).
    - ``decode_autocast``: the whole-volume, sliding-window and plain decodes' autocast, or None.
    - ``encode``: the VAE encoder, float32 always (bfloat16 measured 18.6 HU mean error on the CPU).
    - ``vae_norm_float16``: the VAE's GroupNorms may output float16 as the preset says (only under
      the reference's CUDA float16 autocast, which takes it).
    """

    choice: PrecisionChoice
    device_type: str
    loop_autocast: str | None
    network_autocast: str | None
    decode_conv: str
    decode_autocast: str | None
    encode: str = "float32"
    vae_norm_float16: bool = False

    @property
    def float16_inputs(self) -> bool:
        """Noise and conditions handed over as float16 (the reference's CUDA path)."""
        return self.loop_autocast is not None

    def describe(self) -> str:
        return self.choice.describe()


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def numerics_for(choice: PrecisionChoice, device_type: str) -> Numerics:
    """The per-stage numerics of ``choice`` on ``device_type`` (``cpu`` or ``cuda``); pure.

    CUDA + fp16 is the reference's path exactly (and what every CUDA run did before): the sampling
    loop and the decode under float16 autocast, float16 noise, the split decoder in float32."""
    cuda = device_type == "cuda"
    if choice.name == "fp16":
        if not cuda:
            raise InputError("--precision fp16 is CUDA's float16 autocast; on the CPU use bf16 (or fp32, or auto)")
        return Numerics(choice, device_type, loop_autocast="float16", network_autocast=None, decode_conv="float32",
                        decode_autocast="float16", vae_norm_float16=True)
    if choice.name == "bf16":
        return Numerics(choice, device_type, loop_autocast=None, network_autocast="bfloat16", decode_conv="bfloat16",
                        decode_autocast="bfloat16")
    return Numerics(choice, device_type, loop_autocast=None, network_autocast=None, decode_conv="float32",
                    decode_autocast=None)


def reference_numerics_for(device_type: str) -> Numerics:
    """What the low-level functions do when given no numerics: the reference's precision (float16
    autocast on CUDA, float32 on the CPU), i.e. every run before ``--precision``."""
    return numerics_for(choose_precision("auto", device_type, None, reference_numerics=True), device_type)


def torch_dtype(name: str | None):
    """The torch dtype named ``float32``/``bfloat16``/``float16`` (None stays None)."""
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_for(device, numerics: Numerics | None = None):
    """The autocast a decode runs under on ``device`` (a torch device): ``numerics.decode_autocast``;
    without ``numerics`` the reference's rule: float16 autocast on CUDA, nothing (float32) elsewhere."""
    import contextlib

    import torch

    if numerics is None:
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()
    if numerics.decode_autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(numerics.decode_autocast))
