"""The VAE as the fast path runs it: a copy of a loaded `fastdiff.models.AutoencoderKL` that shares its parameters,
with fused modules swapped in for its ResNet blocks, attentions, upsamplers and output norms.

    fast = fast_vae(vae, FastConfig())      # vae itself is left as it was (but channels_last)
    images = fast.decode(latents)           # what vae.decode(latents) computes, on fused kernels

The blocks around them are the reference's own, so the copy keeps its `encode_distribution` and `decode`.
"""
import torch
import torch.nn as nn
from torch import Tensor

from fastdiff import ops
from fastdiff.models.vae import Attention, AutoencoderKL, ResnetBlock2D, Upsample2D

from .config import FastConfig
from .unet import FastUpsample, conv, copy_sharing_parameters, group_norm, replace_modules, skip_add


class GroupNormSiLU(nn.Module):
    """An nn.GroupNorm followed by SiLU, one fused pass (`ops.group_norm`), holding the norm's own parameters
    under the norm's keys."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps, self.weight, self.bias = norm.num_groups, norm.eps, norm.weight, norm.bias

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(self, x, "silu")


class FastVAEResnetBlock(nn.Module):
    """The VAE's ResnetBlock2D with both convolutions' biases folded into the passes after them: conv1's is norm2's
    offset (added as the norm reads h), conv2's joins the residual add, written over conv2's output."""

    def __init__(self, block: ResnetBlock2D):
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2 = block.norm1, block.conv1, block.norm2, block.conv2
        self.conv_shortcut = block.conv_shortcut

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Cin, H, W) -> (B, Cout, H, W)."""
        # One statement per step, rebinding `h`, so each intermediate is freed as soon as the next exists:
        # at 512x512 every extra live activation costs B * 128 MiB (float32) in the decoder's last level.
        h = group_norm(self.norm1, x, "silu")
        h = conv(self.conv1, h)
        h = group_norm(self.norm2, h, "silu", offset=self.conv1.bias.expand(h.shape[0], -1))  # one row, stride 0
        h = conv(self.conv2, h)
        return skip_add(x, h, self.conv2, self.conv_shortcut, out=h)[0]


class FastVAEAttention(nn.Module):
    """The VAE's single-head attention through the implementation `ops.attention_impl` picks for its head
    (`FastConfig.vae_attention`: `matmul_attention` for SD's 512-wide head)."""

    def __init__(self, attention: Attention, config: FastConfig):
        super().__init__()
        self.group_norm, self.to_q, self.to_k, self.to_v = (attention.group_norm, attention.to_q, attention.to_k,
                                                            attention.to_v)
        self.to_out = attention.to_out
        self.attend = ops.attention_impl(config.vae_attention, attention.to_q.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = group_norm(self.group_norm, x).flatten(2).transpose(1, 2)  # (B, S, C), S = H*W
        # q, k, v: (B, 1, S, C), passed as temporaries so they are freed when attention returns.
        h = self.attend(*(proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v)), scale=C ** -0.5)
        h = self.to_out[0](h.squeeze(1))  # (B, S, C)
        return x + h.transpose(1, 2).view(B, C, H, W)


def fast_vae(vae: AutoencoderKL, config: FastConfig) -> AutoencoderKL:
    """The fast path's VAE: `vae` made channels_last (with config.channels_last), then a copy of it sharing its
    parameters, with the fused modules above in place of the reference's."""
    if config.channels_last:
        vae.to(memory_format=torch.channels_last)
    fast = copy_sharing_parameters(vae)
    replace_modules(fast, {ResnetBlock2D: FastVAEResnetBlock,
                           Attention: lambda m: FastVAEAttention(m, config),
                           Upsample2D: lambda m: FastUpsample(m, config.subpixel_upsample)})
    for coder in (fast.encoder, fast.decoder):
        coder.conv_norm_out, coder.conv_act = GroupNormSiLU(coder.conv_norm_out), nn.Identity()
    return fast
