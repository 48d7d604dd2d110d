"""The Stable Diffusion 1.x / 2.x / XL denoiser (diffusers' UNet2DConditionModel), lean enough to read top to bottom.

    sample (B, 4, h, w), timestep, context (B, T, cross_attention_dim)
      timestep -> sinusoidal embedding (B, C0) -> time_embedding MLP -> temb (B, 4 * C0)
      (SDXL)      + add_embedding MLP of [pooled text embedding, sinusoidal embedding of each time id]
      conv_in                                                  (B, C0, h, w)
      down_blocks: per level, [ResnetBlock2D (+ Transformer2DModel)] x layers_per_block, then a stride-2
                   conv except at the last level; every output is kept as a skip
      mid_block:   ResnetBlock2D -> Transformer2DModel -> ResnetBlock2D
      up_blocks:   per level, [cat(x, skip) -> ResnetBlock2D (+ Transformer2DModel)] x (layers_per_block + 1),
                   then nearest 2x upsample + conv except at the last level
      GroupNorm -> SiLU -> conv_out                            (B, 4, h, w)   == diffusers' `.sample`

A Transformer2DModel is GroupNorm -> proj_in -> [self-attention, cross-attention on the context, GEGLU MLP]
x transformer_layers_per_block -> proj_out, plus the input. "CrossAttn..." blocks have them, plain ones don't.

SD1 and SD2 differ only in settings: SD2 has `use_linear_projection` (proj_in/out are nn.Linear, SD1 has 1x1
convs), 1024-wide OpenCLIP context instead of CLIP's 768, and 64-wide heads at every level. Beware of
diffusers' naming: `attention_head_dim` is the number of HEADS (SD1: 8 at every level; SD2: [5, 10, 20, 20]),
the head size is channels // heads. diffusers keeps the name for old configs and so does this file.

SDXL is settings too: three levels (320, 640, 1280) with no attention at the top one, 1, 2 and 10 transformer
layers per level (the mid block takes the last level's), 64-wide heads, a 2048-wide context (two text encoders'
hidden states side by side), and `addition_embed_type="text_time"`: the pooled text embedding and the size and
crop conditioning (`text_embeds`, `time_ids`) are embedded and added to the time embedding. The refiner has four
levels (384, 768, 1536, 1536), attention at the middle two, 4 transformer layers, and an aesthetic score among
its five time ids.

Parameter names and state-dict keys are diffusers' exactly, so `load_state_dict(diffusers_unet.state_dict())`
works unchanged. This file says what the network computes, in plain PyTorch.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._config import read_settings

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers UNet2DConditionModel settings that fastdiff does not implement: each must keep a value that leaves
# the SD1/SD2/SDXL computation unchanged (diffusers' default, the one that switches the feature off).
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
    "addition_embed_type_num_heads": (64,),  # the heads of addition_embed_type "text" (not supported)
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
    #   Always honoured: attention accumulates q k^T and the softmax in float32 whatever this says
    #   (diffusers' default SDPA processor ignores the flag altogether)
    addition_embed_type: Optional[str] = None  # "text_time" (SDXL): an embedding of the pooled text embedding and
    #   the time ids, added to the time embedding (`add_embedding`); None: no such input (SD1, SD2)
    addition_time_embed_dim: Optional[int] = None  # width of each time id's sinusoidal embedding (SDXL: 256)
    projection_class_embeddings_input_dim: Optional[int] = None  # add_embedding's input width: pooled text width +
    #   number of time ids * addition_time_embed_dim (SDXL: 1280 + 6 * 256 = 2816; its refiner 1280 + 5 * 256)

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
            if channels % heads and self.has_attention(level):
                raise ValueError(f"attention_head_dim (the head count) must divide the level's channels, "
                                 f"got {heads} heads for {channels} channels at level {level}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type must be one of {ADDITION_EMBED_TYPES}, "
                             f"got {self.addition_embed_type!r}")
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if not (isinstance(value, int) and value >= 1):
                    raise ValueError(f"{name} must be a positive int with addition_embed_type 'text_time', "
                                     f"got {value!r}")

    def has_attention(self, level: int) -> bool:
        """Whether any transformer works at `level`: its down or up block is a CrossAttn one, or it is the last
        level, where the mid block's is."""
        levels = len(self.block_out_channels)
        return (self.down_block_types[level] == "CrossAttnDownBlock2D"
                or self.up_block_types[levels - 1 - level] == "CrossAttnUpBlock2D" or level == levels - 1)

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


def timesteps_of(timestep: Union[int, float, Tensor], batch: int, device: torch.device) -> Tensor:
    """int, float, 0-d or (1,) tensor -> (1,): one timestep every sample shares (its time embedding is computed
    once and broadcast); (B,) tensor -> (B,), one per sample. On `device`. Only shapes are inspected, never
    values (no host synchronisation)."""
    if not torch.is_tensor(timestep):
        return torch.full((1,), float(timestep), dtype=torch.float32, device=device)
    if timestep.ndim > 1 or timestep.numel() not in (1, batch):
        raise ValueError(f"timestep must be a number, a 0-d tensor or a ({batch},) tensor for a batch of {batch}, "
                         f"got shape {tuple(timestep.shape)}")
    return timestep.to(device).reshape(-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding: (B, C0) -> (B, 4 * C0)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def added_embedding(add_embedding: Optional[TimestepEmbedding], config: UNetConfig, text_embeds: Optional[Tensor],
                    time_ids: Optional[Tensor]) -> Optional[Tensor]:
    """SDXL's added conditioning (diffusers' addition_embed_type "text_time"), which the UNet adds to its time
    embedding: every time id gets a sinusoidal embedding of addition_time_embed_dim, as a timestep does (diffusers'
    `add_time_proj`), and `add_embedding` (an MLP like the time embedding's) reads [text_embeds, those embeddings].

    text_embeds: (B, P) the pooled, projected text embedding (SDXL: OpenCLIP bigG's, P = 1280); time_ids: (B, N),
    any real dtype, SDXL's (original height, width, crop top, left, target height, width), its refiner's with an
    aesthetic score in place of the target size; P + N * addition_time_embed_dim must be add_embedding's input
    width -> (B, 4 * C0) in add_embedding's dtype. None for a UNet without an add embedding (add_embedding None),
    which must be given neither input. ValueError naming the input that is missing, unexpected or misshapen.
    """
    given = [name for name, t in (("text_embeds", text_embeds), ("time_ids", time_ids)) if t is not None]
    if add_embedding is None:
        if given:
            raise ValueError(f"{' and '.join(given)} given, but this UNet has no add embedding "
                             f"(addition_embed_type {config.addition_embed_type!r})")
        return None
    dim, width = config.addition_time_embed_dim, add_embedding.linear_1.in_features
    if len(given) < 2:
        missing = " and ".join(n for n in ("text_embeds", "time_ids") if n not in given)
        raise ValueError(f"{missing} missing: a UNet with addition_embed_type 'text_time' takes text_embeds (B, P) "
                         f"and time_ids (B, N) with P + N * {dim} = {width}")
    for name, t, layout in (("text_embeds", text_embeds, "(B, P)"), ("time_ids", time_ids, "(B, N)")):
        if t.dim() != 2:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if time_ids.shape[0] != text_embeds.shape[0] or text_embeds.shape[1] + time_ids.shape[1] * dim != width:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} must be (B, P) "
                         f"and (B, N) with P + N * {dim} = {width} (projection_class_embeddings_input_dim)")
    time_embeds = timestep_embedding(time_ids.flatten(), dim, config.flip_sin_to_cos, config.freq_shift)
    dtype = add_embedding.linear_1.weight.dtype
    x = torch.cat([text_embeds.to(dtype), time_embeds.reshape(time_ids.shape[0], -1).to(dtype)], dim=1)  # (B, width)
    return add_embedding(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + projected time embedding -> GroupNorm -> SiLU -> conv3x3, plus the input
    (through a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, Cin, H, W); temb: the time embedding (B or 1, 4 * C0) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 conv3x3: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest upsampling to `size` (twice the input, or the odd size of the matching skip), then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Optional[torch.Size] = None) -> Tensor:
        """x: (B, C, H, W) -> (B, C, *size), or (B, C, 2H, 2W) without a size."""
        size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else size
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention without biases on q, k, v (diffusers' Attention with SD's settings).
    Self-attention when `context_dim` is None, else cross-attention onto a context of that width."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int], dropout: float):
        super().__init__()
        self.heads = heads
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    @property
    def head_dim(self) -> int:
        return self.to_q.out_features // self.heads

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """x: (B, S, dim); context: (B, T, context_dim), or None to attend over x -> (B, S, dim)."""
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # (B, H, S, D)
        k = split_heads(self.to_k(context), self.heads)  # (B, H, T, D)
        v = split_heads(self.to_v(context), self.heads)  # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).flatten(2)))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Linear makes value and gate, out = value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, S, dim_in) -> (B, S, dim_out)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, then back: (B, S, dim) -> (B, S, dim)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        # net.1 is diffusers' dropout slot; it keeps the output Linear at the key `net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention on the context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, cfg.cross_attention_dim, cfg.dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, cfg.dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, S, dim); context: (B, T, cross_attention_dim) -> (B, S, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _projection(channels: int, linear: bool) -> Union[nn.Linear, nn.Conv2d]:
    """proj_in/proj_out of a Transformer2DModel: nn.Linear in SD2 checkpoints, a 1x1 nn.Conv2d in SD1's."""
    return nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)


def pointwise(layer: Union[nn.Linear, nn.Conv2d], tokens: Tensor) -> Tensor:
    """A Linear or a 1x1 Conv2d applied to tokens (B, S, Cin) -> (B, S, Cout): a 1x1 conv is a per-pixel linear
    map, only its stored weight's shape differs ((Cout, Cin, 1, 1) against (Cout, Cin))."""
    return F.linear(tokens, layer.weight.flatten(1), layer.bias)


class Transformer2DModel(nn.Module):
    """Attention over the pixels of a feature map: GroupNorm -> proj_in -> BasicTransformerBlocks -> proj_out,
    plus the input. (B, C, H, W) -> (B, C, H, W); the blocks see H * W tokens of width C."""

    def __init__(self, channels: int, heads: int, num_layers: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = _projection(channels, cfg.use_linear_projection)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, cfg) for _ in range(num_layers))
        self.proj_out = _projection(channels, cfg.use_linear_projection)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W); context: (B, T, cross_attention_dim) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = pointwise(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = pointwise(self.proj_out, tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


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

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                upsample_size: Optional[torch.Size]) -> Tensor:
        """x: (B, Cprev, H, W); skips: len(resnets) tensors, consumed from the end -> (B, Cout, *upsample_size)
        (or (B, Cout, H, W) at the last level)."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """The SD1/SD2/SDXL denoiser: forward(sample, timestep, context) -> noise (or v) prediction, same shape as
    sample; SDXL's also takes text_embeds and time_ids."""

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
        self.add_embedding = None if config.addition_embed_type is None else TimestepEmbedding(
            config.projection_class_embeddings_input_dim, config.time_embed_dim)  # `added_embedding`

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

    def time_embed(self, timestep: Union[int, float, Tensor], batch: int, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
        """The time embedding every ResNet block receives (with `add_embed` added, for SDXL), (B or 1, 4 * C0): the
        time-embedding MLP of the timestep's sinusoidal embedding. timestep: as `forward` takes it, for a batch of
        `batch` samples."""
        t = timesteps_of(timestep, batch, device)  # (B,), or (1,) when shared
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift)
        return self.time_embedding(t_emb.to(dtype))

    def add_embed(self, text_embeds: Optional[Tensor], time_ids: Optional[Tensor]) -> Optional[Tensor]:
        """SDXL's added conditioning, which `forward` adds to the time embedding: text_embeds (B, P), time_ids
        (B, N) -> (B, 4 * C0); None for a UNet without an add embedding (see `added_embedding`)."""
        return added_embedding(self.add_embedding, self.config, text_embeds, time_ids)

    def forward(self, sample: Tensor, timestep: Union[int, float, Tensor], context: Tensor,
                text_embeds: Optional[Tensor] = None, time_ids: Optional[Tensor] = None) -> Tensor:
        """sample: (B, in_channels, h, w), any h, w; timestep: a number or 0-d tensor for the whole batch, or a
        (B,) tensor (fractional values allowed); context: (B, T, cross_attention_dim) text-encoder hidden states
        -> (B, out_channels, h, w). text_embeds (B, P) and time_ids (B, N): SDXL's added conditioning (diffusers'
        `added_cond_kwargs`), required with addition_embed_type "text_time" and refused without it."""
        if context.shape[0] != sample.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows, expected sample's batch {sample.shape[0]} "
                             f"(sample {tuple(sample.shape)}, context {tuple(context.shape)})")
        temb = self.time_embed(timestep, sample.shape[0], sample.device, sample.dtype)
        added = self.add_embed(text_embeds, time_ids)
        if added is not None:
            if added.shape[0] != sample.shape[0]:
                raise ValueError(f"text_embeds and time_ids have {added.shape[0]} rows, expected sample's batch "
                                 f"{sample.shape[0]}")
            temb = temb + added  # (B, 4 * C0)
        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, not blindly 2x: odd sizes were rounded up on the way down.
            x = block(x, block_skips, temb, context, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
