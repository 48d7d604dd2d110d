"""The Stable Diffusion 1.x / 2.x denoiser (diffusers' UNet2DConditionModel), lean enough to read top to bottom.

    sample (B, 4, h, w), timestep, context (B, T, cross_attention_dim)
      timestep -> sinusoidal embedding (B, C0) -> time_embedding MLP -> temb (B, 4 * C0)
      conv_in                                                  (B, C0, h, w)
      down_blocks: per level, [ResnetBlock2D (+ Transformer2DModel)] x layers_per_block, then a stride-2
                   conv except at the last level; every output is kept as a skip
      mid_block:   ResnetBlock2D -> Transformer2DModel -> ResnetBlock2D
      up_blocks:   per level, [cat(x, skip) -> ResnetBlock2D (+ Transformer2DModel)] x (layers_per_block + 1),
                   then nearest 2x upsample + conv except at the last level
      GroupNorm+SiLU -> conv_out                               (B, 4, h, w)   == diffusers' `.sample`

A Transformer2DModel is GroupNorm -> proj_in -> [self-attention, cross-attention on the context, GEGLU MLP]
x transformer_layers_per_block -> proj_out, plus the input. "CrossAttn..." blocks have them, plain ones don't.

SD1 and SD2 differ only in settings: SD2 has `use_linear_projection` (proj_in/out are nn.Linear, SD1 has 1x1
convs), 1024-wide OpenCLIP context instead of CLIP's 768, and 64-wide heads at every level. Beware of
diffusers' naming: `attention_head_dim` is the number of HEADS (SD1: 8 at every level; SD2: [5, 10, 20, 20]),
the head size is channels // heads. diffusers keeps the name for old configs and so does this file.

Parameter names and state-dict keys are diffusers' exactly, so `load_state_dict(diffusers_unet.state_dict())`
works unchanged. Attention, GroupNorm(+SiLU), LayerNorm (with the residual add before it) and GEGLU run through
`fastdiff.ops`. The forward has no host synchronisation and no branch on tensor values, so a CUDA graph can
capture it (pass the timestep as a device tensor then).
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastdiff import ops

from ._fuse import concat_as_views

from ._config import read_settings

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel settings that fastdiff does not implement: each must keep a value that leaves
# the SD1/SD2 computation unchanged (diffusers' default, the one that switches the feature off).
_FIXED_SETTINGS: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),  # diffusers' get_activation maps both to SiLU
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None,),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),  # diffusers itself refuses it; the head count is attention_head_dim
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "addition_embed_type_num_heads": (64,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


def _per_level(value: Union[int, tuple[int, ...]], levels: int) -> tuple[int, ...]:
    """An int setting applies to every level; a tuple already has one entry per level."""
    return (value,) * levels if isinstance(value, int) else tuple(value)


@dataclass
class UNetConfig:
    """The fields of a diffusers unet/config.json that fastdiff supports. Defaults are diffusers'
    UNet2DConditionModel defaults, so a key missing from a config.json means the same thing here as there.
    "Level" below means one resolution of the UNet, highest first (one entry of block_out_channels)."""

    sample_size: Optional[Union[int, tuple[int, int]]] = None  # latent size at the training resolution (64 for
    #   512 px SD1, 96 for 768 px SD2); metadata for the pipeline's default size, the forward takes any size
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels out (the predicted noise or v)
    flip_sin_to_cos: bool = True  # timestep embedding order: [cos, sin] when True (SD), [sin, cos] when False
    freq_shift: int = 0  # embedding frequencies are exp(-ln(10000) * i / (C0 / 2 - freq_shift)); SD uses 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # per level, one of
    #   DOWN_BLOCK_TYPES: with or without transformers after the resnets
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # per level, LOWEST first
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level; C0 = the first
    layers_per_block: Union[int, tuple[int, ...]] = 2  # resnets per down level (up levels have one more)
    dropout: float = 0.0  # dropout in resnets, attention outputs and MLPs (training only; SD uses 0)
    norm_num_groups: int = 32  # GroupNorm groups everywhere; must divide every block_out_channels entry
    norm_eps: float = 1e-5  # eps of the resnet and output GroupNorms (transformers' GroupNorm uses 1e-6, their
    #   LayerNorms 1e-5, fixed in diffusers)
    cross_attention_dim: int = 1280  # context width: 768 for SD1 (CLIP ViT-L), 1024 for SD2 (OpenCLIP ViT-H)
    transformer_layers_per_block: Union[int, tuple[int, ...]] = 1  # BasicTransformerBlocks per transformer, per level
    attention_head_dim: Union[int, tuple[int, ...]] = 8  # the NUMBER OF HEADS per level, despite the name
    #   (diffusers' legacy naming): SD1 8, SD2 (5, 10, 20, 20); head size = channels // heads
    use_linear_projection: bool = False  # transformers' proj_in/proj_out: nn.Linear (SD2) or 1x1 nn.Conv2d (SD1)
    upcast_attention: bool = False  # compute attention scores and softmax in float32 (SD2.1 needs it in fp16).
    #   Always honoured: every fastdiff.ops.attention backend accumulates q k^T and the softmax in float32
    #   whatever this says (diffusers' default SDPA processor ignores the flag altogether)

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                     "transformer_layers_per_block", "attention_head_dim", "sample_size"):
            if isinstance(getattr(self, name), list):  # JSON gives lists; keep tuples so the config is hashable
                setattr(self, name, tuple(getattr(self, name)))
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels must name at least one level, got ()")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if len(types) != levels:
                raise ValueError(f"{name} must have one entry per block_out_channels entry ({levels}), got {types}")
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} entries must be one of {allowed}, got {bad}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            per_level = _per_level(value, levels)
            if len(per_level) != levels or not all(isinstance(v, int) and v >= 1 for v in per_level):
                raise ValueError(f"{name} must be a positive int or one positive int per level ({levels}), got "
                                 f"{value!r} (nested per-layer lists of asymmetric UNets are not supported)")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim must be an int (one context width for every level), "
                             f"got {self.cross_attention_dim!r}")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups must be an int, got {self.norm_num_groups!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups must divide every block_out_channels entry, "
                             f"got norm_num_groups={self.norm_num_groups} and channels {bad}")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads)):
            if channels % heads:
                raise ValueError(f"attention_head_dim (the head count) must divide the level's channels, "
                                 f"got {heads} heads for {channels} channels at level {level}")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers' `attention_head_dim`)."""
        return _per_level(self.attention_head_dim, len(self.block_out_channels))

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives."""
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """Read a diffusers unet/config.json dict: the fields above are read, every `_FIXED_SETTINGS` key
        must keep a neutral value (ValueError otherwise), other keys are ignored with a warning."""
        return cls(**read_settings(d, {f.name for f in fields(cls)}, _FIXED_SETTINGS, "UNet"))

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict: UNet2DConditionModel(**{k: v for k, v in d.items() if k[0] != "_"})
        builds the same network."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"_class_name": "UNet2DConditionModel", **d}


def _summed(x: Tensor, sums: Optional[Tensor]) -> Tensor:
    """x, carrying `sums`: the statistics that the kernel which wrote x made for the GroupNorm that reads x next
    (`ops.residual_add_sums`, `ops.channel_cat_sums`), which `_group_norm` hands to that norm. x's version
    counter is kept with them: a later in-place change to x voids them."""
    if sums is not None:
        x.group_sums = (x._version, sums)
    return x


def _group_norm(norm: nn.GroupNorm, x: Tensor, activation: Optional[str] = None,
                offset: Optional[Tensor] = None) -> Tensor:
    """Apply the nn.GroupNorm `norm` (which only holds the parameters and their keys) through the ops seam,
    fused with the SiLU that follows it when activation="silu", to x + offset[:, :, None, None] when an offset
    (B, C) is given (fused into the norm's reads of x on the Triton backend). Statistics that x's producer
    summed for it (`_summed`) spare the norm its own."""
    version, sums = getattr(x, "group_sums", (None, None))
    if sums is not None and (offset is not None or version != x._version or sums.shape[-1] != norm.num_groups):
        sums = None
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation=activation, offset=offset,
                          sums=sums)


def _residual_add(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
                  x_bias: Optional[Tensor] = None, sum_groups: Optional[int] = None) -> Tensor:
    """`ops.residual_add`; with `sum_groups` (and no `out`) it also sums its output for the GroupNorm of that
    many groups that reads it next (`_summed`)."""
    if sum_groups is not None and out is None:
        return _summed(*ops.residual_add_sums(x, y, bias, x_bias, sum_groups))
    return ops.residual_add(x, y, bias, out=out, x_bias=x_bias)


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The nn.Conv2d `conv` without its bias (the caller adds it inside a later pass over the output). With
    `conv.split_k` set (a plain attribute a fast path sets, `FastConfig.split_k_conv`) through `ops.conv2d`,
    whose Triton split-K kernel takes the convolutions with few output pixels (`prefers_split_k`)."""
    if getattr(conv, "split_k", False):
        return ops.conv2d(x, conv.weight, conv.stride[0], conv.padding[0])
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _biased_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x); where a fast path set `conv.bias_pass` (`FastConfig.conv_bias_pass`), the conv runs without its
    bias and one vectorized pass adds it (`ops.residual_add` without a residual): PyTorch adds a cuDNN conv's
    bias in a broadcast pass of its own that is not vectorized."""
    if getattr(conv, "bias_pass", False) and conv.bias is not None:
        return _residual_add(None, _conv(conv, x), conv.bias, sum_groups=getattr(conv, "sum_groups", None))
    return conv(x)


def _channels_last(x: Tensor) -> bool:
    """Whether 4-D x is stored channels_last (and not also contiguous, as one channel or one pixel is)."""
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous() and not x.is_contiguous()


def _skip_add(block: nn.Module, x: Tensor, h: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The end of a ResNet block (UNet's or VAE's) whose conv2 ran without its bias: x (through the block's 1x1
    conv_shortcut when it has one) + h + conv2's bias, in one pass (`ops.residual_add`), written to `out` when
    given. The 1x1 shortcut runs without its bias, which the same pass adds (`x_bias`): in channels_last memory
    as a matmul over the pixels' channel vectors (`ops.matmul`; cuBLAS's bias epilogue is slow), else as a conv."""
    sum_groups = getattr(block, "sum_groups", None)
    if block.conv_shortcut is None:
        return _residual_add(x, h, block.conv2.bias, out, sum_groups=sum_groups)
    shortcut = block.conv_shortcut
    if _channels_last(x):
        skip = ops.matmul(x.permute(0, 2, 3, 1), shortcut.weight.flatten(1)).permute(0, 3, 1, 2)
    else:
        skip = _conv(shortcut, x)
    return _residual_add(skip, h, block.conv2.bias, out, shortcut.bias, sum_groups)


def _layer_norm(norm: nn.LayerNorm, x: Tensor, residual: Optional[Tensor] = None,
                residual_bias: Optional[Tensor] = None, stream_bias: Optional[Tensor] = None, copies: int = 1):
    """Apply the nn.LayerNorm `norm` (which only holds the parameters and their keys) through the ops seam:
    LayerNorm(x), or with `residual` and/or `residual_bias` (C,) the pair (s + stream_bias, LayerNorm(s)) for
    s = x + residual + residual_bias, each repeated `copies` times along dim 0 (see ops.add_layer_norm)."""
    if residual is None and residual_bias is None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, residual_bias, stream_bias, copies)


def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding of DDPM (Ho et al. 2020), as diffusers' get_timestep_embedding.

    timesteps: (B,), any real dtype, may be fractional -> (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _timesteps(timestep: Union[int, float, Tensor], batch: int, device: torch.device) -> Tensor:
    """int, float, 0-d or (1,) tensor -> (1,): one timestep every sample shares (its time embedding is computed
    once and broadcast); (B,) tensor -> (B,), one per sample. On `device`. Only shapes are inspected, never
    values (no host synchronisation)."""
    if not torch.is_tensor(timestep):
        return torch.full((1,), float(timestep), dtype=torch.float32, device=device)
    if timestep.ndim > 1 or timestep.numel() not in (1, batch):
        raise ValueError(f"timestep must be a number, a 0-d tensor or a ({batch},) tensor for a batch of {batch}, "
                         f"got shape {tuple(timestep.shape)}")
    return timestep.to(device).reshape(-1)


def _tile(t: Tensor, batch: int) -> Tensor:
    """t (b, ...) -> (batch, ...) = [t; t; ...] for a batch that is a multiple of b, in t's memory layout (cat
    keeps channels_last); t itself when it has the batch already."""
    return t if t.shape[0] == batch else torch.cat([t] * (batch // t.shape[0]))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding: (B, C0) -> (B, 4 * C0)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm+SiLU -> conv3x3 -> + time embedding -> GroupNorm+SiLU -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.time_offsets: Optional[slice] = None  # set by UNet2DConditionModel.fuse_time_projections
        self.sum_groups: Optional[int] = None  # set by UNet2DConditionModel.sum_for_group_norms

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, Cin, H, W); temb: SiLU of the time embedding, (B or 1, 4 * C0) -> (B, Cout, H, W). Once the
        UNet's time projections are fused, temb holds every block's offset instead, (B or 1, sum of Cout),
        and this block reads its columns `time_offsets`.
        The convolutions run without their biases (PyTorch adds a conv's bias in a separate pass over its
        output): conv1's bias joins the time embedding as norm2's per-(sample, channel) offset, which the
        Triton GroupNorm adds as it reads (the sum has no other reader, so it is never written out); conv2's
        and the shortcut's join the residual add (`ops.residual_add`, one pass)."""
        h = _conv(self.conv1, _group_norm(self.norm1, x, "silu"))
        if self.time_offsets is None:
            offset = self.time_emb_proj(temb) + self.conv1.bias  # (B or 1, Cout)
        else:
            offset = temb[:, self.time_offsets]
        # h + offset[:, :, None, None] is normed; one row shared by every sample is read at row stride 0
        offset = offset.expand(h.shape[0], -1)
        h = _conv(self.conv2, self.dropout(_group_norm(self.norm2, h, "silu", offset=offset)))
        return _skip_add(self, x, h)


class Downsample2D(nn.Module):
    """Stride-2 conv3x3: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return _biased_conv(self.conv, x)


class UpsampleConv(nn.Module):
    """Nearest upsampling, then a conv3x3 with padding 1 (the UNet's and the VAE's Upsample2D).

    `subpixel` (a plain attribute a fast path sets, `FastConfig.subpixel_upsample`): a 2x upsampling of
    channels_last x runs as a 2x2 convolution of x with four phases of output channels, then a shuffle of the
    phases into place with the bias (`fastdiff.kernels.subpixel`): 4/9 of the FLOPs, and the upsampled
    input is never written. Its 2x2 weights are derived from `conv.weight` and re-derived (in place, so CUDA
    graphs that read them see the change once it is made) when that weight changed (`subpixel_weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = False
        self._derived: Optional[tuple[tuple, Tensor]] = None  # (what conv.weight was, its 2x2 form)

    @torch.no_grad()
    def subpixel_weight(self) -> Tensor:
        """conv.weight's 2x2 phases (4 * C, C, 2, 2), derived again if the weight was replaced or written to
        since (its address, version counter or dtype changed: `load_state_dict`, `.to()`)."""
        from fastdiff.kernels.subpixel import subpixel_weight

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

    def upsample_conv(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """conv(nearest upsampling of x (B, C, H, W) to `size`) -> (B, C, *size)."""
        if self.subpixel and tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]) and _channels_last(x):
            return ops.subpixel_shuffle(F.conv2d(x, self.subpixel_weight(), None, 1, 1), self.conv.bias)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Upsample2D(UpsampleConv):
    """Nearest upsampling to `size` (twice the input, or the odd size of the matching skip), then conv3x3."""

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        """x: (B, C, H, W) -> (B, C, *size)."""
        return self.upsample_conv(x, size)


class Attention(nn.Module):
    """Multi-head attention without biases on q, k, v (diffusers' Attention with SD's settings).
    Self-attention when `context_dim` is None, else cross-attention onto a context of that width.

    `attend(q, k, v, scale)` computes softmax(q k^T * scale) v; it is `ops.attention` unless a fast path
    (`fastdiff.fast`) picks another implementation. After `fuse_projections()` one matmul makes q, k and v
    (self-attention) or k and v (cross-attention)."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int], dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])
        self.attend = ops.attention
        # (3 * dim, dim) [q; k; v] for self-attention, (2 * dim, context_dim) [k; v] for cross-attention, once
        # fused; not in the state dict (to_q/to_k/to_v keep their keys, as views into it).
        self.register_buffer("fused_weight", None, persistent=False)
        # Cross-attention: contexts whose K/V projection was computed ahead (`project_context`), by id:
        # (the context tensor itself, its projection (B, T, 2 * dim)).
        self.projected: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate the projection weights that read the same input into `fused_weight` and make to_q,
        to_k, to_v's weights views into it: the same parameters and state-dict keys, no second copy, and
        `load_state_dict` afterwards still updates the fused tensor."""
        parts = (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)
        self.fused_weight = concat_as_views(parts, "weight")  # (n * dim, in)

    @torch.no_grad()
    def project_context(self, context: Tensor) -> None:
        """Cross-attention after `fuse_projections()`: compute context's K/V projection now and keep it, so
        that later calls given this same tensor (`is`, not equal values) skip the matmul. The text context is
        constant over a sampling loop, so its projections need not run in every step. Called again with the
        same tensor (after new values were written into it), it recomputes the projection into the same
        memory: CUDA graphs captured reading it see the new values."""
        if not self.is_cross_attention or self.fused_weight is None:
            raise ValueError("project_context needs a cross-attention with fused projections; call "
                             "fuse_projections() first")
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
            q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, S, D)
            k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, T, D)
            v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, T, D)
        elif self.is_cross_attention:
            q = _pointwise(self.to_q, x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, S, D)
            kv = self._context_kv(context).unflatten(-1, (2, self.heads, -1))  # (B, T, 2, H, D)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views
        else:
            qkv = ops.matmul(x, self.fused_weight).unflatten(-1, (3, self.heads, -1))  # (B, S, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D) views
        out = self.attend(q, k, v, self.scale).transpose(1, 2).flatten(2)  # (B, S, H * D)
        return self.to_out[1](_pointwise(self.to_out[0], out, bias=out_bias))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Linear makes value and gate, out = value * GELU(gate).

    `fused` (a plain attribute, not in the state dict) runs the gate through `ops.geglu`, one pass over the
    projection's output instead of eager `gelu` and `mul`; a fast path sets it (`FastConfig.fuse_geglu`).
    `linear_epilogue` (`FastConfig.linear_epilogues`) goes further: the gate in the projection's own kernel
    (`ops.linear(..., geglu=True)`), so the 2 * dim_out wide projection is never written."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)
        self.fused = False
        self.linear_epilogue = False

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, S, dim_in) -> (B, S, dim_out)."""
        if self.linear_epilogue:
            return ops.linear(x, self.proj.weight, self.proj.bias, geglu=True)
        if self.fused:
            return ops.geglu(self.proj(x))
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, then back: (B, S, dim) -> (B, S, dim), plus the block's residual when given.

    `linear_epilogue` (a plain attribute a fast path sets, `FastConfig.linear_epilogues`) adds the residual
    in the output Linear's kernel (`ops.linear(..., residual=...)`) instead of in a pass of its own."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        # net.1 is diffusers' dropout slot; it keeps the output Linear at the key `net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])
        self.linear_epilogue = False

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, residual_has_bias: bool = False) -> Tensor:
        """x: (B, S, dim) -> residual + MLP(x), or MLP(x) without a residual. residual_has_bias: the residual
        (contiguous) already holds the output Linear's bias (a BasicTransformerBlock with fold_biases carries
        it there), so the output Linear accumulates onto it in place, one cuBLAS GEMM with C = residual; the
        residual's memory is overwritten and returned."""
        project, dropout, out = self.net
        h = dropout(project(x))
        if residual_has_bias:
            if residual is None:
                raise ValueError("residual_has_bias needs the residual")
            return ops.matmul(h, out.weight, out=residual, accumulate=True)
        if residual is not None and self.linear_epilogue:
            return ops.linear(h, out.weight, out.bias, residual=residual)
        h = out(h)
        return h if residual is None else residual + h


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention on the context, GEGLU MLP.

    `fold_biases` (a plain attribute a fast path sets, `FastConfig.fold_biases`) moves three Linears' biases
    into the LayerNorm passes (ops.add_layer_norm): the attentions' to_out biases join the residual adds
    (residual_bias), and the MLP output's bias is added to the stream the MLP adds onto (stream_bias), whose
    output Linear then accumulates onto it in place (FeedForward's residual_has_bias). On an H200 cuBLAS's GEMM
    with a bias was up to 1.55x slower than without one at SD's widths, and the in-place accumulation beat both
    the eager add and the Triton epilogue."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, cfg.cross_attention_dim, cfg.dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, cfg.dropout)
        self.fold_biases = False

    def forward(self, x: Tensor, context: Tensor, x_bias: Optional[Tensor] = None) -> Tensor:
        """x: (B, S, dim); context: (B, T, cross_attention_dim) -> (B, S, dim). x_bias: (dim,), a bias x still
        lacks (proj_in's, which a Transformer2DModel with fold_biases leaves to this block), or None.
        Each residual add that feeds a LayerNorm is one op with it (`ops.add_layer_norm`: one pass over memory
        on the Triton backend): x = x + attn1(norm1(x)), then x = x + attn2(norm2(x)), then x + ff(norm3(x))."""
        if x_bias is None:
            h = _layer_norm(self.norm1, x)
        else:
            x, h = _layer_norm(self.norm1, x, residual_bias=x_bias)
        fold = self.fold_biases
        # A sample shared by several contexts (see the UNet's forward) parts into their rows here: the norm
        # pass writes its outputs once per context row block ([x; x; ...]).
        x, h = _layer_norm(self.norm2, x, self.attn1(h, out_bias=not fold), _out_bias(self.attn1, fold),
                           copies=context.shape[0] // x.shape[0])
        x, h = _layer_norm(self.norm3, x, self.attn2(h, context, out_bias=not fold), _out_bias(self.attn2, fold),
                           stream_bias=self.ff.net[2].bias if fold else None)
        return self.ff(h, residual=x, residual_has_bias=fold)


def _out_bias(attention: Attention, folded: bool) -> Optional[Tensor]:
    """The bias an attention left out of its to_out matmul (`folded`), for the residual add to add; else None."""
    return attention.to_out[0].bias if folded else None


def _projection(channels: int, linear: bool) -> Union[nn.Linear, nn.Conv2d]:
    """proj_in/proj_out of a Transformer2DModel: nn.Linear in SD2 checkpoints, a 1x1 nn.Conv2d in SD1's."""
    return nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)


def _pointwise(layer: Union[nn.Linear, nn.Conv2d], tokens: Tensor, bias: bool = True) -> Tensor:
    """Apply a Linear or a 1x1 Conv2d to tokens (B, S, Cin) -> (B, S, Cout), without its bias if `bias` is
    False. A 1x1 conv is a per-pixel linear map; only the stored weight's shape differs ((Cout, Cin, 1, 1) vs
    (Cout, Cin)), so both run as one matmul: F.linear with a bias, `ops.matmul` without one."""
    weight = layer.weight.flatten(1)
    if bias and layer.bias is not None:
        return F.linear(tokens, weight, layer.bias)
    return ops.matmul(tokens, weight)


class Transformer2DModel(nn.Module):
    """Attention over the pixels of a feature map: GroupNorm -> proj_in -> BasicTransformerBlocks -> proj_out,
    plus the input. (B, C, H, W) -> (B, C, H, W); the blocks see H * W tokens of width C."""

    def __init__(self, channels: int, heads: int, num_layers: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = _projection(channels, cfg.use_linear_projection)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, cfg) for _ in range(num_layers))
        self.proj_out = _projection(channels, cfg.use_linear_projection)
        self.linear_epilogue = False  # a fast path's: proj_out adds the input in its kernel (ops.linear)
        self.fold_biases = False  # a fast path's: proj_in's bias added in the first block's LayerNorm pass
        self.sum_groups: Optional[int] = None  # set by UNet2DConditionModel.sum_for_group_norms

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W); context: (B, T, cross_attention_dim) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = _group_norm(self.norm, x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = _pointwise(self.proj_in, tokens, bias=not self.fold_biases)
        for i, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, context, x_bias=self.proj_in.bias if self.fold_biases and i == 0 else None)
        if self.linear_epilogue and x.shape[0] == tokens.shape[0] and x.is_contiguous(
                memory_format=torch.channels_last):  # x's (B, H, W, C) memory is the residual's (B, HW, C)
            residual = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
            tokens = ops.linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias, residual=residual)
            return tokens.view(b, h, w, c).permute(0, 3, 1, 2)
        if x.shape[0] != tokens.shape[0] and _channels_last(x):  # the blocks parted a shared sample's rows
            # proj_out without its bias, then one pass adds the bias and x, read once per row block (no tile)
            tokens = _pointwise(self.proj_out, tokens, bias=False)
            return _residual_add(x, tokens.view(-1, h, w, c).permute(0, 3, 1, 2), self.proj_out.bias,
                                 sum_groups=self.sum_groups)
        tokens = _pointwise(self.proj_out, tokens)  # (B', HW, C): B' > B once the blocks tiled a shared sample
        return _tile(x, tokens.shape[0]) + tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2)


class DownBlock(nn.Module):
    """One encoder level: diffusers' CrossAttnDownBlock2D (`heads` given: a transformer after each resnet)
    or DownBlock2D (`heads` None), then a stride-2 conv unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, heads: Optional[int],
                 transformer_layers: int, add_downsample: bool, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, cfg)
                                     for i in range(num_layers))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2DModel(out_channels, heads, transformer_layers, cfg) for _ in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x: (B, Cin, H, W) -> (x (B, Cout, H', W'), the skips: every resnet(+transformer) and downsample output)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResnetBlock2D -> Transformer2DModel -> ResnetBlock2D at the lowest resolution."""

    def __init__(self, channels: int, heads: int, transformer_layers: int, cfg: UNetConfig):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, transformer_layers, cfg)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, cfg), ResnetBlock2D(channels, channels, cfg)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nn.Module):
    """One decoder level: diffusers' CrossAttnUpBlock2D (`heads` given) or UpBlock2D (`heads` None). Each resnet
    first concatenates the next skip (last in, first out); then an upsample unless it is the last level."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, num_layers: int,
                 heads: Optional[int], transformer_layers: int, add_upsample: bool, cfg: UNetConfig):
        super().__init__()
        # The last resnet's skip is the tensor that entered this level on the way down (in_channels wide); the
        # others are outputs of this level's down resnets (out_channels wide).
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_output_channels if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels), out_channels, cfg)
            for i in range(num_layers))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2DModel(out_channels, heads, transformer_layers, cfg) for _ in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None
        self.sum_concats = False  # set by UNet2DConditionModel.sum_for_group_norms

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                upsample_size: Optional[torch.Size]) -> Tensor:
        """x: (B, Cprev, H, W); skips: len(resnets) tensors, consumed from the end -> (B, Cout, *upsample_size)
        (or (B, Cout, H, W) at the last level)."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            if self.sum_concats:
                x = _summed(*ops.channel_cat_sums(x, skip, resnet.norm1.num_groups))
            else:
                x = ops.channel_cat(x, skip)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """The SD1/SD2 denoiser: forward(sample, timestep, context) -> noise (or v) prediction, same shape as sample."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)
        layers = _per_level(config.layers_per_block, levels)
        transformer_layers = _per_level(config.transformer_layers_per_block, levels)
        heads = config.heads

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)

        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], layers[i],
                      heads[i] if config.down_block_types[i] == "CrossAttnDownBlock2D" else None,
                      transformer_layers[i], i < levels - 1, config)
            for i in range(levels))
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], heads[-1], transformer_layers[-1], config)
        # Up block i works at level j = levels-1-i: its input comes from the level below (channels[j+1]), and
        # its last skip is what entered level j on the way down (channels[j-1]; conv_in's output at level 0).
        self.up_blocks = nn.ModuleList(
            UpBlock(channels[max(j - 1, 0)], channels[min(j + 1, levels - 1)], channels[j], layers[j] + 1,
                    heads[j] if config.up_block_types[i] == "CrossAttnUpBlock2D" else None,
                    transformer_layers[j], j > 0, config)
            for i, j in enumerate(reversed(range(levels))))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)
        # Set by fuse_time_projections(), not in the state dict: every ResnetBlock2D's time_emb_proj weight
        # (sum of Cout, 4 * C0) and bias, and its conv1 bias, each block's parameters views into them.
        self.register_buffer("fused_time_weight", None, persistent=False)
        self.register_buffer("fused_time_bias", None, persistent=False)
        self.register_buffer("fused_conv1_bias", None, persistent=False)

    def sum_for_group_norms(self, enabled: bool = True) -> None:
        """Have every kernel whose output goes straight into a GroupNorm also sum that output for the norm
        (`ops.residual_add_sums`, `ops.channel_cat_sums`), so that the norm runs only its normalizing pass.
        The down path and the middle run as one chain of modules: each one that a ResNet block (its norm1) or
        a transformer (its norm) follows sums for it. A module sums only where its kernel is one of those
        two ops: conv_in and the downsamplers with their bias pass (`FastConfig.conv_bias_pass`), a ResNet
        block's residual add, a transformer's where its rows part a shared sample. In the up path each skip
        concatenation sums for its ResNet block's norm1, and each ResNet block for its transformer's norm.
        enabled=False turns it all off."""
        chain: list[nn.Module] = [self.conv_in]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                chain.append(resnet)
                if block.attentions is not None:
                    chain.append(block.attentions[i])
            if block.downsamplers is not None:
                chain.append(block.downsamplers[0].conv)
        chain += [self.mid_block.resnets[0], self.mid_block.attentions[0], self.mid_block.resnets[1]]
        for producer, consumer in zip(chain, chain[1:] + [None]):
            norm = consumer.norm1 if isinstance(consumer, ResnetBlock2D) else getattr(consumer, "norm", None)
            producer.sum_groups = norm.num_groups if enabled and norm is not None else None
        for block in self.up_blocks:
            block.sum_concats = enabled
            for i, resnet in enumerate(block.resnets):
                attention = None if block.attentions is None else block.attentions[i]
                resnet.sum_groups = attention.norm.num_groups if enabled and attention is not None else None

    @torch.no_grad()
    def fuse_time_projections(self) -> None:
        """Make the time projections of all ResnetBlock2Ds one matmul: forward then computes every block's
        norm2 offset (time_emb_proj(temb) + conv1.bias) at once, two kernels instead of two per block (44 for
        SD1.5), and each block reads its columns. The blocks' time_emb_proj.weight/bias and conv1.bias become
        views into the fused tensors: the same parameters and state-dict keys, and load_state_dict afterwards
        still updates what runs. Convert dtype or device before fusing, not after (the views would split)."""
        resnets = [m for m in self.modules() if isinstance(m, ResnetBlock2D)]
        if not resnets or self.fused_time_weight is not None:
            return
        projections = [r.time_emb_proj for r in resnets]
        self.fused_time_weight = concat_as_views(projections, "weight")
        self.fused_time_bias = concat_as_views(projections, "bias")
        self.fused_conv1_bias = concat_as_views([r.conv1 for r in resnets], "bias")
        start = 0
        for r in resnets:
            r.time_offsets = slice(start, start + r.time_emb_proj.out_features)
            start = r.time_offsets.stop

    def project_context(self, context: Tensor) -> None:
        """Compute every cross-attention's K/V projection of `context` (B, T, cross_attention_dim) now and keep
        them (`Attention.project_context`): forwards given this same tensor skip 16 matmuls (SD1.5) per step.
        Needs fused projections (`Attention.fuse_projections`, done by the fast path)."""
        for module in self.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                module.project_context(context)

    def forget_contexts(self) -> None:
        """Drop every projection `project_context` kept (and with them the contexts they were kept for)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.projected.clear()

    def time_features(self, timestep: Union[int, float, Tensor], batch: int, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
        """What the ResNet blocks take from the timestep (`temb`): SiLU of the time-embedding MLP of its
        sinusoidal embedding, (B or 1, 4 * C0), or once the time projections are fused
        (`fuse_time_projections`) every block's norm2 offset, (B or 1, sum of the blocks' Cout). timestep: as
        `forward` takes it, for a batch of `batch` samples. It depends on the timestep alone, so a caller that
        knows the timesteps ahead may compute it for all of them at once and pass rows to `forward`."""
        t = _timesteps(timestep, batch, device)  # (B,), or (1,) when shared
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(dtype)  # (B or 1, C0)
        # Every ResnetBlock2D starts with SiLU(time embedding); take it once here.
        temb = F.silu(self.time_embedding(t_emb))  # (B or 1, 4 * C0)
        if self.fused_time_weight is not None:  # every block's time projection + conv1 bias in one matmul
            temb = F.linear(temb, self.fused_time_weight, self.fused_time_bias) + self.fused_conv1_bias
        return temb

    def forward(self, sample: Tensor, timestep: Union[int, float, Tensor, None], context: Tensor,
                temb: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
        """sample: (B, in_channels, h, w), any h, w; timestep: a number or 0-d tensor for the whole batch, or a
        (B,) tensor (fractional values allowed); context: (B, T, cross_attention_dim) text-encoder hidden states
        -> (B, out_channels, h, w). temb: `time_features` of the timestep, computed ahead, (B or 1, width); the
        timestep is then not read (None allowed). out_dtype: the output in that dtype and contiguous, conv_out's
        bias added in the same pass (one kernel where a cast and a copy would follow); else as conv_out makes it.

        Shared sample: context may hold r * B rows when the timestep is shared. The result is then
        forward(cat([sample] * r), timestep, context), (r * B, out_channels, h, w), as classifier-free guidance
        asks with r = 2 ([uncond; cond] contexts, one latent). Everything before the first cross-attention
        depends on the sample alone, so it runs once per sample instead of r times, and the rows part there
        (at SD1.5's 64x64 level: conv_in, a ResNet block, a self-attention and their norms)."""
        batch = sample.shape[0]
        if context.shape[0] % batch:
            raise ValueError(f"context has {context.shape[0]} rows, expected a multiple of sample's batch {batch} "
                             f"(sample {tuple(sample.shape)}, context {tuple(context.shape)})")
        shared = context.shape[0] != batch
        if temb is None:
            t = _timesteps(timestep, batch, sample.device)  # (B,), or (1,) when shared
            if shared and t.shape[0] != 1:
                raise ValueError(f"a sample shared by several contexts ({batch} samples, {context.shape[0]} "
                                 f"contexts) needs one timestep for the batch, got shape {tuple(timestep.shape)}")
            temb = self.time_features(t, batch, sample.device, sample.dtype)
        elif temb.dim() != 2 or temb.shape[0] not in (1, batch) or (shared and temb.shape[0] != 1):
            raise ValueError(f"temb must be (1, width){'' if shared else f' or ({batch}, width)'} for "
                             f"{batch} samples and {context.shape[0]} contexts, got shape {tuple(temb.shape)}")

        x = _biased_conv(self.conv_in, sample)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = _tile(self.mid_block(x, temb, context), context.shape[0])
        # Skips taken before a shared sample's rows parted keep their B rows: ops.channel_cat repeats them.
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, not blindly 2x: odd sizes were rounded up on the way down.
            x = block(x, block_skips, temb, context, skips[-1].shape[-2:] if skips else None)
        h = _group_norm(self.conv_norm_out, x, "silu")
        if out_dtype is None:
            return self.conv_out(h)
        if torch.is_grad_enabled() and (h.requires_grad or self.conv_out.bias.requires_grad):  # out= has no grad
            return self.conv_out(h).to(out_dtype, memory_format=torch.contiguous_format)
        y = _conv(self.conv_out, h)
        return torch.add(y, self.conv_out.bias[:, None, None], out=torch.empty(y.shape, dtype=out_dtype,
                                                                              device=y.device))
