"""Tensor splitting parallelism (TSP): the MAISI VAE decoder and encoder run exactly, slab by slab,
in bounded memory, with the weights of MONAI's ``AutoencoderKlMaisi`` unchanged.

Design (chosen by measurement, see docs/memory-and-speed.md)
------------------------------------------------------------------
The network is rebuilt as a graph of lazy nodes over the first spatial axis (the axis whose slices
are contiguous in memory): ``Conv`` (halo k//2; stride-2 downsampling with the encoder's one-sided
padding), ``Interp`` (trilinear ×2, one-voxel halo: outputs away from a slab's edge equal the whole
volume's), ``Norm`` (GroupNorm with *global* statistics, optionally SiLU) and ``Add`` (residual).
A node's ``read(a, b)`` returns slices ``[a, b)`` and pulls only the slices it needs from its
sources, which keep a small cache of recent slices.

GroupNorm needs statistics over the whole volume. Every GroupNorm input is swept once, slab by slab,
accumulating per-group count/mean/M2 in float64 (Chan's parallel formula), before anything reads
the normalised values. So the result equals the unsplit network's up to float rounding.

Execution is a list of sweeps over slabs. Each sweep *stores* some nodes (chunks of slices) and/or
accumulates statistics. Stored tensors are freed slab by slab as soon as every reader has moved
past them, so a layer's input shrinks while its output grows. Two modes:

- ``exact`` (layered): every block output and every residual-branch intermediate is stored; each
  convolution runs once. Peak ≈ the largest activation (plus one slab), not input + output + norm
  copies as in MONAI's decode.
- ``bounded``: only tensors at the latent resolution are stored; the upper levels are recomputed
  from there in each statistics sweep, so the peak depends on a slab (channels × one plane × a few
  slices), not on the volume. More convolutions (about 5×), same result.
- ``partial`` (chosen by ``auto`` only): the lower levels layered, the highest level streamed.

``make_plan`` picks the mode and slab thickness that fit a memory budget (default: available
memory minus a margin) and refuses only when even the smallest plan does not fit. On CUDA the
stored tensors live in host memory and slabs are computed on the device.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MARGIN_BYTES = 512 * 2**20  # kept free for the allocator, Python and the rest of the process
TRIM_EVERY_SLABS = 4  # return freed heap pages to the OS this often (measured at 128³: peak RSS −13 %, time +1 %)
FLOAT_BYTES = 4


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
class GroupStats:
    """Running per-group count, mean and M2 (float64) of (1, C, n, Y, Z) slabs."""

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(groups, dtype=torch.float64)
        self.m2 = torch.zeros(groups, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.combine(*self.summarize(x, self.groups))

    @staticmethod
    def summarize(x: torch.Tensor, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """One slab's per-group (count, mean, variance), float64 on the host."""
        xg = x.float().reshape(groups, -1)
        var, mean = torch.var_mean(xg, dim=1, unbiased=False)
        return xg.shape[1], mean.double().cpu(), var.double().cpu()

    def combine(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add a slab's ``summarize`` (Chan's parallel formula); slabs combined in one order give one result."""
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var * n + delta.square() * (self.count * n / total)
        self.count = total

    def scale_shift(self, channels: int, eps: float, weight, bias):
        """Per-channel (mean, 1/std, weight, bias) so that y = (x − mean)·inv_std·weight + bias."""
        var = self.m2 / self.count
        inv_std = 1.0 / torch.sqrt(var + eps)
        per = channels // self.groups
        mean = self.mean.repeat_interleave(per).float()
        inv_std = inv_std.repeat_interleave(per).float()
        return mean, inv_std, weight.detach().float(), bias.detach().float()


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------
def _assemble(chunks, a: int, b: int) -> torch.Tensor:
    """Slices [a, b) out of (start, end, tensor) chunks that cover them."""
    parts = [t.narrow(2, max(a, s) - s, min(b, e) - max(a, s)) for s, e, t in chunks if s < b and e > a]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class Node:
    """A (1, C, L, Y, Z) tensor read by slices along dim 2."""

    cached = False

    def __init__(self, sources, channels: int, length: int, plane: tuple[int, int]):
        self.sources = list(sources)
        self.channels = channels
        self.length = length
        self.plane = plane
        self.chunks: list[tuple[int, int, torch.Tensor]] = []  # stored slices (cached ones: Engine.cache)
        self.stored = False
        self.stats: GroupStats | None = None
        self.name = type(self).__name__

    # sizes
    def slice_bytes(self) -> int:
        return self.channels * self.plane[0] * self.plane[1] * FLOAT_BYTES

    # reading ---------------------------------------------------------------------------------
    def read(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        """Slices [a, b) (clipped to the volume): stored, cached, or computed now. Stored slices are
        shared by every engine; cached ones belong to the reading engine (one per device)."""
        a, b = max(a, 0), min(b, self.length)
        if self.stored:
            chunks = self.chunks
            if not chunks or a < chunks[0][0] or b > chunks[-1][1]:
                have = f"{chunks[0][0]}:{chunks[-1][1]}" if chunks else "none"
                raise RuntimeError(f"{self.name}: slices {a}:{b} not stored (have {have})")
            return _assemble(chunks, a, b)
        if self.cached:
            chunks = engine.chunks_of(self)
            if not chunks or a < chunks[0][0] or a > chunks[-1][1]:
                chunks[:] = [(a, b, self.compute(a, b, engine))]
            elif b > chunks[-1][1]:
                have_end = chunks[-1][1]
                chunks.append((have_end, b, self.compute(have_end, b, engine)))
            return _assemble(chunks, a, b)
        return self.compute(a, b, engine)

    def free_below(self, index: int, engine: "Engine") -> None:
        """Drop whole chunks that end at or before slice ``index`` (stored, or the engine's cache)."""
        chunks = self.chunks if self.stored else engine.chunks_of(self)
        chunks[:] = [c for c in chunks if c[1] > index]

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lowest_source_slice(self, source: "Node", a: int) -> int:
        """The lowest slice of ``source`` that computing slices from ``a`` on can read."""
        return a

    def source_slab(self, source: "Node", a: int, b: int, engine: "Engine") -> tuple[torch.Tensor, int, int]:
        """Slices [a, b) of ``source`` on the compute device, zero-padded where outside the volume;
        returns (slab, zeros before, zeros after)."""
        lo, hi = max(a, 0), min(b, source.length)
        x = source.read(lo, hi, engine).to(engine.device, non_blocking=True)
        before, after = lo - a, b - hi
        if before or after:
            x = F.pad(x, (0, 0, 0, 0, before, after))
        return x, before, after


class Input(Node):
    """A tensor given in full (the latent or the image)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__([], tensor.shape[1], tensor.shape[2], tuple(tensor.shape[3:]))
        self.chunks = [(0, tensor.shape[2], tensor)]
        self.stored = True


class Conv(Node):
    """``conv3d`` of a source: kernel 3 (stride 1 or the encoder's stride-2 downsampling with
    right-side padding) or 1."""

    cached = True

    def __init__(self, source: Node, conv: torch.nn.Conv3d, downsample: bool = False):
        k = conv.kernel_size[0]
        self.conv, self.k, self.downsample = conv, k, downsample
        if downsample:
            length = (source.length + 1 - k) // 2 + 1
            plane = tuple((n + 1 - k) // 2 + 1 for n in source.plane)
        else:
            length, plane = source.length, source.plane
        super().__init__([source], conv.out_channels, length, plane)

    def lowest_source_slice(self, source: Node, a: int) -> int:
        return 2 * a if self.downsample else a - self.k // 2

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        (source,) = self.sources
        weight, bias = engine.parameters(self.conv)
        if self.downsample:  # MONAI: F.pad(x, (0, 1) * 3) then conv(stride 2, padding 0)
            x, _, _ = self.source_slab(source, 2 * a, 2 * b + 1, engine)
            x = F.pad(x.to(weight.dtype), (0, 1, 0, 1))
            return F.conv3d(x, weight, bias, stride=2)
        h = self.k // 2
        x, _, _ = self.source_slab(source, a - h, b + h, engine)
        return F.conv3d(x.to(weight.dtype), weight, bias, padding=(0, h, h))


class Interp(Node):
    """Trilinear ×2 upsampling (``align_corners=False``), as MONAI's ``MaisiUpsample``."""

    def __init__(self, source: Node):
        super().__init__([source], source.channels, 2 * source.length, tuple(2 * n for n in source.plane))

    def lowest_source_slice(self, source: Node, a: int) -> int:
        return a // 2 - 1

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        (source,) = self.sources
        lo, hi = max(a // 2 - 1, 0), min(-(-b // 2) + 1, source.length)
        x = source.read(lo, hi, engine).to(engine.device, torch.float32, non_blocking=True)
        y = F.interpolate(x, scale_factor=2.0, mode="trilinear")
        return y.narrow(2, a - 2 * lo, b - a)


class Norm(Node):
    """GroupNorm with the source's global statistics, then SiLU when ``silu``."""

    def __init__(self, source: Node, norm: torch.nn.GroupNorm, silu: bool):
        super().__init__([source], source.channels, source.length, source.plane)
        self.norm, self.silu = norm, silu

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        (source,) = self.sources
        coefficients = engine.coefficients.get(id(self))
        if coefficients is None:  # on the engine's device, once per engine
            if source.stats is None:
                raise RuntimeError("GroupNorm read before its statistics were swept")
            mean, inv_std, w, bias = source.stats.scale_shift(self.channels, self.norm.eps, self.norm.weight, self.norm.bias)
            view = (1, -1, 1, 1, 1)
            coefficients = engine.coefficients[id(self)] = tuple(t.to(engine.device).view(view) for t in (mean, inv_std, w, bias))
        mean, inv_std, w, bias = coefficients
        x = source.read(a, b, engine).to(engine.device, non_blocking=True)
        y = (x.float() - mean) * inv_std * w + bias
        return F.silu(y) if self.silu else y


class Add(Node):
    """Residual sum of two nodes of one shape."""

    def __init__(self, left: Node, right: Node):
        super().__init__([left, right], left.channels, left.length, left.plane)

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        left, right = self.sources
        x = left.read(a, b, engine).to(engine.device, torch.float32, non_blocking=True)
        return x + right.read(a, b, engine).to(engine.device, torch.float32, non_blocking=True)


class Stack(Node):
    """Channel concatenation of nodes of one length and plane (the encoder's two heads)."""

    def __init__(self, *parts: Node):
        super().__init__(parts, sum(p.channels for p in parts), parts[0].length, parts[0].plane)

    def compute(self, a: int, b: int, engine: "Engine") -> torch.Tensor:
        return torch.cat([p.read(a, b, engine).to(engine.device) for p in self.sources], dim=1)


# --------------------------------------------------------------------------------------------
# Graph of MONAI's AutoencoderKlMaisi
# --------------------------------------------------------------------------------------------
def _conv3d(module) -> torch.nn.Conv3d:
    """The ``nn.Conv3d`` inside MONAI's MaisiConvolution/Convolution wrappers."""
    while not isinstance(module, torch.nn.Conv3d):
        module = module.conv
    return module


def _blocks_graph(x: Node, blocks) -> Node:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        MaisiConvolution,
        MaisiDownsample,
        MaisiGroupNorm3D,
        MaisiResBlock,
        MaisiUpsample,
    )

    for block in blocks:
        if isinstance(block, MaisiResBlock):
            h = Conv(Norm(x, block.norm1, silu=True), _conv3d(block.conv1))
            h = Conv(Norm(h, block.norm2, silu=True), _conv3d(block.conv2))
            skip = Conv(x, _conv3d(block.nin_shortcut)) if block.in_channels != block.out_channels else x
            x = Add(skip, h)
        elif isinstance(block, MaisiUpsample):
            if block.use_convtranspose:
                raise ValueError("tensor splitting supports the trilinear-upsampling decoder (use_convtranspose=False)")
            x = Conv(Interp(x), _conv3d(block.conv))
        elif isinstance(block, MaisiDownsample):
            x = Conv(x, _conv3d(block.conv), downsample=True)
        elif isinstance(block, MaisiGroupNorm3D):
            x = Norm(x, block, silu=False)
        elif isinstance(block, MaisiConvolution):
            x = Conv(x, _conv3d(block))
        else:
            raise ValueError(f"tensor splitting does not support {type(block).__name__} blocks (attention)")
    return x


def decoder_graph(autoencoder, latent: torch.Tensor) -> tuple[Input, Node]:
    """Lazy graph of ``autoencoder.decode`` (post-quant conv + decoder) for ``latent`` (1, 4, X, Y, Z)."""
    source = Input(latent)
    x = Conv(source, _conv3d(autoencoder.post_quant_conv))
    return source, _blocks_graph(x, autoencoder.decoder.blocks)


def encoder_graph(autoencoder, image: torch.Tensor) -> tuple[Input, Node]:
    """Lazy graph of ``autoencoder.encode`` for ``image`` (1, 1, X, Y, Z): (input, [z_mu | log_var])."""
    source = Input(image)
    h = _blocks_graph(source, autoencoder.encoder.blocks)
    return source, Stack(Conv(h, _conv3d(autoencoder.quant_conv_mu)), Conv(h, _conv3d(autoencoder.quant_conv_log_sigma)))


def _walk(node: Node, seen=None) -> list[Node]:
    """Nodes upstream of ``node`` (itself included), sources before consumers."""
    seen = {} if seen is None else seen
    order = []

    def visit(n):
        if id(n) in seen:
            return
        seen[id(n)] = n
        for s in n.sources:
            visit(s)
        order.append(n)

    visit(node)
    return order


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """One pass over slabs of nodes of equal length: store them and/or sweep their statistics."""

    targets: list[Node]
    store: list[bool]
    stats: list[bool]
    output: Node | None = None


@dataclass
class SplitPlan:
    """How a decode/encode will run: mode, slab thickness (slices of the output), sweeps, estimate."""

    mode: str
    slab: int
    sweeps: list[Sweep] = field(repr=False)
    stored: set[int] = field(repr=False)
    estimated_bytes: int
    budget_bytes: int | None
    convolution_passes: float  # convolution work relative to running each convolution once

    whole_bytes: int | None = None  # the whole-volume decode's estimate when it was considered

    def describe(self) -> str:
        budget = f" within a {self.budget_bytes / 2**30:.2f} GiB budget" if self.budget_bytes else ""
        if self.mode == "whole":
            return (f"whole-volume decode (MONAI's decode, exact, fastest): estimated peak "
                    f"{self.estimated_bytes / 2**30:.2f} GiB for activations{budget}")
        why = ""
        if self.whole_bytes is not None:
            why = f" (the whole-volume decode would need about {self.whole_bytes / 2**30:.2f} GiB)"
        return (
            f"{self.mode} split decode: slabs of {self.slab} slices, {len(self.sweeps)} sweeps, "
            f"estimated peak {self.estimated_bytes / 2**30:.2f} GiB for activations{budget}, "
            f"{self.convolution_passes:.2f}× the convolution work{why}"
        )


def _norm_sources(nodes) -> list[Node]:
    return [n.sources[0] for n in nodes if isinstance(n, Norm)]


def _schedule(output: Node, stored: set[int]) -> list[Sweep]:
    """Sweeps for a graph where the nodes in ``stored`` (ids) are materialised.

    Targets in topological order: stored nodes, sources of GroupNorms (statistics), the output.
    A target joins the current sweep when it has the same length and no GroupNorm between it and
    the stored nodes it reads depends on statistics of that same sweep.
    """
    order = _walk(output)
    stat_ids = {id(n) for n in _norm_sources(order)}
    targets = [n for n in order if id(n) in stored or id(n) in stat_ids or n is output]
    targets = [n for n in targets if not isinstance(n, Input)]
    sweeps: list[Sweep] = []
    current: Sweep | None = None
    in_current: set[int] = set()
    for node in targets:
        needs = _statistics_needed(node, stored)
        if current is None or current.targets[0].length != node.length or needs & in_current or _reads_lazily(node, in_current, stored):
            current = Sweep([], [], [])
            sweeps.append(current)
            in_current = set()
        current.targets.append(node)
        current.store.append(id(node) in stored)
        current.stats.append(id(node) in stat_ids)
        if node is output:
            current.output = node
        in_current.add(id(node))
    return sweeps


def _statistics_needed(node: Node, stored: set[int]) -> set[int]:
    """Ids of nodes whose statistics reading ``node`` needs (through lazy nodes)."""
    needs: set[int] = set()
    stack = [node]
    seen = set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, Norm):
            needs.add(id(n.sources[0]))
        for s in n.sources:
            if id(s) not in stored and not isinstance(s, Input):
                stack.append(s)
            elif isinstance(n, Norm):
                needs.add(id(s))
    return needs


def _reads_lazily(node: Node, group: set[int], stored: set[int]) -> bool:
    """Whether ``node`` reads a node of ``group`` that is stored by that same sweep."""
    stack, seen = list(node.sources), set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n) in group and id(n) in stored:
            return True
        if id(n) not in stored:
            stack.extend(n.sources)
    return False


def _stored_for_mode(output: Node, mode: str, cut_length: int | None) -> set[int]:
    order = _walk(output)
    if mode == "exact":
        # Everything a convolution or a residual sum produces (Norm and Interp stay lazy).
        return {id(n) for n in order if isinstance(n, (Conv, Add)) and not _only_feeds_add(n, order)}
    # partial/bounded: store convolution/residual outputs at lengths up to cut_length only
    return {
        id(n)
        for n in order
        if isinstance(n, (Conv, Add)) and n.length <= cut_length and not _only_feeds_add(n, order)
    }


def _only_feeds_add(node: Node, order) -> bool:
    consumers = [n for n in order if any(s is node for s in n.sources)]
    return bool(consumers) and all(isinstance(c, Add) for c in consumers) and not isinstance(node, Add) and not any(
        isinstance(c, Add) and c.sources[0] is node for c in consumers
    )


def _estimate(output: Node, sweeps: list[Sweep], stored: set[int], slab: int, workers: int = 1) -> tuple[int, float]:
    """Rough peak bytes of activations and the convolution work of a schedule. With several
    ``workers`` (``--devices``) each holds its own slab temporaries, and a sweep's inputs are freed
    only when the sweep ends (no worker frees what another still reads)."""
    order = _walk(output)
    # last sweep that reads each stored node
    last_use: dict[int, int] = {}
    for s, sweep in enumerate(sweeps):
        for target in sweep.targets:
            for n in _lazy_upstream(target, stored):
                for src in n.sources:
                    if id(src) in stored or isinstance(src, Input):
                        last_use[id(src)] = s
    produced: dict[int, int] = {}
    for s, sweep in enumerate(sweeps):
        for target, store in zip(sweep.targets, sweep.store):
            if store:
                produced[id(target)] = s
    full = {id(n): n.length * n.slice_bytes() for n in order}
    peak, work, total_conv = 0, 0.0, 0.0
    for n in order:
        if isinstance(n, Conv):
            total_conv += n.length * n.channels * n.sources[0].channels * n.k**3 * n.plane[0] * n.plane[1] / (8 if n.downsample else 1)
    for s, sweep in enumerate(sweeps):
        live_start = sum(full[i] for i, p in produced.items() if p < s and last_use.get(i, -1) >= s)
        growing = sum(full[id(t)] for t, st in zip(sweep.targets, sweep.store) if st)
        shrinking = sum(full[i] for i, p in produced.items() if p < s and last_use.get(i, -1) == s)
        lazy = set()
        for target in sweep.targets:
            lazy.update(id(n) for n in _lazy_upstream(target, stored))
        scale = sweep.targets[0].length
        cache = 0
        for n in order:
            if id(n) in lazy:
                rows = max(1, math.ceil(slab * n.length / scale)) + 2
                cache += rows * n.slice_bytes() * (2 if isinstance(n, Conv) else 1)
                if isinstance(n, Conv):
                    work += n.length * n.channels * n.sources[0].channels * n.k**3 * n.plane[0] * n.plane[1] / (8 if n.downsample else 1)
        if workers > 1:
            peak = max(peak, live_start + growing + workers * cache)
        else:
            peak = max(peak, live_start + max(growing - shrinking, 0) + cache + min(growing, shrinking) // 8)
    return int(peak), (work / total_conv if total_conv else 1.0)


def _lazy_upstream(target: Node, stored: set[int]) -> list[Node]:
    """``target`` and the lazily computed nodes it pulls from (not stored, not inputs)."""
    out, stack, seen = [], [target], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        for s in n.sources:
            if id(s) not in stored and not isinstance(s, Input):
                stack.append(s)
    return out


def resident_bytes(device: torch.device) -> int:
    """Memory the process holds now: CUDA memory allocated by torch, else resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def activation_budget(device: torch.device, memory_budget_bytes: int | None) -> int:
    """Bytes the split engine may allocate: a total budget for the process (``--memory-budget``)
    minus what it holds already (interpreter, libraries, weights), or free memory minus a margin."""
    if memory_budget_bytes is None:
        return available_bytes(device)
    left = memory_budget_bytes - resident_bytes(device)
    if left <= 0:
        raise MemoryError(
            f"the process already holds {resident_bytes(device) / 2**30:.2f} GiB, more than the "
            f"{memory_budget_bytes / 2**30:.2f} GiB memory budget; raise --memory-budget"
        )
    return left


def available_bytes(device: torch.device) -> int:
    """Free memory the decode may use: CUDA free memory, else MemAvailable of the host, minus a margin."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free - MARGIN_BYTES, 0)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = 8 * 2**30
    return max(free - MARGIN_BYTES, 0)


# MONAI's whole-volume decode holds each block's input and output, the GroupNorm's float32 copy and
# SiLU output, and the upsampling's output at once. Its peak above the baseline (benchmarks/vae_tsp.py:
# peak RSS − RSS before decoding) over the largest float32 activation of the graph (at official
# width the 128-channel upsampled tensor at full resolution): 3.5× (official, latent 32³), 3.95× (24³),
# 3.5× (40³), 3.95× (demo model, 59×42×48). Planned with 4×.
WHOLE_VOLUME_FACTOR = 4.0


def whole_volume_bytes(output: Node) -> int:
    """Estimated peak bytes (above what the process holds) of MONAI's unsplit decode of the graph
    ending at ``output``: ``WHOLE_VOLUME_FACTOR`` × its largest float32 activation."""
    return int(WHOLE_VOLUME_FACTOR * max(n.length * n.slice_bytes() for n in _walk(output)))


def make_plan(output: Node, budget_bytes: int | None, mode: str = "auto", slab: int | None = None,
              whole: bool = False, workers: int = 1) -> SplitPlan:
    """Choose the plan: with ``whole`` (decodes only) and mode ``auto``, MONAI's whole-volume decode
    when its estimate fits ``budget_bytes`` (exact and the fastest); else the split plan with the
    least recomputation, then the thickest slabs, whose estimate fits. ``workers``: devices the
    split plan's slabs are spread over (``--devices``; the whole-volume decode runs on the first)."""
    order = _walk(output)
    lengths = sorted({n.length for n in order if isinstance(n, Conv)})
    if mode not in ("auto", "exact", "bounded"):
        raise ValueError(f"unknown split mode {mode!r}: choose auto, exact or bounded")
    whole_bytes = whole_volume_bytes(output) if whole and mode == "auto" and not slab else None
    if whole_bytes is not None and budget_bytes is not None and whole_bytes <= budget_bytes:
        return SplitPlan("whole", output.length, [], set(), whole_bytes, budget_bytes, 1.0, whole_bytes)
    exact = [("exact", None)]
    partial = [("partial", cut) for cut in reversed(lengths[1:-1])]  # store the lower levels only
    bounded = [("bounded", lengths[0])]  # store the latent level only: memory follows the slab
    candidates = {"exact": exact, "bounded": bounded, "auto": exact + partial + bounded}[mode]
    slabs = [slab] if slab else [4, 2, 1]  # 4 slices: fastest measured on CPU, small temporaries
    best = None
    for name, cut in candidates:
        stored = _stored_for_mode(output, name, cut)
        sweeps = _schedule(output, stored)
        for thickness in slabs:
            peak, work = _estimate(output, sweeps, stored, thickness, workers)
            plan = SplitPlan(name, thickness, sweeps, stored, peak, budget_bytes, work, whole_bytes)
            if best is None or peak < best.estimated_bytes:
                best = plan
            if budget_bytes is None or peak <= budget_bytes:
                return plan
    need = best.estimated_bytes / 2**30
    raise MemoryError(
        f"even the smallest split plan needs about {need:.2f} GiB for activations, more than the "
        f"{budget_bytes / 2**30:.2f} GiB budget; raise --memory-budget or free memory"
    )


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------
def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): slab-sized blocks freed in the
    middle of the heap would otherwise stay in the process's resident memory."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class Engine:
    """Computes slabs on ``device``; stored slices in ``storage`` memory. One engine per device (and
    per worker): its own copy of the convolution weights, GroupNorm coefficients and slab caches."""

    def __init__(self, device: torch.device, storage: torch.device, dtype: torch.dtype = torch.float32,
                 conv_dtype: torch.dtype = torch.float32):
        self.device, self.storage, self.dtype = torch.device(device), storage, dtype
        # The convolutions' format (``--precision``): weights cast once here, inputs at each call;
        # GroupNorm statistics, norm + SiLU, upsampling and residual sums stay float32.
        self.conv_dtype = conv_dtype
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.cache: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # lazily computed slices, by node
        self.coefficients: dict[int, tuple[torch.Tensor, ...]] = {}  # GroupNorm (mean, 1/std, w, b), by node

    def parameters(self, conv: torch.nn.Conv3d):
        key = id(conv)
        if key not in self._params:
            w = conv.weight.detach().to(self.device, self.conv_dtype)
            b = conv.bias.detach().to(self.device, self.conv_dtype) if conv.bias is not None else None
            self._params[key] = (w, b)
        return self._params[key]

    def chunks_of(self, node: Node) -> list[tuple[int, int, torch.Tensor]]:
        return self.cache.setdefault(id(node), [])

    def run(self, output: Node, plan: SplitPlan, out: torch.Tensor | None, callback=None) -> torch.Tensor | None:
        """Execute ``plan`` on this engine alone (``run_plan``)."""
        return run_plan(output, plan, [self], out, callback)

    def sweep(self, sweep: Sweep, starts: list[int], step: int, length: int, nodes: list[Node],
              last_use: dict[int, int], s: int, free_stored: bool, out: torch.Tensor | None,
              progress, stop=None) -> "_SweepPart":
        """Slabs ``[a, a + step)`` for ``a`` in ``starts`` (consecutive) of one sweep. Statistics and
        stored slices are returned, not applied: the caller combines every worker's in slab order.
        ``free_stored``: free the sweep's inputs behind the slabs (only one worker reads them)."""
        part = _SweepPart([[] for _ in sweep.targets], [])
        for slabs_done, a in enumerate(starts, 1):
            if stop is not None and stop.is_set():
                break
            b = min(a + step, length)
            for i, (target, store, with_stats) in enumerate(zip(sweep.targets, sweep.store, sweep.stats)):
                y = target.compute(a, b, self) if store else target.read(a, b, self)
                if with_stats:
                    part.stats.append((a, i, *GroupStats.summarize(y, target.stats.groups)))
                if store:
                    part.stored[i].append((a, b, y.to(self.storage, self.dtype)))
                if target is sweep.output:
                    out[:, :, a:b] = y.to(out.device, out.dtype)
                del y
            self._free_behind(sweep, nodes, b, last_use, s, free_stored)
            if slabs_done % TRIM_EVERY_SLABS == 0:
                _release_free_heap()
            progress(b - a)
        return part

    def _free_behind(self, sweep: Sweep, nodes: list[Node], next_start: int, last_use: dict[int, int], s: int,
                     free_stored: bool = True) -> None:
        """Drop cached or stored slices that no later slab of this sweep can read: the lowest slice
        each node can still be asked for, propagated from the targets through halos and scales."""
        low: dict[int, int] = {id(t): next_start for t in sweep.targets}
        for n in nodes:  # consumers before sources
            if id(n) not in low:
                continue
            if n.stored and not any(n is t for t in sweep.targets):
                continue  # read directly; nothing upstream is touched through it
            for src in n.sources:
                reach = n.lowest_source_slice(src, low[id(n)])
                low[id(src)] = min(low.get(id(src), reach), reach)
        for n in nodes:
            if isinstance(n, Input) or id(n) not in low or any(n is t and st for t, st in zip(sweep.targets, sweep.store)):
                continue
            if n.stored and (not free_stored or last_use.get(id(n)) != s):
                continue
            n.free_below(low[id(n)], self)

    @staticmethod
    def _groups_of(node: Node, order) -> int:
        for n in order:
            if isinstance(n, Norm) and n.sources[0] is node:
                return n.norm.num_groups
        return 1


@dataclass
class _SweepPart:
    """What one worker's slabs of a sweep produced: stored slices per target, statistics per slab."""

    stored: list[list[tuple[int, int, torch.Tensor]]]
    stats: list[tuple]  # (first slice, target index, count, mean, variance)


def _worker(engine: Engine, stop, *args):
    """``Engine.sweep`` in a worker thread: gradients off (thread-local), the engine's CUDA device current."""
    import contextlib

    device = torch.cuda.device(engine.device) if engine.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), device:
            return engine.sweep(*args, stop=stop)
    except BaseException:
        stop.set()  # the other workers stop at their next slab
        raise


def run_plan(output: Node, plan: SplitPlan, engines: list[Engine], out: torch.Tensor | None,
             callback=None) -> torch.Tensor | None:
    """Execute ``plan``; ``out`` (1, C, L, Y, Z) on the host receives the output node.

    With several engines (``--devices``) each sweep's slabs are cut into as many runs of consecutive
    slabs, one per engine, run in threads (torch releases the GIL inside its operations). A sweep
    reads only what earlier sweeps stored, so the runs are independent; the GroupNorm statistics of
    every slab are combined in slab order afterwards, as one engine combines them, and the stored
    slices joined in order."""
    stored = plan.stored
    order = _walk(output)
    position = {id(n): i for i, n in enumerate(order)}
    for n in order:
        n.stored = id(n) in stored or isinstance(n, Input)
        if not n.stored:
            n.chunks = []
    # Per sweep: the nodes it touches (consumers before sources) and the last sweep reading each stored node.
    touched: list[list[Node]] = []
    last_use: dict[int, int] = {}
    for s, sweep in enumerate(plan.sweeps):
        nodes: dict[int, Node] = {}
        for target in sweep.targets:
            for n in _lazy_upstream(target, stored):
                nodes[id(n)] = n
                for src in n.sources:
                    nodes[id(src)] = src
                    if src.stored:
                        last_use[id(src)] = s
        touched.append(sorted(nodes.values(), key=lambda n: -position[id(n)]))
    total = sum(sweep.targets[0].length for sweep in plan.sweeps)
    done = 0
    lock = threading.Lock()

    def progress(slices: int) -> None:
        nonlocal done
        with lock:
            done += slices
            if callback is not None:
                callback(done, total)

    workers = len(engines)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="maisi-decode") if workers > 1 else None
    stop = threading.Event()  # set by a failing worker, or here when this thread is interrupted
    try:
        for s, sweep in enumerate(plan.sweeps):
            length = sweep.targets[0].length
            step = max(1, math.ceil(plan.slab * length / output.length))
            starts = list(range(0, length, step))
            for target, with_stats in zip(sweep.targets, sweep.stats):
                if with_stats:
                    target.stats = GroupStats(Engine._groups_of(target, order))
            common = (step, length, touched[s], last_use, s, workers == 1, out, progress)
            if pool is None:
                parts = [engines[0].sweep(sweep, starts, *common)]
            else:  # consecutive runs of slabs, as even as the count allows; a worker without slabs idles
                runs = [starts[w * len(starts) // workers:(w + 1) * len(starts) // workers] for w in range(workers)]
                futures = [pool.submit(_worker, e, stop, sweep, run, *common) for e, run in zip(engines, runs) if run]
                wait(futures)
                parts = [f.result() for f in futures]  # the first failure is raised
            for i, (target, store) in enumerate(zip(sweep.targets, sweep.store)):
                if store:
                    target.chunks = [chunk for part in parts for chunk in part.stored[i]]
            for _, i, n, mean, var in sorted((p for part in parts for p in part.stats), key=lambda p: (p[0], p[1])):
                sweep.targets[i].stats.combine(n, mean, var)
            del parts
            for engine in engines:
                engine.cache.clear()
            for src_id, last in last_use.items():
                node = next((n for n in touched[s] if id(n) == src_id), None)
                if last == s and node is not None and not isinstance(node, Input):
                    node.chunks = []
    finally:
        if pool is not None:
            stop.set()  # on an interruption the workers end at their next slab
            pool.shutdown(wait=True, cancel_futures=True)
        for engine in engines:
            engine.cache.clear()
            engine.coefficients.clear()
        for n in order:
            if not isinstance(n, Input):
                n.chunks = []
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _run(output: Node, device: torch.device, memory_budget_bytes, mode, slab, log, callback, what,
         whole=None, devices=None, conv_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plan and run a graph; the output node's tensor on the host. ``whole``: a function running the
    unsplit network (offered to the planner; decodes only). ``devices``: spread the split plan's slabs
    over these (one worker each; the budget is the smallest any of them leaves)."""
    storage = torch.device("cpu")  # stored activations live in host memory; slabs run on ``device``
    devices = [torch.device(d) for d in devices] if devices else [device]
    budget = min(activation_budget(d, memory_budget_bytes) for d in dict.fromkeys(devices))
    plan = make_plan(output, budget, mode, slab, whole=whole is not None, workers=len(devices))
    if log is not None:
        line = plan.describe().replace("decode", what)
        if len(devices) > 1:
            line += (f", on {devices[0]} (the first of --devices)" if plan.mode == "whole" else
                     f", slabs spread over {len(devices)} workers ({', '.join(map(str, devices))})")
        log(line)
    if plan.mode == "whole":
        out = whole()
        if callback is not None:
            callback(output.length, output.length)
        return out.float().cpu()
    out = torch.empty((1, output.channels, output.length, *output.plane), dtype=torch.float32, device=storage)
    return run_plan(output, plan, [Engine(d, storage, conv_dtype=conv_dtype) for d in devices], out, callback)


def _module_device(module: torch.nn.Module) -> torch.device | None:
    parameter = next(module.parameters(), None)
    return None if parameter is None else parameter.device


@torch.no_grad()
def decode_exact(
    autoencoder,
    latents: torch.Tensor,
    memory_budget_bytes: int | None = None,
    mode: str = "auto",
    slab: int | None = None,
    device: torch.device | None = None,
    callback=None,
    log=None,
    devices=None,
    numerics=None,
) -> torch.Tensor:
    """``autoencoder.decode(latents)`` computed slab by slab: (1, 4, X, Y, Z) → (1, 1, 4X, 4Y, 4Z),
    float32 on CPU, equal to the unsplit decode up to float rounding.

    Args:
        memory_budget_bytes: the most memory the process may hold while decoding (CPU: resident
            memory; CUDA: device memory); default: what it holds plus free memory minus a margin.
        mode: ``auto`` (MONAI's whole-volume decode when it fits, else the split plan with the least
            recomputation that fits), ``exact`` or ``bounded`` (split plans only).
        slab: output slices per slab (default chosen by the planner).
        device: compute device (default: the latents'); stored activations stay in host memory.
        callback: ``callback(done, total)`` slices swept; log: receives the plan as one line.
        devices: several compute devices (``--devices``, e.g. ``["cuda:0", "cuda:1"]``; a device may
            repeat): each sweep of a split plan is cut into one run of slabs per device, run in
            threads, with the result of one device. The whole-volume decode runs on the first.
        numerics: ``maisicore.precision.Numerics``: the split plan's convolutions in
            ``numerics.decode_conv`` (GroupNorm statistics float64, norm + SiLU float32), the
            whole-volume decode under ``numerics.decode_autocast``; default the reference's (split
            plan float32, whole-volume decode under float16 autocast on CUDA).
    """
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, C, X, Y, Z), got {tuple(latents.shape)}")
    from ..precision import autocast_for, torch_dtype

    conv_dtype = torch_dtype(numerics.decode_conv) if numerics is not None else torch.float32
    devices = [torch.device(d) for d in devices] if devices else None
    device = devices[0] if devices else torch.device(device or latents.device)
    _, output = decoder_graph(autoencoder, latents.detach().to("cpu", torch.float32))

    def whole() -> torch.Tensor:
        network = autoencoder
        if devices and _module_device(autoencoder) not in (None, device):  # --devices elsewhere than the model
            import copy

            network = copy.deepcopy(autoencoder).to(device)
        with autocast_for(device, numerics):  # reference: float16 on CUDA (the norm may output float16)
            return network.decode(latents.detach().to(device, torch.float32))

    return _run(output, device, memory_budget_bytes, mode, slab, log, callback, "decode", whole, devices, conv_dtype)


@torch.no_grad()
def encode_exact(
    autoencoder,
    image: torch.Tensor,
    memory_budget_bytes: int | None = None,
    mode: str = "auto",
    slab: int | None = None,
    device: torch.device | None = None,
    log=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``autoencoder.encode(image)`` slab by slab: (1, 1, X, Y, Z) on the [0, 1] scale →
    (z_mu, z_sigma), each (1, 4, X/4, Y/4, Z/4) float32 on CPU."""
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, 1, X, Y, Z), got {tuple(image.shape)}")
    if any(n % 4 for n in image.shape[2:]):
        raise ValueError(f"image size {tuple(image.shape[2:])} must be divisible by 4 along every axis")
    device = torch.device(device or image.device)
    _, output = encoder_graph(autoencoder, image.detach().to("cpu", torch.float32))
    out = _run(output, device, memory_budget_bytes, mode, slab, log, None, "encode")
    latent_channels = output.channels // 2
    mu, log_var = out[:, :latent_channels], out[:, latent_channels:]
    return mu.contiguous(), torch.exp(torch.clamp(log_var, -30.0, 20.0) / 2)
