"""The UNet as the fast path runs it: fused modules built from a loaded `fastdiff.models.UNet2DConditionModel`.

    fast = FastUNet(unet, FastConfig())     # converts unet in place (dtype, channels_last), shares its parameters
    out = fast(sample, timestep, context)   # what unet(sample, timestep, context) computes, on fused kernels

Every class here is built from its reference twin in `fastdiff.models.unet` and holds that twin's own submodules
(the same nn.Linear, nn.Conv2d and norm objects, so the same parameters and state-dict keys); only the forward
differs. What it does differently, and why:

  convolution biases  the convs run without their bias, which the next pass adds as it reads: conv1's joins
                      the time embedding as norm2's per-(sample, channel) offset, conv2's and the 1x1
                      shortcut's the residual add (`ops.residual_add`), conv_in's and the downsamplers' a
                      vectorized bias pass (PyTorch's own bias add after a cuDNN conv is not vectorized).
  GroupNorm sums      the kernels that write a GroupNorm's input (residual adds, skip concatenations, bias
                      passes) also sum it for that norm, which then only normalizes (`ops.residual_add_sums`,
                      `ops.channel_cat_sums`); the sums travel from producer to consumer as return values.
  time features       every ResNet block's time projection (and conv1 bias) in one matmul, computed once per
                      timestep (`FastUNet.time_features`) and read by each block as its columns. SDXL's added
                      conditioning joins the time embedding there, embedded once per prompt (`FastUNet.add_embed`).
  attention           fused q/k/v (self) and k/v (cross) projections; the context's K/V computed once per
                      prompt (`project_context`); the implementation picked per head dim by `ops.attention_impl`.
  transformer biases  to_out's and proj_in's biases added in the LayerNorm passes after them, the MLP output
                      accumulated in place onto a stream that already holds its bias (`fold_biases`); GEGLU's
                      gate, and proj_out's residual, in a Triton matmul's epilogue (`linear_epilogues`).
  upsampling          nearest 2x + conv3x3 as a 2x2 conv of the small image and a shuffle (`FastUpsample`).
  shared sample       with guidance the B latents meet the 2B [uncond; cond] contexts: the layers before the
                      first cross-attention run on B rows, not 2B (`FastUNet.forward`); not with SDXL's added
                      conditioning, which differs per context row and reaches every ResNet block.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastdiff import ops
from fastdiff.kernels.subpixel import subpixel_weight
from fastdiff.models.unet import (Attention, BasicTransformerBlock, DownBlock, FeedForward, ResnetBlock2D,
                                  Transformer2DModel, UNet2DConditionModel, UNetMidBlock2DCrossAttn, UpBlock,
                                  added_embedding, split_heads, timestep_embedding, timesteps_of)
from fastdiff.models.unet import pointwise as reference_pointwise

from .config import FastConfig

Sums = Optional[Tensor]  # a GroupNorm's statistics, summed by the kernel that wrote its input (or None)


# ---- fused building blocks (shared with the VAE's fast modules) -------------------------------------------------

@torch.no_grad()
def concat_as_views(modules: list[nn.Module], name: str) -> Tensor:
    """torch.cat of the modules' parameter `name` along dim 0, each parameter's data then made a view of its rows
    of the result: the same Parameter objects (whoever holds them shares the change), the same state-dict keys, no
    second copy, and `load_state_dict` afterwards still writes into the concatenation. Parameters that already lie
    one after another in one storage (fused before, by another engine) are not moved: their span is returned.
    Convert dtype or device before, not after (the views would split from it)."""
    params = [getattr(m, name) for m in modules]
    first = params[0]
    shape = (sum(p.shape[0] for p in params), *first.shape[1:])
    offsets = [first.storage_offset()]
    for p in params[:-1]:
        offsets.append(offsets[-1] + p.numel())
    if all(p.is_contiguous() and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and p.storage_offset() == offset and p.dtype == first.dtype and p.shape[1:] == first.shape[1:]
           for p, offset in zip(params, offsets)):
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)
    fused = torch.cat(params)
    start = 0
    for p in params:
        p.data = fused[start:start + p.shape[0]]
        start += p.shape[0]
    return fused


def copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are the original's own objects: the copy's submodules
    can be replaced without touching the original's, and nothing is stored twice."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def replace_modules(root: nn.Module, replacements: dict[type, Callable[[nn.Module], nn.Module]]) -> None:
    """Replace, in place, every submodule of `root` whose type is a key of `replacements` by what its value makes
    of it."""
    for parent in list(root.modules()):
        for name, child in parent.named_children():
            make = replacements.get(type(child))
            if make is not None:
                setattr(parent, name, make(child))


def group_norm(norm: nn.GroupNorm, x: Tensor, activation: Optional[str] = None, offset: Optional[Tensor] = None,
               sums: Sums = None) -> Tensor:
    """The nn.GroupNorm `norm` through the ops seam, fused with the SiLU after it (activation="silu"), over
    x + offset[:, :, None, None] for an offset (B, C); sums: x's statistics from the kernel that wrote it."""
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation=activation, offset=offset,
                          sums=sums)


def residual_add(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
                 x_bias: Optional[Tensor] = None, sum_groups: Optional[int] = None) -> tuple[Tensor, Sums]:
    """`ops.residual_add`; with `sum_groups` (and no `out`) it also sums its output for the GroupNorm of that
    many groups that reads it next: (out, sums or None)."""
    if sum_groups is not None and out is None:
        return ops.residual_add_sums(x, y, bias, x_bias, sum_groups)
    return ops.residual_add(x, y, bias, out=out, x_bias=x_bias), None


def conv(layer: nn.Conv2d, x: Tensor, split_k: bool = False) -> Tensor:
    """The nn.Conv2d `layer` without its bias (the caller adds it in a later pass over the output); with
    split_k through `ops.conv2d`, whose Triton split-K kernel takes the convolutions with few output pixels."""
    if split_k:
        return ops.conv2d(x, layer.weight, layer.stride[0], layer.padding[0])
    return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def biased_conv(layer: nn.Conv2d, x: Tensor, bias_pass: bool, sum_groups: Optional[int] = None
                ) -> tuple[Tensor, Sums]:
    """layer(x); with bias_pass the conv runs without its bias and one vectorized pass adds it (and sums the
    output for the next GroupNorm, `sum_groups`)."""
    if bias_pass and layer.bias is not None:
        return residual_add(None, conv(layer, x), layer.bias, sum_groups=sum_groups)
    return layer(x), None


def is_channels_last(x: Tensor) -> bool:
    """Whether 4-D x is stored channels_last (and not also contiguous, as one channel or one pixel is)."""
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous() and not x.is_contiguous()


def skip_add(x: Tensor, h: Tensor, conv2: nn.Conv2d, shortcut: Optional[nn.Conv2d], out: Optional[Tensor] = None,
             sum_groups: Optional[int] = None) -> tuple[Tensor, Sums]:
    """The end of a ResNet block (UNet's or VAE's) whose conv2 ran without its bias: x (through the 1x1
    `shortcut` when there is one) + h + conv2's bias, in one pass, written to `out` when given. The shortcut runs
    without its bias, which the same pass adds: in channels_last memory as a matmul over the pixels' channel
    vectors (`ops.matmul`; cuBLAS's bias epilogue is slow), else as a conv."""
    if shortcut is None:
        return residual_add(x, h, conv2.bias, out, sum_groups=sum_groups)
    if is_channels_last(x):
        skip = ops.matmul(x.permute(0, 2, 3, 1), shortcut.weight.flatten(1)).permute(0, 3, 1, 2)
    else:
        skip = conv(shortcut, x)
    return residual_add(skip, h, conv2.bias, out, shortcut.bias, sum_groups)


def tile(t: Tensor, batch: int) -> Tensor:
    """t (b, ...) -> (batch, ...) = [t; t; ...] for a batch that is a multiple of b, in t's memory layout (cat
    keeps channels_last); t itself when it has the batch already."""
    return t if t.shape[0] == batch else torch.cat([t] * (batch // t.shape[0]))


class FastUpsample(nn.Module):
    """Nearest upsampling, then the reference's conv3x3 (the UNet's and the VAE's Upsample2D).

    With `subpixel`, a 2x upsampling of channels_last x runs as a 2x2 convolution of x with four phases of output
    channels, then a shuffle of the phases into place with the bias (`fastdiff.kernels.subpixel`): 4/9 of the
    FLOPs, and the upsampled input is never written. The 2x2 weights are derived from `conv.weight` and derived
    again, in place (CUDA graphs that read them see the change), when that weight changed (`subpixel_weight`)."""

    def __init__(self, upsample: nn.Module, subpixel: bool):
        super().__init__()
        self.conv = upsample.conv
        self.subpixel = subpixel
        self._derived: Optional[tuple[tuple, Tensor]] = None  # (what conv.weight was, its 2x2 form)

    @torch.no_grad()
    def subpixel_weight(self) -> Tensor:
        """conv.weight's 2x2 phases (4 * C, C, 2, 2), derived again if the weight was replaced or written to
        since (its address, version counter or dtype changed: `load_state_dict`, `.to()`)."""
        w = self.conv.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._derived is None or self._derived[0] != key:
            fresh = subpixel_weight(w)
            kept = None if self._derived is None else self._derived[1]
            if kept is not None and (kept.shape, kept.stride(), kept.dtype, kept.device) == \
                    (fresh.shape, fresh.stride(), fresh.dtype, fresh.device):
                fresh = kept.copy_(fresh)
            self._derived = (key, fresh)
        return self._derived[1]

    def forward(self, x: Tensor, size: Optional[torch.Size] = None) -> Tensor:
        """x: (B, C, H, W) -> (B, C, *size), or (B, C, 2H, 2W) without a size."""
        size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else tuple(size)
        if self.subpixel and size == (2 * x.shape[-2], 2 * x.shape[-1]) and is_channels_last(x):
            return ops.subpixel_shuffle(F.conv2d(x, self.subpixel_weight(), None, 1, 1), self.conv.bias)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---- the UNet's fused modules ------------------------------------------------------------------------------------

class FastResnetBlock(nn.Module):
    """ResnetBlock2D with its convolutions' biases folded into the passes after them.

    temb: `FastUNet.time_features`, SiLU of the time embedding (B or 1, 4 * C0), or once the UNet's time
    projections are fused every block's norm2 offset (B or 1, sum of Cout), of which this block reads the columns
    `time_offsets`. The block sums its output for the GroupNorm of `sum_groups` groups that reads it next."""

    def __init__(self, block: ResnetBlock2D, config: FastConfig):
        super().__init__()
        self.norm1, self.conv1, self.time_emb_proj = block.norm1, block.conv1, block.time_emb_proj
        self.norm2, self.dropout, self.conv2 = block.norm2, block.dropout, block.conv2
        self.conv_shortcut = block.conv_shortcut
        self.split_k = config.split_k_conv
        self.time_offsets: Optional[slice] = None  # set by FastUNet when it fuses the time projections
        self.sum_groups: Optional[int] = None  # set by FastUNet's chain of producers and norms

    def forward(self, x: Tensor, temb: Tensor, sums: Sums = None) -> tuple[Tensor, Sums]:
        """x: (B, Cin, H, W), sums: x's statistics for norm1 -> ((B, Cout, H, W), its sums or None)."""
        h = conv(self.conv1, group_norm(self.norm1, x, "silu", sums=sums), self.split_k)
        if self.time_offsets is None:
            offset = self.time_emb_proj(temb) + self.conv1.bias  # (B or 1, Cout)
        else:
            offset = temb[:, self.time_offsets]
        # h + offset[:, :, None, None] is normed; one row shared by every sample is read at row stride 0
        offset = offset.expand(h.shape[0], -1)
        h = conv(self.conv2, self.dropout(group_norm(self.norm2, h, "silu", offset=offset)), self.split_k)
        return skip_add(x, h, self.conv2, self.conv_shortcut, sum_groups=self.sum_groups)


class FastDownsample(nn.Module):
    """Downsample2D's stride-2 conv with its bias in a vectorized pass (`conv_bias_pass`) that also sums for the
    next GroupNorm."""

    def __init__(self, downsample: nn.Module, config: FastConfig):
        super().__init__()
        self.conv = downsample.conv
        self.bias_pass = config.conv_bias_pass
        self.sum_groups: Optional[int] = None  # set by FastUNet's chain

    def forward(self, x: Tensor) -> tuple[Tensor, Sums]:
        return biased_conv(self.conv, x, self.bias_pass, self.sum_groups)


class FastAttention(nn.Module):
    """Attention with fused projections and an attention implementation picked for its head dim.

    Fused: one matmul makes q, k and v (self-attention) or k and v (cross-attention), `fused_weight`, of which
    to_q/to_k/to_v's weights are views. Cross-attention keeps the K/V projection of a context computed ahead
    (`project_context`), by the context tensor's identity."""

    def __init__(self, attention: Attention, config: FastConfig):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = attention.to_q, attention.to_k, attention.to_v, attention.to_out
        self.heads = attention.heads
        self.is_cross_attention = attention.is_cross_attention
        self.scale = attention.head_dim ** -0.5
        preference = config.cross_attention if self.is_cross_attention else config.self_attention
        self.attend = ops.attention_impl(preference, attention.head_dim)
        # (3 * dim, dim) [q; k; v] for self-attention, (2 * dim, context_dim) [k; v] for cross-attention; not in
        # the state dict (to_q/to_k/to_v keep their keys, as views into it)
        parts = (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)
        self.register_buffer("fused_weight", concat_as_views(list(parts), "weight")
                             if config.fuse_projections else None, persistent=False)
        self.projected: dict[int, tuple[Tensor, Tensor]] = {}  # id(context) -> (context, its K/V projection)

    @torch.no_grad()
    def project_context(self, context: Tensor) -> None:
        """Cross-attention with fused projections: compute context's K/V projection now and keep it, so that
        later calls given this same tensor (`is`, not equal values) skip the matmul. Called again with the same
        tensor (after new values were written into it), it recomputes the projection into the same memory: CUDA
        graphs captured reading it see the new values."""
        if not self.is_cross_attention or self.fused_weight is None:
            raise ValueError("project_context needs a cross-attention with fused projections "
                             "(FastConfig(fuse_projections=True))")
        kept = self.projected.get(id(context))
        shape = (*context.shape[:-1], self.fused_weight.shape[0])
        if kept is not None and kept[0] is context and kept[1].shape == shape and kept[1].dtype == context.dtype:
            torch.matmul(context, self.fused_weight.t(), out=kept[1])  # in place: one kernel, no copy after it
        else:
            self.projected[id(context)] = (context, F.linear(context, self.fused_weight))

    def _context_kv(self, context: Tensor) -> Tensor:
        """context's fused K/V projection (B, T, 2 * dim): the one `project_context` kept, else computed."""
        kept = self.projected.get(id(context))
        if kept is not None and kept[0] is context:
            return kept[1]
        return F.linear(context, self.fused_weight)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, out_bias: bool = True) -> Tensor:
        """x: (B, S, dim); context: (B, T, context_dim), or None to attend over x -> (B, S, dim).
        out_bias=False leaves to_out's bias out, for a caller that adds it in its next pass."""
        if self.fused_weight is None:
            context = x if context is None else context
            q = split_heads(self.to_q(x), self.heads)  # (B, H, S, D)
            k = split_heads(self.to_k(context), self.heads)  # (B, H, T, D)
            v = split_heads(self.to_v(context), self.heads)  # (B, H, T, D)
        elif self.is_cross_attention:
            q = split_heads(pointwise(self.to_q, x), self.heads)  # (B, H, S, D)
            kv = self._context_kv(context).unflatten(-1, (2, self.heads, -1))  # (B, T, 2, H, D)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views
        else:
            qkv = ops.matmul(x, self.fused_weight).unflatten(-1, (3, self.heads, -1))  # (B, S, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D) views
        out = self.attend(q, k, v, self.scale).transpose(1, 2).flatten(2)  # (B, S, H * D)
        return self.to_out[1](pointwise(self.to_out[0], out, bias=out_bias))


class FastFeedForward(nn.Module):
    """FeedForward (GEGLU to 4x the width, then back) with its gate and residual add fused.

    fuse_geglu: value * GELU(gate) in one pass over the projection's output (`ops.geglu`); linear_epilogues: the
    gate in the projection's own Triton matmul, and the residual in the output Linear's (`ops.linear`)."""

    def __init__(self, ff: FeedForward, config: FastConfig):
        super().__init__()
        self.net = ff.net  # [GEGLU (its `proj`), Dropout, Linear]: diffusers' keys
        self.fuse_geglu = config.fuse_geglu
        self.linear_epilogue = config.linear_epilogues

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, residual_has_bias: bool = False) -> Tensor:
        """x: (B, S, dim) -> residual + MLP(x), or MLP(x) without a residual. residual_has_bias: the residual
        (contiguous) already holds the output Linear's bias, so that Linear accumulates onto it in place, one cuBLAS
        GEMM with C = residual; the residual's memory is overwritten and returned."""
        geglu, dropout, out = self.net
        if self.linear_epilogue:
            h = ops.linear(x, geglu.proj.weight, geglu.proj.bias, geglu=True)
        elif self.fuse_geglu:
            h = ops.geglu(geglu.proj(x))
        else:
            h = geglu(x)
        h = dropout(h)
        if residual_has_bias:
            return ops.matmul(h, out.weight, out=residual, accumulate=True)
        if residual is not None and self.linear_epilogue:
            return ops.linear(h, out.weight, out.bias, residual=residual)
        h = out(h)
        return h if residual is None else residual + h


def layer_norm(norm: nn.LayerNorm, x: Tensor, residual: Optional[Tensor] = None,
               residual_bias: Optional[Tensor] = None, stream_bias: Optional[Tensor] = None, copies: int = 1):
    """The nn.LayerNorm `norm` through the ops seam: LayerNorm(x), or with `residual` and/or `residual_bias` (C,)
    the pair (s + stream_bias, LayerNorm(s)) for s = x + residual + residual_bias, each repeated `copies` times
    along dim 0 (see ops.add_layer_norm)."""
    if residual is None and residual_bias is None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, residual_bias, stream_bias, copies)


class FastBasicTransformerBlock(nn.Module):
    """BasicTransformerBlock whose residual adds are one pass each with the LayerNorm after them.

    fold_biases: the attentions' to_out biases join those residual adds, and the MLP output's bias is added to
    the stream the MLP adds onto, whose output Linear then accumulates onto it in place: cuBLAS's GEMM with a bias
    was up to 1.55x slower than without one at SD's widths on an H200."""

    def __init__(self, block: BasicTransformerBlock, config: FastConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = block.norm1, block.norm2, block.norm3
        self.attn1, self.attn2 = FastAttention(block.attn1, config), FastAttention(block.attn2, config)
        self.ff = FastFeedForward(block.ff, config)
        self.fold_biases = config.fold_biases

    def forward(self, x: Tensor, context: Tensor, x_bias: Optional[Tensor] = None) -> Tensor:
        """x: (B, S, dim); context: (B', T, cross_attention_dim) -> (B', S, dim), B' a multiple of B (a shared
        sample parts into the contexts' rows here). x_bias: (dim,), a bias x still lacks (proj_in's, which a
        transformer with fold_biases leaves to its first block), or None."""
        if x_bias is None:
            h = layer_norm(self.norm1, x)
        else:
            x, h = layer_norm(self.norm1, x, residual_bias=x_bias)
        fold = self.fold_biases
        # the norm pass writes its outputs once per context row block ([x; x; ...])
        x, h = layer_norm(self.norm2, x, self.attn1(h, out_bias=not fold), _out_bias(self.attn1, fold),
                          copies=context.shape[0] // x.shape[0])
        x, h = layer_norm(self.norm3, x, self.attn2(h, context, out_bias=not fold), _out_bias(self.attn2, fold),
                          stream_bias=self.ff.net[2].bias if fold else None)
        return self.ff(h, residual=x, residual_has_bias=fold)


def _out_bias(attention: FastAttention, folded: bool) -> Optional[Tensor]:
    """The bias an attention left out of its to_out matmul (`folded`), for the residual add to add; else None."""
    return attention.to_out[0].bias if folded else None


def pointwise(layer: Union[nn.Linear, nn.Conv2d], tokens: Tensor, bias: bool = True) -> Tensor:
    """The reference's `pointwise` (a Linear or a 1x1 Conv2d on tokens (B, S, Cin) -> (B, S, Cout)), or with
    bias=False (or no bias) one `ops.matmul` without it."""
    if bias and layer.bias is not None:
        return reference_pointwise(layer, tokens)
    return ops.matmul(tokens, layer.weight.flatten(1))


class FastTransformer2DModel(nn.Module):
    """Transformer2DModel with proj_in's bias folded into the first block and proj_out's residual add fused."""

    def __init__(self, transformer: Transformer2DModel, config: FastConfig):
        super().__init__()
        self.norm, self.proj_in, self.proj_out = transformer.norm, transformer.proj_in, transformer.proj_out
        self.transformer_blocks = nn.ModuleList(FastBasicTransformerBlock(b, config)
                                                for b in transformer.transformer_blocks)
        self.linear_epilogue = config.linear_epilogues
        self.fold_biases = config.fold_biases
        self.sum_groups: Optional[int] = None  # set by FastUNet's chain

    def forward(self, x: Tensor, context: Tensor, sums: Sums = None) -> tuple[Tensor, Sums]:
        """x: (B, C, H, W), sums: x's statistics for the norm; context: (B', T, cross_attention_dim), B' a multiple
        of B -> ((B', C, H, W), its sums or None)."""
        b, c, h, w = x.shape
        tokens = group_norm(self.norm, x, sums=sums).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = pointwise(self.proj_in, tokens, bias=not self.fold_biases)
        for i, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, context, x_bias=self.proj_in.bias if self.fold_biases and i == 0 else None)
        if self.linear_epilogue and x.shape[0] == tokens.shape[0] and x.is_contiguous(
                memory_format=torch.channels_last):  # x's (B, H, W, C) memory is the residual's (B, HW, C)
            residual = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
            tokens = ops.linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias, residual=residual)
            return tokens.view(b, h, w, c).permute(0, 3, 1, 2), None
        if x.shape[0] != tokens.shape[0] and is_channels_last(x):  # the blocks parted a shared sample's rows
            # proj_out without its bias, then one pass adds the bias and x, read once per row block (no tile)
            tokens = pointwise(self.proj_out, tokens, bias=False)
            return residual_add(x, tokens.view(-1, h, w, c).permute(0, 3, 1, 2), self.proj_out.bias,
                                sum_groups=self.sum_groups)
        tokens = pointwise(self.proj_out, tokens)  # (B', HW, C): B' > B once the blocks tiled a shared sample
        return tile(x, tokens.shape[0]) + tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2), None


def _fast_layers(block: Union[DownBlock, UNetMidBlock2DCrossAttn, UpBlock], config: FastConfig
                 ) -> tuple[nn.ModuleList, Optional[nn.ModuleList]]:
    """The fused twins of a block's ResNet blocks and of its transformers (None where it has none)."""
    resnets = nn.ModuleList(FastResnetBlock(r, config) for r in block.resnets)
    if block.attentions is None:
        return resnets, None
    return resnets, nn.ModuleList(FastTransformer2DModel(t, config) for t in block.attentions)


class FastDownBlock(nn.Module):
    def __init__(self, block: DownBlock, config: FastConfig):
        super().__init__()
        self.resnets, self.attentions = _fast_layers(block, config)
        self.downsamplers = None if block.downsamplers is None else nn.ModuleList(
            [FastDownsample(block.downsamplers[0], config)])

    def forward(self, x: Tensor, sums: Sums, temb: Tensor, context: Tensor) -> tuple[Tensor, Sums, list[Tensor]]:
        """As DownBlock's forward, passing each output's GroupNorm sums on: -> (x, its sums, the skips)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x, sums = resnet(x, temb, sums)
            if self.attentions is not None:
                x, sums = self.attentions[i](x, context, sums)
            skips.append(x)
        if self.downsamplers is not None:
            x, sums = self.downsamplers[0](x)
            skips.append(x)
        return x, sums, skips


class FastMidBlock(nn.Module):
    def __init__(self, block: UNetMidBlock2DCrossAttn, config: FastConfig):
        super().__init__()
        self.resnets, self.attentions = _fast_layers(block, config)

    def forward(self, x: Tensor, sums: Sums, temb: Tensor, context: Tensor) -> Tensor:
        x, sums = self.resnets[0](x, temb, sums)
        x, sums = self.attentions[0](x, context, sums)
        return self.resnets[1](x, temb, sums)[0]


class FastUpBlock(nn.Module):
    """UpBlock whose skip concatenations sum for the next ResNet block's norm1 (`sum_concats`)."""

    def __init__(self, block: UpBlock, config: FastConfig):
        super().__init__()
        self.resnets, self.attentions = _fast_layers(block, config)
        self.upsamplers = None if block.upsamplers is None else nn.ModuleList(
            [FastUpsample(block.upsamplers[0], config.subpixel_upsample)])
        self.sum_concats = False  # set by FastUNet's chain

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                upsample_size: Optional[torch.Size]) -> Tensor:
        """As UpBlock's forward. Skips taken before a shared sample's rows parted keep their B rows:
        ops.channel_cat repeats them."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            if self.sum_concats:
                x, sums = ops.channel_cat_sums(x, skip, resnet.norm1.num_groups)
            else:
                x, sums = ops.channel_cat(x, skip), None
            x, sums = resnet(x, temb, sums)
            if self.attentions is not None:
                x, _ = self.attentions[i](x, context, sums)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class FastUNet(nn.Module):
    """A UNet2DConditionModel on the fast path: forward(sample, timestep, context) (SDXL's: also text_embeds,
    time_ids) computes what the reference does, on fused kernels, with two more ways in (`temb`, `out_dtype`) and
    a shared sample (see forward).

    Building it converts the reference UNet in place (dtype, channels_last, fused projections as views of its
    parameters); the reference stays a working module over the same weights."""

    def __init__(self, unet: UNet2DConditionModel, config: Optional[FastConfig] = None):
        super().__init__()
        config = config or FastConfig()
        if config.dtype is not None:
            unet.to(config.dtype)
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)  # 4-D weights only: the convolutions
        self.config = unet.config
        self.conv_in, self.time_embedding = unet.conv_in, unet.time_embedding
        self.add_embedding = unet.add_embedding  # SDXL's added conditioning (`add_embed`); None for SD1/SD2
        self.down_blocks = nn.ModuleList(FastDownBlock(b, config) for b in unet.down_blocks)
        self.mid_block = FastMidBlock(unet.mid_block, config)
        self.up_blocks = nn.ModuleList(FastUpBlock(b, config) for b in unet.up_blocks)
        self.conv_norm_out, self.conv_out = unet.conv_norm_out, unet.conv_out
        self.conv_in_bias_pass = config.conv_bias_pass
        self.conv_out_split_k = config.split_k_conv  # its 4 output channels: `prefers_split_k`'s narrow case
        self.conv_in_sum_groups: Optional[int] = None
        # found once: walking the UNet's ~700 modules took 0.5 ms of host time on a 2-core CPU
        self.resnet_blocks = [m for m in self.modules() if isinstance(m, FastResnetBlock)]
        self.cross_attentions = [m for m in self.modules() if isinstance(m, FastAttention) and m.is_cross_attention]
        self.subpixel_upsamplers = [m for m in self.modules() if isinstance(m, FastUpsample) and m.subpixel]
        # Every ResNet block's time_emb_proj weight (sum of Cout, 4 * C0) and bias, and its conv1 bias, fused
        # (each block's parameters views into them); not in the state dict.
        self.register_buffer("fused_time_weight", None, persistent=False)
        self.register_buffer("fused_time_bias", None, persistent=False)
        self.register_buffer("fused_conv1_bias", None, persistent=False)
        if config.fuse_projections:
            self._fuse_time_projections()
        self._sum_for_group_norms(config.group_sums and config.channels_last and config.compile is None)

    @torch.no_grad()
    def _fuse_time_projections(self) -> None:
        """Make the time projections of all ResNet blocks one matmul: every block's norm2 offset
        (time_emb_proj(temb) + conv1.bias) at once, two kernels instead of two per block (44 for SD1.5)."""
        projections = [r.time_emb_proj for r in self.resnet_blocks]
        self.fused_time_weight = concat_as_views(projections, "weight")
        self.fused_time_bias = concat_as_views(projections, "bias")
        self.fused_conv1_bias = concat_as_views([r.conv1 for r in self.resnet_blocks], "bias")
        start = 0
        for r in self.resnet_blocks:
            r.time_offsets = slice(start, start + r.time_emb_proj.out_features)
            start = r.time_offsets.stop

    def _sum_for_group_norms(self, enabled: bool) -> None:
        """Have every kernel whose output goes straight into a GroupNorm also sum that output for the norm, so
        that the norm runs only its normalizing pass. The down path and the middle run as one chain of modules:
        each one that a ResNet block (its norm1) or a transformer (its norm) follows sums for it. In the up path
        each skip concatenation sums for its ResNet block's norm1, and each ResNet block for its transformer's
        norm. A producer sums only where its kernel is a summing one (`ops.residual_add_sums`,
        `ops.channel_cat_sums`): conv_in and the downsamplers with their bias pass, a ResNet block's residual
        add, a transformer's where its rows part a shared sample."""
        if not enabled:
            return
        chain: list[Optional[nn.Module]] = [self]  # conv_in's bias pass: the UNet's own
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                chain.append(resnet)
                if block.attentions is not None:
                    chain.append(block.attentions[i])
            if block.downsamplers is not None:
                chain.append(block.downsamplers[0])
        mid = self.mid_block
        chain += [mid.resnets[0], mid.attentions[0], mid.resnets[1], None]
        for producer, consumer in zip(chain, chain[1:]):
            norm = consumer.norm1 if isinstance(consumer, FastResnetBlock) else getattr(consumer, "norm", None)
            groups = None if norm is None else norm.num_groups
            if producer is self:
                self.conv_in_sum_groups = groups
            else:
                producer.sum_groups = groups
        for block in self.up_blocks:
            block.sum_concats = True
            for i, resnet in enumerate(block.resnets):
                resnet.sum_groups = None if block.attentions is None else block.attentions[i].norm.num_groups

    def project_context(self, context: Tensor) -> None:
        """Compute every cross-attention's K/V projection of `context` (B, T, cross_attention_dim) now and keep
        them (`FastAttention.project_context`): forwards given this same tensor skip 16 matmuls (SD1.5) per step."""
        for module in self.cross_attentions:
            module.project_context(context)

    def forget_contexts(self) -> None:
        """Drop every projection `project_context` kept (and with them the contexts they were kept for)."""
        for module in self.cross_attentions:
            module.projected.clear()

    def add_embed(self, text_embeds: Optional[Tensor], time_ids: Optional[Tensor]) -> Optional[Tensor]:
        """SDXL's added conditioning (`fastdiff.models.unet.added_embedding`): text_embeds (R, P), time_ids (R, N)
        -> (R, 4 * C0), for `time_features`; None for a UNet without an add embedding, which takes neither. Constant
        over a sampling loop, like the context: computed once per prompt."""
        return added_embedding(self.add_embedding, self.config, text_embeds, time_ids)

    def time_features(self, timestep: Union[int, float, Tensor], batch: int, device: torch.device,
                      dtype: torch.dtype, add_embeds: Optional[Tensor] = None) -> Tensor:
        """What the ResNet blocks take from the timestep (`temb`): SiLU of the time embedding, (B or 1, 4 * C0),
        or with fused time projections every block's norm2 offset, (B or 1, sum of the blocks' Cout). It depends
        on the timestep alone (and SDXL's conditioning, below), so a caller that knows the timesteps ahead may
        compute it for all of them at once and pass rows to `forward`.

        add_embeds: `add_embed`'s output (R, 4 * C0), required for a UNet with an add embedding (SDXL) and refused
        for one without; it joins the time embedding before the SiLU, so the features then depend on the
        conditioning too, one row per conditioning row: (R, width), the timesteps (1 or R of them) broadcast."""
        if (add_embeds is None) != (self.add_embedding is None):
            raise ValueError("this UNet's time features need add_embeds, its `add_embed(text_embeds, time_ids)`"
                             if add_embeds is None else "add_embeds given, but this UNet has no add embedding")
        t = timesteps_of(timestep, batch, device)  # (B,), or (1,) when shared
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(dtype)  # (B or 1, C0)
        emb = self.time_embedding(t_emb)  # (B or 1, 4 * C0)
        if add_embeds is not None:
            if add_embeds.dim() != 2 or emb.shape[0] not in (1, add_embeds.shape[0]):
                raise ValueError(f"add_embeds must be (R, {emb.shape[1]}) for 1 timestep or R of them, got shape "
                                 f"{tuple(add_embeds.shape)} for {emb.shape[0]} timesteps")
            emb = emb + add_embeds  # (R, 4 * C0)
        temb = F.silu(emb)  # every ResNet block starts with it: once here
        if self.fused_time_weight is not None:
            temb = F.linear(temb, self.fused_time_weight, self.fused_time_bias) + self.fused_conv1_bias
        return temb

    def forward(self, sample: Tensor, timestep: Union[int, float, Tensor, None], context: Tensor,
                temb: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                text_embeds: Optional[Tensor] = None, time_ids: Optional[Tensor] = None) -> Tensor:
        """sample: (B, in_channels, h, w); timestep: as the reference takes it; context: (B, T, D); text_embeds
        (B, P) and time_ids (B, N): SDXL's added conditioning, as the reference takes it -> (B, out_channels, h, w).
        temb: `time_features` of the timestep (and of the added conditioning), computed ahead, (B or 1, width); the
        timestep, text_embeds and time_ids are then not read (None allowed). out_dtype: the output in that dtype
        and contiguous, conv_out's bias added in the same pass (one kernel where a cast and a copy would follow).

        Shared sample: context may hold r * B rows when the timestep is shared. The result is then
        forward(cat([sample] * r), timestep, context), (r * B, out_channels, h, w), as classifier-free guidance
        asks with r = 2 ([uncond; cond] contexts, one latent). Everything before the first cross-attention
        depends on the sample alone, so it runs once per sample instead of r times, and the rows part there
        (at SD1.5's 64x64 level: conv_in, a ResNet block, a self-attention and their norms). With an add embedding
        text_embeds and time_ids have r * B rows, one per context row, as temb may: the time features then differ
        per row, and so does every ResNet block's output, so the sample is tiled at the start instead."""
        batch, rows = sample.shape[0], context.shape[0]
        if rows % batch:
            raise ValueError(f"context has {rows} rows, expected a multiple of sample's batch {batch} "
                             f"(sample {tuple(sample.shape)}, context {tuple(context.shape)})")
        shared = rows != batch
        if temb is None:
            t = timesteps_of(timestep, batch, sample.device)  # (B,), or (1,) when shared
            if shared and t.shape[0] != 1:
                raise ValueError(f"a sample shared by several contexts ({batch} samples, {rows} "
                                 f"contexts) needs one timestep for the batch, got shape {tuple(timestep.shape)}")
            added = self.add_embed(text_embeds, time_ids)
            if added is not None and added.shape[0] != rows:
                raise ValueError(f"text_embeds and time_ids have {added.shape[0]} rows, expected one per context "
                                 f"row ({rows})")
            temb = self.time_features(t, batch, sample.device, sample.dtype, added)
        else:
            # one row for the batch, or one per context row (per sample, unless the sample is shared, which only
            # an add embedding's per-row conditioning un-shares)
            allowed = sorted({1, rows}) if self.add_embedding is not None or not shared else [1]
            if temb.dim() != 2 or temb.shape[0] not in allowed:
                raise ValueError(f"temb must be {' or '.join(f'({n}, width)' for n in allowed)} for {batch} samples "
                                 f"and {rows} contexts, got shape {tuple(temb.shape)}")
        if shared and temb.shape[0] != 1:  # per-row conditioning: no layer's input is the same for every row
            sample = tile(sample, rows)

        x, sums = biased_conv(self.conv_in, sample, self.conv_in_bias_pass, self.conv_in_sum_groups)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, sums, block_skips = block(x, sums, temb, context)
            skips.extend(block_skips)
        x = tile(self.mid_block(x, sums, temb, context), context.shape[0])
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, not blindly 2x: odd sizes were rounded up on the way down.
            x = block(x, block_skips, temb, context, skips[-1].shape[-2:] if skips else None)
        h = group_norm(self.conv_norm_out, x, "silu")
        if out_dtype is None:
            return self.conv_out(h)
        if torch.is_grad_enabled() and (h.requires_grad or self.conv_out.bias.requires_grad):  # out= has no grad
            return self.conv_out(h).to(out_dtype, memory_format=torch.contiguous_format)
        y = conv(self.conv_out, h, self.conv_out_split_k)
        return torch.add(y, self.conv_out.bias[:, None, None], out=torch.empty(y.shape, dtype=out_dtype,
                                                                              device=y.device))
