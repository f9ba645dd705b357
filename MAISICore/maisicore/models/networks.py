"""Build MONAI's MAISI networks from a preset, adapted to the device they run on.

The parameters (and so the weight files) are those of the preset. Only settings that hold no
weights are adapted:

- ``use_flash_attention``: the published configs set it, and the reference runs it on CUDA. MONAI's
  constructors refuse it when CUDA is absent (they check ``torch.cuda.is_available()``, not the
  device), so the networks are always constructed with it off and ``configure_for_device`` then sets
  the public ``use_flash_attention`` attribute of every MONAI ``SABlock`` (read at each forward): the
  block then calls ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) with the same q, k, v
  and scale instead of materialising the heads × N × N score matrix. This is done on every device
  (CUDA: flash/memory-efficient kernels, as the reference; CPU: PyTorch's CPU flash kernel), so CPU
  runs are no longer limited by attention memory. ``attention="monai"`` keeps MONAI's N × N path.
- VAE ``num_splits``: MONAI's one-axis splitting loses the remainder of lengths not divisible by
  the split count and crashes on chunks smaller than its halo; the plain decode runs unsplit
  (``num_splits=1``). Memory-bounded decoding is the job of the decode function.
- VAE ``norm_float16``: the GroupNorm hands float16 to a float32 convolution, which only works
  under CUDA autocast; kept as the preset says on CUDA, off elsewhere.

The decision is made from the *target* device (``device_settings``), never from where a network was
constructed: ``maisicore.models.weights.load_model`` builds on the CPU, loads the checkpoints, then
calls ``configure_for_device`` for the device the networks will run on.
- ControlNet ``use_checkpointing``: a training memory saver, off for inference.
- Lean inference forwards (``forward="lean"``, the default; ``set_lean_forward``): at no_grad the
  UNet, the ControlNet and their residual blocks run MONAI's forward with in-place activations and
  additions and free skip connections, concatenations and the ControlNet's unprojected residuals as
  soon as they are consumed, and the ControlNet's conditioning embedding (convolutions at *image*
  resolution) is computed in depth slabs once its activations are large (``STREAM_MIN_BYTES``).
  Same weights, same operations; everything but the slabs is bit-identical to MONAI's forward. The
  caller's tensors (inputs, the residuals handed to the UNet) are never modified. With gradients
  enabled (training) MONAI's own forward runs. ``forward="monai"`` keeps MONAI's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .presets import ModelPreset

ATTENTION_MODES = ("sdpa", "monai")
FORWARD_MODES = ("lean", "monai")
# The ControlNet's conditioning embedding is computed in depth slabs (``conditioning_embedding``) when
# its largest activation holds at least STREAM_MIN_BYTES (256³ images and larger at float32), in
# slabs whose largest activation holds about STREAM_SLAB_BYTES. Convolutions are local, so each
# slab's rows are those of the whole-volume call, but oneDNN picks its kernels by problem size and
# may sum in another order: float32 rounding (benchmarks/attention_cpu.py at 384³: the UNet output
# within 1.1e-5 of values up to 5.9). Below the threshold MONAI's whole-volume call runs,
# bit-identical.
STREAM_MIN_BYTES = 512 * 2**20
STREAM_SLAB_BYTES = 128 * 2**20


def _network_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments MONAI accepts on any machine: flash attention is switched on after
    construction (``configure_for_device``), never at construction."""
    out = dict(kwargs)
    if "use_flash_attention" in out:
        out["use_flash_attention"] = False
    return out


def device_settings(preset_kwargs: dict[str, Any], device: torch.device | str, attention: str = "sdpa") -> dict[str, bool]:
    """Run-time settings (no weights) for a network with the preset's ``preset_kwargs`` on ``device``.

    Returns ``{"sdpa": bool, "norm_float16": bool}``: ``sdpa`` — attention blocks use
    ``scaled_dot_product_attention`` (the preset has attention and ``attention == "sdpa"``; the
    preset's ``use_flash_attention`` is honoured on CUDA, and on CPU too: the same mathematics
    without the N × N matrix); ``norm_float16`` — the VAE's GroupNorm outputs float16 (only where
    the preset says so and the device is CUDA, whose autocast takes it).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTION_MODES)}")
    device = torch.device(device)
    return {
        "sdpa": attention == "sdpa" and bool(preset_kwargs.get("use_flash_attention", False)),
        "norm_float16": device.type == "cuda" and bool(preset_kwargs.get("norm_float16", False)),
    }


def set_sdpa_attention(module: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI ``SABlock`` in ``module`` to (or off) PyTorch's
    ``scaled_dot_product_attention``, in place; returns how many blocks were set.

    MONAI's ``SABlock.forward`` reads its public ``use_flash_attention`` attribute at each call;
    that path is valid only without ``save_attn``, relative positional embeddings or causal masks,
    which the MAISI networks never use (checked here).
    """
    from monai.networks.blocks.selfattention import SABlock

    count = 0
    for block in module.modules():
        if isinstance(block, SABlock):
            if enabled and (block.save_attn or block.rel_positional_embedding is not None or block.causal):
                raise ValueError("scaled_dot_product_attention cannot replace an attention block that saves its "
                                 "attention, has relative positions or is causal")
            block.use_flash_attention = bool(enabled)
            count += 1
    return count


# --- Lean inference forwards -------------------------------------------------------------------
# Each mirrors MONAI 1.6's forward of its class operation by operation; the differences are only
# where results are stored (in place into tensors this forward created, never into its inputs) and
# when references are dropped, so the numbers are bit-identical. With gradients enabled each defers
# to MONAI's own forward (autograd may need what the lean forward overwrites or frees).


def _add_(target: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``target + other`` stored into ``target`` (a tensor the caller created) when the result has
    its dtype and shape, else out of place: the same rounded sums (float addition commutes)."""
    if torch.result_type(target, other) == target.dtype and torch.broadcast_shapes(target.shape, other.shape) == target.shape:
        return target.add_(other)
    return target + other


def _lean_resnet(self, box: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
    """MONAI ``DiffusionUNetResnetBlock.forward`` on the input popped from ``box``: in-place SiLU and
    additions; a 1×1-convolution skip connection computed first and the input freed once normalised
    (when ``box`` held the only reference: a concatenation in an up block, the largest tensors of
    the UNet), so the input is not alive during the 3×3×3 convolutions; an upsampled block's input
    upsampled again for the skip connection at the end instead of being kept at the finer resolution
    (the same nearest-neighbour values). Each result is that of MONAI's forward, operation by operation."""
    x = box.pop()
    skip = None
    if self.upsample is None and self.downsample is None and not isinstance(self.skip_connection, torch.nn.Identity):
        skip = self.skip_connection(x)
    h = F.silu(self.norm1(x), inplace=True)
    if self.upsample is not None:
        h = self.upsample(h)
    elif self.downsample is not None:
        x = self.downsample(x)
        h = self.downsample(h)
    if skip is None and self.upsample is None and not isinstance(self.skip_connection, torch.nn.Identity):
        skip = self.skip_connection(x)
    if skip is not None:
        del x
    h = self.conv1(h)
    temb = self.time_emb_proj(self.nonlinearity(emb))
    temb = temb[:, :, None, None] if self.spatial_dims == 2 else temb[:, :, None, None, None]
    h = _add_(h, temb)
    del temb
    h = F.silu(self.norm2(h), inplace=True)
    h = self.conv2(h)
    if skip is None:
        skip = self.skip_connection(self.upsample(x) if self.upsample is not None else x)
    return _add_(h, skip)


def _lean_resnet_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """MONAI ``DiffusionUNetResnetBlock.forward``, as ``_lean_resnet``."""
    if torch.is_grad_enabled():
        return _monai_forward(self)(x, emb)
    return _lean_resnet(self, [x], emb)


def _call_lean(module: torch.nn.Module, core, box: list[torch.Tensor], *args) -> torch.Tensor:
    """``core(module, box, *args)`` when ``module`` runs the lean forward (called directly, so that
    ``box`` holds the only reference to its input and the input can be freed early; the module's
    hooks do not run), else ``module(box.pop(), *args)``."""
    if _is_lean(module) and not torch.is_grad_enabled():
        return core(module, box, *args)
    return module(box.pop(), *args)


def _lean_up_block(self, box: list[torch.Tensor], res_hidden_states_list: list[torch.Tensor],
                   temb: torch.Tensor) -> torch.Tensor:
    """MONAI ``UpBlock.forward`` on the input popped from ``box``; the skip connections are popped
    from ``res_hidden_states_list`` (MONAI's callers pass a fresh slice), so each is freed once
    concatenated, and each concatenation is handed to its residual block as its only reference."""
    hidden_states = box.pop()
    for resnet in self.resnets:
        concatenated = [torch.cat([hidden_states, res_hidden_states_list.pop()], dim=1)]
        del hidden_states
        hidden_states = _call_lean(resnet, _lean_resnet, concatenated, temb)
    if self.upsampler is not None:
        hidden_states = self.upsampler(hidden_states, temb)
    return hidden_states


def _lean_up_block_forward(self, hidden_states: torch.Tensor, res_hidden_states_list: list[torch.Tensor],
                           temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI ``UpBlock.forward``, as ``_lean_up_block``."""
    if torch.is_grad_enabled():
        return _monai_forward(self)(hidden_states, res_hidden_states_list, temb, context)
    return _lean_up_block(self, [hidden_states], res_hidden_states_list, temb)


def _lean_unet_forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                       class_labels: torch.Tensor | None = None, down_block_additional_residuals=None,
                       mid_block_additional_residual: torch.Tensor | None = None,
                       top_region_index_tensor: torch.Tensor | None = None,
                       bottom_region_index_tensor: torch.Tensor | None = None,
                       spacing_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI ``DiffusionModelUNetMaisi.forward``. The ControlNet residuals are added (in place, as
    MONAI does) to each skip connection once no later down block reads it, instead of after the last
    one, which gives the same sums: MONAI adds into the last skip, which is the middle block's input,
    before the middle block, and so does this. The skip connections are freed as the up blocks
    consume them. ``down_block_additional_residuals`` is not modified."""
    if torch.is_grad_enabled():
        return _monai_forward(self)(x, timesteps, context, class_labels, down_block_additional_residuals,
                                    mid_block_additional_residual, top_region_index_tensor,
                                    bottom_region_index_tensor, spacing_tensor)
    from monai.utils import convert_to_tensor

    emb = self._get_time_and_class_embedding(x, timesteps, class_labels)
    emb = self._get_input_embeddings(emb, top_region_index_tensor, bottom_region_index_tensor, spacing_tensor)
    h = self.conv_in(x)
    if context is not None and self.with_conditioning is False:
        raise ValueError("model should have with_conditioning = True if context is provided")
    residuals = list(down_block_additional_residuals) if down_block_additional_residuals is not None else []
    skips: list[torch.Tensor] = [h]
    added = 0

    def add_residuals(upto: int) -> None:  # MONAI's in-place additions (zip: up to the shorter list)
        nonlocal added
        for i in range(added, min(upto, len(residuals))):
            skips[i] += residuals[i]
            residuals[i] = None  # this forward's own reference; the caller's are untouched
        added = max(added, upto)

    for downsample_block in self.down_blocks:
        h, res_samples = downsample_block(hidden_states=h, temb=emb, context=context)
        skips.extend(res_samples)
        del res_samples
        add_residuals(len(skips) - 1)  # all but the last: h, the next block's input
    add_residuals(len(skips))
    residuals.clear()
    h = self.middle_block(h, emb, context)
    if mid_block_additional_residual is not None:
        h += mid_block_additional_residual
    for upsample_block in self.up_blocks:
        count = len(upsample_block.resnets)
        res_samples = skips[-count:]
        del skips[-count:]
        if _is_lean(upsample_block):
            box = [h]
            del h
            h = _lean_up_block(upsample_block, box, res_samples, emb)
        else:
            h = upsample_block(hidden_states=h, res_hidden_states_list=res_samples, temb=emb, context=context)
        del res_samples
    h = self.out(h)
    return convert_to_tensor(h)


def _lean_controlnet_forward(self, x: torch.Tensor, timesteps: torch.Tensor, controlnet_cond: torch.Tensor,
                             conditioning_scale: float = 1.0, context: torch.Tensor | None = None,
                             class_labels: torch.Tensor | None = None):
    """MONAI ``ControlNetMaisi.forward`` (without activation checkpointing, which only matters for
    gradients); each down residual is freed once projected, and the scaling is done in place."""
    if torch.is_grad_enabled():
        return _monai_forward(self)(x, timesteps, controlnet_cond, conditioning_scale, context, class_labels)
    emb = self._prepare_time_and_class_embedding(x, timesteps, class_labels)
    h = self._apply_initial_convolution(x)
    h += self.controlnet_cond_embedding(controlnet_cond)
    down_block_res_samples, h = self._apply_down_blocks(emb, context, h)
    h = self._apply_mid_block(emb, context, h)
    outputs: list[torch.Tensor] = []
    for i, controlnet_block in enumerate(self.controlnet_down_blocks):
        if i >= len(down_block_res_samples):
            break
        residual = controlnet_block(down_block_res_samples[i])
        down_block_res_samples[i] = None
        outputs.append(residual.mul_(conditioning_scale))  # MONAI: ``h * conditioning_scale``
    del down_block_res_samples
    mid_block_res_sample = self.controlnet_mid_block(h)
    mid_block_res_sample *= conditioning_scale
    return outputs, mid_block_res_sample


def _embedding_layers(embedding) -> tuple[list[torch.nn.Module], list[int]] | None:
    """The layers of a MONAI ``ControlNetConditioningEmbedding`` and their depth strides, when every
    layer is a 3-D convolution (kernel 3, padding 1, stride 1 or 2 along depth) followed only by
    element-wise activations: then each output depth row depends on three input rows. Else None."""
    from monai.networks.blocks.activation import MemoryEfficientSwish, Swish

    layers = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    strides = []
    for layer in layers:
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, torch.nn.Conv3d) or conv.padding_mode != "zeros":
            return None
        if (conv.kernel_size[0], conv.padding[0], conv.dilation[0]) != (3, 1, 1) or conv.stride[0] not in (1, 2):
            return None
        for name, child in layer.named_children():
            if name == "conv":
                continue
            if name != "adn" or not all(isinstance(m, (Swish, MemoryEfficientSwish, torch.nn.SiLU))
                                        for m in child.children()):
                return None
        strides.append(conv.stride[0])
    return layers, strides


def conditioning_embedding(embedding, condition: torch.Tensor, min_bytes: int | None = None,
                           slab_bytes: int | None = None) -> torch.Tensor:
    """The output of a MONAI ``ControlNetConditioningEmbedding`` for ``condition``, computed in depth
    slabs when its largest activation (full-resolution channels × voxels) holds at least
    ``min_bytes`` (``STREAM_MIN_BYTES``), else by the module's own whole-volume forward.

    Each layer's module is called on a depth slab of its input with one row of real neighbours on
    either side (its own zero padding applies only at the volume's ends, as in the whole-volume
    call), and only the rows whose window lies inside the slab are kept; the last two rows of each
    layer's output are carried to the next slab, so nothing is computed twice but one edge row per
    layer and slab. The slabs' largest activation holds about ``slab_bytes`` (``STREAM_SLAB_BYTES``).
    The whole-volume activations at image resolution (8 channels at 384³: 1.8 GB each, several held
    at once) are never formed; only the output is (the embedding's last, smallest, layer).
    """
    min_bytes = STREAM_MIN_BYTES if min_bytes is None else min_bytes
    slab_bytes = STREAM_SLAB_BYTES if slab_bytes is None else slab_bytes
    found = _embedding_layers(embedding) if condition.dim() == 5 else None
    if found is None:
        return _monai_forward(embedding)(condition)
    layers, strides = found
    shapes = [tuple(condition.shape[2:])]
    for layer in layers:
        conv = layer.conv
        shapes.append(tuple((n + 2 * p - k) // st + 1 for n, p, k, st in
                            zip(shapes[-1], conv.padding, conv.kernel_size, conv.stride)))
    itemsize = condition.element_size()
    row_bytes = [layer.conv.out_channels * shape[1] * shape[2] * itemsize * condition.shape[0]
                 for layer, shape in zip(layers, shapes[1:])]
    largest = max(r * shape[0] for r, shape in zip(row_bytes, shapes[1:]))
    if largest < min_bytes:
        return _monai_forward(embedding)(condition)
    depths = [shape[0] for shape in shapes]
    # Rows of layer i's output per row of the last layer's output: the product of the later strides.
    per_final_row = []
    for i in range(len(layers)):
        scale = 1
        for s in strides[i + 1:]:
            scale *= s
        per_final_row.append(row_bytes[i] * scale)
    rows = max(1, slab_bytes // max(per_final_row))
    kept: list[tuple[int, torch.Tensor] | None] = [None] * len(layers)

    def rows_of(i: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of layer i's output (i = -1: the condition); requests come in increasing order."""
        if i < 0:
            return condition[:, :, a:b]
        s = strides[i]
        parts = []
        first = a
        if kept[i] is not None:
            start, carried = kept[i]
            if start > a:
                raise AssertionError("conditioning_embedding: slabs out of order")
            end = min(start + carried.shape[2], b)
            if end > a:
                parts.append(carried[:, :, a - start:end - start])
                first = end
        if first < b:
            lo, hi = max(0, s * (first - 1)), min(depths[i], s * (b - 1) + 2)
            out = layers[i](rows_of(i - 1, lo, hi))
            parts.append(out[:, :, first - lo // s:b - lo // s])
            del out
        result = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        del parts
        keep = max(a, b - 2)  # the next request starts two rows before this one's end
        kept[i] = (keep, result[:, :, keep - a:].clone())
        return result

    output = None
    last = len(layers) - 1
    for a in range(0, depths[-1], rows):
        b = min(depths[-1], a + rows)
        chunk = rows_of(last, a, b)
        if output is None:
            output = chunk.new_empty((*chunk.shape[:2], depths[-1], *chunk.shape[3:]))
        output[:, :, a:b] = chunk
        del chunk
    return output


def _lean_embedding_forward(self, conditioning: torch.Tensor) -> torch.Tensor:
    """MONAI ``ControlNetConditioningEmbedding.forward``, in depth slabs above ``STREAM_MIN_BYTES``
    (``conditioning_embedding``)."""
    if torch.is_grad_enabled():
        return _monai_forward(self)(conditioning)
    return conditioning_embedding(self, conditioning)


def _lean_forwards() -> dict[type, Any]:
    """MONAI class → its lean forward."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
    from monai.networks.nets.controlnet import ControlNetConditioningEmbedding
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, UpBlock

    return {ControlNetMaisi: _lean_controlnet_forward, DiffusionModelUNetMaisi: _lean_unet_forward,
            ControlNetConditioningEmbedding: _lean_embedding_forward,
            DiffusionUNetResnetBlock: _lean_resnet_forward, UpBlock: _lean_up_block_forward}


_LEAN_CLASSES: dict[type, type] = {}  # MONAI class → its lean subclass


def _lean_class(base: type) -> type:
    """``Lean<MONAI class>``: the MONAI class with only ``forward`` replaced by the lean one; made
    once and kept as an attribute of this module, so a pickled network finds its class."""
    cls = _LEAN_CLASSES.get(base)
    if cls is None:
        name = "Lean" + base.__name__
        cls = type(name, (base,), {"forward": _lean_forwards()[base], "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"MONAI ``{base.__name__}`` with maisicore's lean inference forward "
                                              "(``maisicore.models.networks.set_lean_forward``)."})
        _LEAN_CLASSES[base] = cls
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # the lean classes, made on first use (unpickling a network)
    if name.startswith("Lean"):
        for base in _lean_forwards():
            if name == "Lean" + base.__name__:
                return _lean_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_lean(module: torch.nn.Module) -> bool:
    return type(module) in _LEAN_CLASSES.values()


def _monai_forward(module: torch.nn.Module):
    """``module``'s forward as MONAI's class has it (bound), whatever lean class it runs as."""
    cls = type(module).__mro__[1] if _is_lean(module) else type(module)
    return cls.forward.__get__(module)


def set_lean_forward(module: torch.nn.Module, enabled: bool = True) -> int:
    """Give (or take back) the lean inference forward to every MAISI UNet, ControlNet, ControlNet
    conditioning embedding, residual block and plain up block in ``module``, in place; returns how
    many modules were set.

    Each such module's class becomes ``Lean<its MONAI class>``, a subclass that replaces only
    ``forward`` (weights, state dict and ``isinstance`` are MONAI's; ``enabled=False`` restores the
    MONAI class). At no_grad the lean forward runs the same operations as MONAI's, storing results in
    place and dropping references early (bit-identical), and computes the ControlNet's conditioning
    embedding in depth slabs above ``STREAM_MIN_BYTES`` (``conditioning_embedding``: float32
    rounding apart, the same); with gradients enabled MONAI's forward runs. Only exact instances of
    the MONAI classes are set (a subclass may have its own forward), residual blocks only with their
    SiLU and GroupNorms.
    """
    forwards = _lean_forwards()
    count = 0
    for block in module.modules():
        base = type(block).__mro__[1] if _is_lean(block) else type(block)
        if base not in forwards:
            continue
        if forwards[base] is _lean_resnet_forward and not (
            isinstance(block.nonlinearity, torch.nn.SiLU) and isinstance(block.norm1, torch.nn.GroupNorm)
            and isinstance(block.norm2, torch.nn.GroupNorm)
        ):
            continue
        block.__class__ = _lean_class(base) if enabled else base
        count += 1
    return count


def configure_for_device(module: torch.nn.Module, preset_kwargs: dict[str, Any], device: torch.device | str,
                         attention: str = "sdpa", forward: str = "lean") -> torch.nn.Module:
    """Apply ``device_settings`` to a built network (attention blocks, VAE GroupNorms) and the
    inference forward (``set_lean_forward``: ``forward="lean"`` or ``"monai"``) without moving it;
    returns ``module``."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    if forward not in FORWARD_MODES:
        raise ValueError(f"unknown forward {forward!r}: choose one of {', '.join(FORWARD_MODES)}")
    settings = device_settings(preset_kwargs, device, attention)
    set_sdpa_attention(module, settings["sdpa"])
    set_lean_forward(module, forward == "lean")
    for norm in module.modules():
        if isinstance(norm, MaisiGroupNorm3D):
            norm.norm_float16 = settings["norm_float16"]
    return module


def build_autoencoder(preset: ModelPreset, device: torch.device | str = "cpu") -> torch.nn.Module:
    """MONAI ``AutoencoderKlMaisi`` with the preset's hyper-parameters, on ``device``, eval mode."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        AutoencoderKlMaisi,
    )

    device = torch.device(device)
    kwargs = _network_kwargs(preset.autoencoder)
    kwargs["num_splits"] = 1
    kwargs["norm_float16"] = False
    network = configure_for_device(AutoencoderKlMaisi(**kwargs), preset.autoencoder, device)
    return network.to(device).eval()


def build_diffusion_unet(preset: ModelPreset, device: torch.device | str = "cpu",
                         attention: str = "sdpa", forward: str = "lean") -> torch.nn.Module:
    """MONAI ``DiffusionModelUNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode;
    ``attention``: ``sdpa`` (default) or ``monai`` (MONAI's N × N attention); ``forward``: ``lean``
    (default, ``set_lean_forward``) or ``monai`` (MONAI's forward)."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
        DiffusionModelUNetMaisi,
    )

    device = torch.device(device)
    network = DiffusionModelUNetMaisi(**_network_kwargs(preset.diffusion_unet))
    return configure_for_device(network, preset.diffusion_unet, device, attention, forward).to(device).eval()


def build_controlnet(preset: ModelPreset, device: torch.device | str = "cpu",
                     attention: str = "sdpa", forward: str = "lean") -> torch.nn.Module:
    """MONAI ``ControlNetMaisi`` with the preset's hyper-parameters, on ``device``, eval mode;
    ``attention`` and ``forward`` as ``build_diffusion_unet``."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    if preset.controlnet is None:
        raise ValueError(f"{preset.key} is an image-only model: it has no ControlNet")
    device = torch.device(device)
    kwargs = _network_kwargs(preset.controlnet)
    kwargs["use_checkpointing"] = False
    network = ControlNetMaisi(**kwargs)
    return configure_for_device(network, preset.controlnet, device, attention, forward).to(device).eval()


def build_scheduler(preset: ModelPreset):
    """A fresh MONAI noise scheduler (``RFlowScheduler`` or ``DDPMScheduler``) as the model was trained."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    cls = {"rflow": RFlowScheduler, "ddpm": DDPMScheduler}[preset.scheduler.kind]
    return cls(**preset.scheduler.kwargs)


def build_mask_networks(preset, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The mask autoencoder (MONAI ``AutoencoderKlMaisi``) and mask diffusion UNet (MONAI
    ``DiffusionModelUNet``) of a ``presets.MaskGenerationPreset``, on ``device``, eval mode. As for
    the image networks only weight-free settings are adapted: no activation checkpointing, the VAE
    unsplit and its float16 norm and the UNet's flash attention only on CUDA."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    device = torch.device(device)
    cuda = device.type == "cuda"
    autoencoder = dict(preset.autoencoder, num_splits=1, use_checkpointing=False,
                       norm_float16=preset.autoencoder["norm_float16"] and cuda)
    unet = dict(preset.diffusion_unet, use_flash_attention=preset.diffusion_unet["use_flash_attention"] and cuda)
    return AutoencoderKlMaisi(**autoencoder).to(device).eval(), DiffusionModelUNet(**unet).to(device).eval()
