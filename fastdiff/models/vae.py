"""The Stable Diffusion VAE (diffusers' AutoencoderKL), lean enough to read top to bottom.

    image (B, 3, H, W) in [-1, 1]
      Encoder: conv_in -> down_blocks (ResnetBlock2D x layers_per_block, Downsample2D but the last)
               -> mid_block (resnet, self-attention, resnet) -> GroupNorm+SiLU -> conv_out
      quant_conv (1x1)                                        -> moments (B, 2 * latent, H/f, W/f)
    latents = mean of the moments, UNSCALED                      f = 2 ** (len(block_out_channels) - 1)
      post_quant_conv (1x1)
      Decoder: conv_in -> mid_block -> up_blocks (ResnetBlock2D x (layers_per_block + 1), Upsample2D but
               the last) -> GroupNorm+SiLU -> conv_out          -> image (B, 3, H, W)

Parameter names and state-dict keys are diffusers' exactly, so `load_state_dict(diffusers_vae.state_dict())`
works unchanged. Scaling by `config.scaling_factor` is the caller's job (the pipeline multiplies after
`encode` and divides before `decode`), as in diffusers. Plain PyTorch.
"""
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._config import read_settings

# diffusers hard-codes these for the VAE (Encoder/Decoder pass them to every block).
_EPS = 1e-6
_ACT_FNS = ("silu", "swish")  # diffusers' get_activation maps both to SiLU


@dataclass
class VAEConfig:
    """The fields of a diffusers vae/config.json that fastdiff supports. Defaults are diffusers'
    AutoencoderKL defaults, so a key missing from a config.json means the same thing here as there."""

    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    latent_channels: int = 4  # channels of the latent the UNet works on
    block_out_channels: tuple[int, ...] = (64,)  # channels per resolution level, highest resolution first
    layers_per_block: int = 1  # resnets per encoder level (the decoder has one more per level)
    norm_num_groups: int = 32  # GroupNorm groups everywhere; must divide every block_out_channels entry
    sample_size: Union[int, tuple[int, int]] = 32  # nominal training image size; diffusers uses it only for tiling
    scaling_factor: float = 0.18215  # latents for the UNet are mean * scaling_factor (applied by the pipeline)
    shift_factor: Optional[float] = None  # SD3/Flux latent shift; not supported, must be None
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments (absent in SD3/Flux-style VAEs)
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before the decoder
    mid_block_add_attention: bool = True  # self-attention between the two mid-block resnets
    force_upcast: bool = True  # run the VAE in float32 even when the rest runs in float16 (pipeline's call)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.shift_factor is not None:
            raise ValueError(f"shift_factor must be None (latent shifting is not supported), got {self.shift_factor}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups must divide every block_out_channels entry, "
                             f"got norm_num_groups={self.norm_num_groups} and channels {bad}")

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """Read a diffusers vae/config.json dict: the fields above are read; the block types, act_fn and
        latents_mean/std, which fastdiff does not implement, must keep their neutral values (ValueError
        otherwise); other keys are ignored with a warning."""
        n = len(d.get("block_out_channels", cls.block_out_channels))
        fixed = {
            "down_block_types": (["DownEncoderBlock2D"] * n,),  # one per block_out_channels entry
            "up_block_types": (["UpDecoderBlock2D"] * n,),
            "act_fn": _ACT_FNS,
            "latents_mean": (None,),  # per-channel latent normalisation, not implemented
            "latents_std": (None,),
        }
        settings = read_settings(d, cls.__dataclass_fields__, fixed, "VAE")
        if isinstance(settings.get("sample_size"), list):
            settings["sample_size"] = tuple(settings["sample_size"])
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict (AutoencoderKL(**{k: v for k, v in d.items() if k[0] != "_"}))."""
        n = len(self.block_out_channels)
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if isinstance(self.sample_size, tuple):
            d["sample_size"] = list(self.sample_size)
        return {"_class_name": "AutoencoderKL", **d, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "latents_mean": None, "latents_std": None}


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus the input (through a 1x1 conv when the
    channel count changes). No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """Stride-2 conv3x3 with the asymmetric (right/bottom) zero padding of the original LDM VAE."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head spatial self-attention with a GroupNorm in front and a residual connection.

    diffusers builds it with heads = channels // attention_head_dim and attention_head_dim = channels, so
    there is always exactly one head of size `channels`."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, S, C), S = H*W
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, S, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h)  # (B, S, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class UNetMidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution, channels unchanged."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, h, w) -> (B, C, h, w)."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Cin, H, W) -> (B, Cout, H/2, W/2), or (B, Cout, H, W) for the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Cin, h, w) -> (B, Cout, 2h, 2w), or (B, Cout, h, w) for the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, add_downsample=i < n - 1)
            for i in range(n)])
        self.mid_block = UNetMidBlock2D(ch[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, add_upsample=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL without tiling/slicing. Latents in and out are UNSCALED.

    Layout-agnostic: NCHW or channels_last (`vae.to(memory_format=torch.channels_last)` and channels_last
    inputs) give the same numbers."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def _moments(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.config.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f} (the VAE's downsampling factor), "
                             f"got {x.shape[2]}x{x.shape[3]}")
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode_distribution(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The diagonal Gaussian posterior q(z|x). x: (B, in_channels, H, W) in [-1, 1] ->
        (mean, logvar), each (B, latent_channels, H/f, W/f), unscaled; logvar clamped to [-30, 20] as in
        diffusers. Sample with `mean + (0.5 * logvar).exp() * noise`."""
        mean, logvar = self._moments(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior mean (B, latent_channels, H/f, W/f), UNSCALED."""
        return self._moments(x).chunk(2, dim=1)[0]

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, latent_channels, h, w), UNSCALED -> images (B, out_channels, h*f, w*f), nominally in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the posterior mean: decode(encode(x))."""
        return self.decode(self.encode(x))
