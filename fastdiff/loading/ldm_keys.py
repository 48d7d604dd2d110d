"""Explicit key maps between the original CompVis/LDM single-file layout and diffusers' state-dict keys.

One function per format. Each takes the part's diffusers-style config dict (`UNetConfig.to_dict()`, ...)
and returns the FULL list of `KeyPair(ldm, diffusers, op)`: every tensor of that part, named in both
layouts. The loader then checks that the checkpoint holds exactly the `ldm` keys (no more, no fewer) and
that every converted tensor has the model's shape; nothing is matched by pattern.

    unet_key_map(config)          model.diffusion_model.*                (SD1, SD2 and SDXL UNets)
    vae_key_map(config)           first_stage_model.*                    (the KL autoencoder)
    openai_clip_key_map(config)   cond_stage_model.transformer.*         (SD1: transformers' CLIP layout)
                                  conditioner.embedders.0.transformer.*  (SDXL base: CLIP ViT-L/14, the same)
    open_clip_key_map(config)     cond_stage_model.model.*               (SD2: OpenCLIP ViT-H/14 text tower)
                                  conditioner.embedders.1.model.*        (SDXL base: OpenCLIP ViT-bigG/14)
                                  conditioner.embedders.0.model.*        (SDXL refiner: ViT-bigG/14 alone)

SDXL files come from Stability's generative-models code ("SGM"), which kept LDM's UNet (adding `label_emb`, the
embedding of the pooled text and the size conditioning, and a transformer depth per level) and wraps the same
two text encoders under `conditioner.embedders.N.`: the LDM maps serve it, with those additions.

Keys are given without the component prefix; `UNET_PREFIX`, ... hold those.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPENAI_CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."

# How an LDM tensor becomes the diffusers tensor.
COPY = "copy"
CONV1X1 = "conv1x1"  # LDM 1x1 conv weight (O, I, 1, 1) -> diffusers linear weight (O, I)
Q, K, V = "q", "k", "v"  # one third, along dim 0, of OpenCLIP's fused attention in_proj (q, k, v stacked)
TRANSPOSE = "transpose"  # OpenCLIP's text_projection (D, P), applied as x @ P -> nn.Linear weight (P, D)


class KeyPair(NamedTuple):
    """One tensor named in both layouts."""

    ldm: str  # key in the single-file checkpoint, without the component prefix
    diffusers: str  # key in the diffusers / transformers (= fastdiff) state dict
    op: str = COPY  # COPY, CONV1X1, TRANSPOSE, or Q / K / V


def _params(ldm: str, diffusers: str, names: tuple[str, ...] = ("weight", "bias"), op: str = COPY) -> list[KeyPair]:
    return [KeyPair(f"{ldm}.{n}", f"{diffusers}.{n}", op) for n in names]


# --- UNet -------------------------------------------------------------------------------------------------

# Inside a transformer block both codebases use the same names (diffusers kept LDM's).
_TRANSFORMER_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "norm2.weight", "norm2.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "norm3.weight", "norm3.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)


def _unet_resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> list[KeyPair]:
    """LDM `ResBlock` -> diffusers `ResnetBlock2D` (with the time-embedding projection)."""
    pairs = (_params(f"{ldm}.in_layers.0", f"{diffusers}.norm1")
             + _params(f"{ldm}.in_layers.2", f"{diffusers}.conv1")
             + _params(f"{ldm}.emb_layers.1", f"{diffusers}.time_emb_proj")
             + _params(f"{ldm}.out_layers.0", f"{diffusers}.norm2")
             + _params(f"{ldm}.out_layers.3", f"{diffusers}.conv2"))
    if in_channels != out_channels:
        pairs += _params(f"{ldm}.skip_connection", f"{diffusers}.conv_shortcut")
    return pairs


def _unet_transformer(ldm: str, diffusers: str, depth: int) -> list[KeyPair]:
    """LDM `SpatialTransformer` -> diffusers `Transformer2DModel`; proj_in/out are convs (SD1) or linears (SD2)
    in both layouts alike."""
    pairs = _params(f"{ldm}.norm", f"{diffusers}.norm") + _params(f"{ldm}.proj_in", f"{diffusers}.proj_in")
    for d in range(depth):
        pairs += [KeyPair(f"{ldm}.transformer_blocks.{d}.{k}", f"{diffusers}.transformer_blocks.{d}.{k}")
                  for k in _TRANSFORMER_BLOCK_KEYS]
    return pairs + _params(f"{ldm}.proj_out", f"{diffusers}.proj_out")


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_key_map(config: Mapping) -> list[KeyPair]:
    """Every UNet tensor as (LDM `openaimodel.UNetModel` key, diffusers `UNet2DConditionModel` key).

    LDM numbers its blocks flat: `input_blocks.0` is conv_in, then per level `layers_per_block` entries
    `input_blocks.n` = [ResBlock, SpatialTransformer?] followed (except at the last level) by a downsampler
    `input_blocks.n.0.op`; `output_blocks` has `layers_per_block + 1` entries per level, lowest resolution
    first, the last one also holding the upsampler at `.1.conv` (no attention) or `.2.conv` (after the
    transformer). `layers_per_block` and `transformer_layers_per_block` may be one int or one per level.
    With addition_embed_type "text_time" (SDXL) SGM's `label_emb.0` (Linear, SiLU, Linear) is diffusers'
    `add_embedding`.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _per_block(config["layers_per_block"], levels)
    depth = _per_block(config.get("transformer_layers_per_block", 1), levels)
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]

    pairs = _params("time_embed.0", "time_embedding.linear_1") + _params("time_embed.2", "time_embedding.linear_2")
    if config.get("addition_embed_type") == "text_time":
        pairs += _params("label_emb.0.0", "add_embedding.linear_1") + _params("label_emb.0.2", "add_embedding.linear_2")
    pairs += _params("input_blocks.0.0", "conv_in")

    n = 1
    out_ch = channels[0]
    for i in range(levels):
        in_ch, out_ch = out_ch, channels[i]
        for j in range(layers[i]):
            pairs += _unet_resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", in_ch if j == 0 else out_ch,
                                  out_ch)
            if down_attn[i]:
                pairs += _unet_transformer(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depth[i])
            n += 1
        if i < levels - 1:
            pairs += _params(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            n += 1

    pairs += (_unet_resnet("middle_block.0", "mid_block.resnets.0", channels[-1], channels[-1])
              + _unet_transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
              + _unet_resnet("middle_block.2", "mid_block.resnets.1", channels[-1], channels[-1]))

    # Up level i mirrors down level (levels - 1 - i); each resnet also takes a skip connection from it.
    reversed_channels = channels[::-1]
    up_layers = [count + 1 for count in layers[::-1]]
    up_depth = depth[::-1]
    n = 0
    out_ch = reversed_channels[0]
    for i in range(levels):
        prev_ch, out_ch = out_ch, reversed_channels[i]
        skip_from_below = reversed_channels[min(i + 1, levels - 1)]
        for j in range(up_layers[i]):
            last = j == up_layers[i] - 1
            skip = skip_from_below if last else out_ch
            resnet_in = (prev_ch if j == 0 else out_ch) + skip
            pairs += _unet_resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", resnet_in, out_ch)
            if up_attn[i]:
                pairs += _unet_transformer(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", up_depth[i])
            if last and i < levels - 1:
                slot = 2 if up_attn[i] else 1
                pairs += _params(f"output_blocks.{n}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv")
            n += 1

    return pairs + _params("out.0", "conv_norm_out") + _params("out.2", "conv_out")


# --- VAE --------------------------------------------------------------------------------------------------

def _vae_resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> list[KeyPair]:
    """LDM `ResnetBlock` (no time embedding) -> diffusers `ResnetBlock2D`."""
    pairs = [pair for name in ("norm1", "conv1", "norm2", "conv2")
             for pair in _params(f"{ldm}.{name}", f"{diffusers}.{name}")]
    if in_channels != out_channels:
        pairs += _params(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return pairs


def _vae_attention(ldm: str, diffusers: str) -> list[KeyPair]:
    """LDM `AttnBlock` (1x1 convs q, k, v, proj_out) -> diffusers `Attention` (linears)."""
    pairs = _params(f"{ldm}.norm", f"{diffusers}.group_norm")
    for src, dst in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        pairs += [KeyPair(f"{ldm}.{src}.weight", f"{diffusers}.{dst}.weight", CONV1X1),
                  KeyPair(f"{ldm}.{src}.bias", f"{diffusers}.{dst}.bias")]
    return pairs


def _vae_mid(ldm: str, diffusers: str, channels: int, attention: bool) -> list[KeyPair]:
    return (_vae_resnet(f"{ldm}.block_1", f"{diffusers}.resnets.0", channels, channels)
            + (_vae_attention(f"{ldm}.attn_1", f"{diffusers}.attentions.0") if attention else [])
            + _vae_resnet(f"{ldm}.block_2", f"{diffusers}.resnets.1", channels, channels))


def vae_key_map(config: Mapping) -> list[KeyPair]:
    """Every VAE tensor as (LDM `AutoencoderKL` key, diffusers `AutoencoderKL` key).

    The LDM decoder numbers its levels by resolution (`up.0` is the full-resolution one, built last), the
    diffusers decoder in execution order: diffusers `up_blocks.i` is LDM `up.{levels - 1 - i}`.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    per_level = config["layers_per_block"]
    mid_attention = config.get("mid_block_add_attention", True)
    quant = (_params("quant_conv", "quant_conv") if config.get("use_quant_conv", True) else []) + (
        _params("post_quant_conv", "post_quant_conv") if config.get("use_post_quant_conv", True) else [])

    pairs = _params("encoder.conv_in", "encoder.conv_in")
    out_ch = channels[0]
    for i in range(levels):
        in_ch, out_ch = out_ch, channels[i]
        for j in range(per_level):
            pairs += _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                 in_ch if j == 0 else out_ch, out_ch)
        if i < levels - 1:
            pairs += _params(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    pairs += (_vae_mid("encoder.mid", "encoder.mid_block", channels[-1], mid_attention)
              + _params("encoder.norm_out", "encoder.conv_norm_out") + _params("encoder.conv_out", "encoder.conv_out")
              + quant + _params("decoder.conv_in", "decoder.conv_in")
              + _vae_mid("decoder.mid", "decoder.mid_block", channels[-1], mid_attention))

    reversed_channels = channels[::-1]
    out_ch = reversed_channels[0]
    for i in range(levels):
        ldm_level = levels - 1 - i
        prev_ch, out_ch = out_ch, reversed_channels[i]
        for j in range(per_level + 1):
            pairs += _vae_resnet(f"decoder.up.{ldm_level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                                 prev_ch if j == 0 else out_ch, out_ch)
        if i < levels - 1:
            pairs += _params(f"decoder.up.{ldm_level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return pairs + _params("decoder.norm_out", "decoder.conv_norm_out") + _params("decoder.conv_out",
                                                                                  "decoder.conv_out")


# --- Text encoders ----------------------------------------------------------------------------------------

_CLIP_LAYER_KEYS = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "layer_norm2.weight", "layer_norm2.bias",
)


def openai_clip_key_map(config: Mapping, text_model_level: bool = True) -> list[KeyPair]:
    """SD1's text encoder: a pickled transformers `CLIPTextModel`, so the keys are transformers' own.

    Checkpoints saved with older transformers have a `text_model.` level, some have none
    (`cond_stage_model.transformer.embeddings...`): `text_model_level` picks which one the file uses.
    """
    ldm_root = "text_model." if text_model_level else ""
    keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    keys += [f"encoder.layers.{i}.{k}" for i in range(config["num_hidden_layers"]) for k in _CLIP_LAYER_KEYS]
    keys += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return [KeyPair(ldm_root + k, "text_model." + k) for k in keys]


def open_clip_key_map(config: Mapping) -> list[KeyPair]:
    """SD2's and SDXL's OpenCLIP text tower (`resblocks.N`, fused q/k/v `in_proj`).

    Only the first `config["num_hidden_layers"]` resblocks are mapped. SD2 conditions on the penultimate
    layer followed by `ln_final`, which is exactly a transformers CLIPTextModel with one layer fewer
    (diffusers' stable-diffusion-2 text_encoder has 23 of the checkpoint's 24 layers); the last resblock,
    `text_projection` and `logit_scale` are never used (`open_clip_unused`). SDXL's ViT-bigG is a
    CLIPTextModelWithProjection (config["projection_dim"] set): every resblock (the penultimate one gives the
    context, the last one the pooled output) and `text_projection`, which OpenCLIP stores as the (D, P) matrix
    it right-multiplies by, the transpose of nn.Linear's weight.
    """
    pairs = [KeyPair("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             KeyPair("positional_embedding", "text_model.embeddings.position_embedding.weight")]
    for i in range(config["num_hidden_layers"]):
        ldm, dif = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        for part, op in (("q", Q), ("k", K), ("v", V)):
            pairs += [KeyPair(f"{ldm}.attn.in_proj_weight", f"{dif}.self_attn.{part}_proj.weight", op),
                      KeyPair(f"{ldm}.attn.in_proj_bias", f"{dif}.self_attn.{part}_proj.bias", op)]
        pairs += (_params(f"{ldm}.attn.out_proj", f"{dif}.self_attn.out_proj")
                  + _params(f"{ldm}.ln_1", f"{dif}.layer_norm1") + _params(f"{ldm}.mlp.c_fc", f"{dif}.mlp.fc1")
                  + _params(f"{ldm}.mlp.c_proj", f"{dif}.mlp.fc2") + _params(f"{ldm}.ln_2", f"{dif}.layer_norm2"))
    pairs += _params("ln_final", "text_model.final_layer_norm")
    if config.get("projection_dim") is not None:
        pairs.append(KeyPair("text_projection", "text_projection.weight", TRANSPOSE))
    return pairs


def open_clip_unused(num_resblocks: int, used_layers: int, projection: bool = False) -> list[str]:
    """OpenCLIP keys a model never reads: the resblocks past the `used_layers` it runs (SD2 stops at the
    penultimate one, SDXL runs them all), the projection into the joint image-text space unless `projection`
    (SDXL pools through it, SD2 does not) and the contrastive temperature."""
    block_keys = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                  "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    return ([f"transformer.resblocks.{i}.{k}" for i in range(used_layers, num_resblocks) for k in block_keys]
            + ([] if projection else ["text_projection"]) + ["logit_scale"])


# --- Applying a map ---------------------------------------------------------------------------------------

_THIRDS = {Q: 0, K: 1, V: 2}


def to_diffusers(ldm: Mapping[str, Tensor], pairs: list[KeyPair]) -> dict[str, Tensor]:
    """The diffusers state dict named by `pairs`, from an LDM state dict holding every `pair.ldm` key."""
    out = {}
    for p in pairs:
        t = ldm[p.ldm]
        if p.op in _THIRDS:
            t = t.chunk(3, dim=0)[_THIRDS[p.op]].clone()  # own storage: a view would pin the fused tensor
        elif p.op == CONV1X1 and t.ndim == 4 and t.shape[2:] == (1, 1):  # re-saved files may hold (O, I) already
            t = t[:, :, 0, 0]
        elif p.op == TRANSPOSE:
            t = t.T.contiguous()
        out[p.diffusers] = t
    return out


def to_ldm(diffusers: Mapping[str, Tensor], pairs: list[KeyPair]) -> dict[str, Tensor]:
    """The inverse of `to_diffusers`: write a diffusers state dict in the LDM layout (q, k, v re-fused,
    projections transposed back)."""
    out = {}
    fused: dict[str, dict[int, Tensor]] = {}
    for p in pairs:
        t = diffusers[p.diffusers]
        if p.op in _THIRDS:
            fused.setdefault(p.ldm, {})[_THIRDS[p.op]] = t
        elif p.op == CONV1X1:
            out[p.ldm] = t[:, :, None, None]
        elif p.op == TRANSPOSE:
            out[p.ldm] = t.T.contiguous()
        else:
            out[p.ldm] = t
    for key, parts in fused.items():
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out
