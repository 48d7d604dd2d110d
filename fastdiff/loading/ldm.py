"""Single-file Stable Diffusion 1.x / 2.x checkpoints in the original CompVis/LDM layout.

One file (`.safetensors`, or `.ckpt` / `.pt` read with torch.load(weights_only=True), bare or wrapped in
Lightning's `{"state_dict": ...}`) holds the whole model under one prefix per part:

    model.diffusion_model.           UNet                                      ldm_keys.unet_key_map
    first_stage_model.               VAE                                       ldm_keys.vae_key_map
    cond_stage_model.transformer.    SD1 text encoder (transformers CLIP)      ldm_keys.openai_clip_key_map
    cond_stage_model.model.          SD2 text encoder (OpenCLIP ViT-H/14)      ldm_keys.open_clip_key_map

Every other key is training state and ignored: the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...)
and EMA bookkeeping (`model_ema.*`). The UNet is read from `model.diffusion_model.`, as diffusers does by
default; in "-ema-only" files that already is the EMA copy.

SD1 vs SD2 is told by the layout: SD2 pairs linear transformer projections (proj_in of shape (C, C), SD1
has 1x1 convs) with an OpenCLIP text encoder; real files also differ in context width (768 vs 1024), but
small models of either shape load too. The architecture is read from tensor shapes (`infer_*_config`).
What shapes cannot tell, and what is assumed:
    attention heads      UNet: SD1 8 per level, SD2 64-wide heads; CLIP: 64-wide heads (as in SD1 and SD2)
    GroupNorm groups     32, as in every SD model
    prediction_type      "epsilon". SD2 768-v (v_prediction) and SD2 512-base (epsilon) have identical
                         tensors: load 768-v files with
                         config={"scheduler": {"prediction_type": "v_prediction"}, "unet": {"sample_size": 96}}
    sample_size          64 latents (512 px), the pipeline's default image size
    VAE scaling_factor   0.18215 (SD1 and SD2)
All can be set with `config=`: a diffusers folder whose configs replace the inferred ones, or per-part
dicts merged over them (see `common.Overrides`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from fastdiff.models.clip import CLIPTextConfig, CLIPTextModel
from fastdiff.models.tokenizer import CLIPTokenizer
from fastdiff.models.unet import UNet2DConditionModel, UNetConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

from .common import (CheckpointError, Components, Overrides, StateDict, build_model, list_keys, load_tokenizer,
                     make_config, read_state_dict)
from .ldm_keys import (OPEN_CLIP_PREFIX, OPENAI_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, KeyPair, open_clip_key_map,
                       open_clip_unused, openai_clip_key_map, to_diffusers, unet_key_map, vae_key_map)

SD1, SD2 = "SD1", "SD2"

# What diffusers' SD1.5 / SD2 scheduler_config.json say; a single file stores no sampler settings.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",  # SD2 768-v needs "v_prediction", which the weights cannot reveal
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# SD1 pads prompts with <|endoftext|>; SD2 (OpenCLIP's tokenizer) pads with "!" (id 0).
_PAD_TOKEN = {SD1: "<|endoftext|>", SD2: "!"}
_DEFAULT_SAMPLE_SIZE = 64  # latents; 512 px
_HEAD_DIM = 64  # SD2 UNet and both CLIP text encoders
_SD1_UNET_HEADS = 8


def _sub(state_dict: Mapping, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count(sd: Mapping, pattern: str) -> int:
    """How many consecutive i = 0, 1, ... have `pattern.format(i)` in sd."""
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


class _Inferred:
    """Settings read from shapes, plus those the shapes cannot determine (with the reason), per part."""

    def __init__(self, part: str, prefix: str, sd: Mapping):
        self.part, self.prefix, self.sd = part, prefix, sd
        self.settings: dict = {}
        self.unknown: dict[str, str] = {}  # setting -> why it cannot be inferred

    def shape(self, key: str) -> torch.Size:
        if key not in self.sd:
            raise CheckpointError(f"the {self.part} weights lack {self.prefix}{key}, which every SD1/SD2 "
                                  f"checkpoint has; the file is not a complete Stable Diffusion checkpoint")
        return self.sd[key].shape

    def resolve(self, overrides: Overrides) -> dict:
        settings = overrides.apply(self.part, self.settings)
        unresolved = {k: why for k, why in self.unknown.items() if k not in overrides.settings.get(self.part, {})}
        if unresolved:
            key, why = next(iter(unresolved.items()))
            raise CheckpointError(f"cannot infer the {self.part} setting {key} from the weights ({why}); "
                                  f"pass it as load_components(..., config={{{self.part!r}: {{{key!r}: ...}}}})")
        return settings


def infer_unet_config(sd: Mapping, family: str) -> _Inferred:
    """diffusers unet/config.json settings of an LDM UNet (keys without `model.diffusion_model.`)."""
    inf = _Inferred("unet", UNET_PREFIX, sd)
    in_channels = inf.shape("input_blocks.0.0.weight")[1]  # conv_in (C0, Cin, 3, 3)

    # input_blocks after conv_in: per level its resnets' indices, levels separated by downsamplers.
    levels: list[list[int]] = [[]]
    n = 1
    while True:
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
        elif f"input_blocks.{n}.0.out_layers.3.weight" in sd:
            levels[-1].append(n)
        else:
            break
        n += 1
    if not all(levels):
        raise CheckpointError(f"the UNet's input_blocks do not form levels of resnets separated by downsamplers: "
                              f"{[len(level) for level in levels]} resnets per level")
    channels = [inf.shape(f"input_blocks.{level[0]}.0.out_layers.3.weight")[0] for level in levels]
    layers = [len(level) for level in levels]
    down_attention = [f"input_blocks.{level[0]}.1.proj_in.weight" in sd for level in levels]

    up_attention, n = [], 0
    for count in layers[::-1]:
        up_attention.append(f"output_blocks.{n}.1.proj_in.weight" in sd)
        n += count + 1

    # Transformer depth of each attention level (read at its first resnet) and of the middle block.
    depths = {_count(sd, f"input_blocks.{level[0]}.1.transformer_blocks.{{}}.norm1.weight")
              for level, attention in zip(levels, down_attention) if attention}
    depths.add(_count(sd, "middle_block.1.transformer_blocks.{}.norm1.weight"))
    if len(depths) > 1:
        inf.unknown["transformer_layers_per_block"] = f"transformer depths {sorted(depths)} differ between levels"

    proj_in = inf.shape("middle_block.1.proj_in.weight")  # SD2 (C, C) linear, SD1 (C, C, 1, 1) conv
    if family == SD1:
        heads = _SD1_UNET_HEADS
    else:
        heads = [c // _HEAD_DIM for c in channels]
        if any(c % _HEAD_DIM for c in channels):
            inf.unknown["attention_head_dim"] = (f"SD2 uses {_HEAD_DIM}-wide heads but the level channels "
                                                 f"{channels} are not all multiples of {_HEAD_DIM}")
    inf.settings = {
        "sample_size": _DEFAULT_SAMPLE_SIZE,
        "in_channels": in_channels,
        "out_channels": inf.shape("out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "transformer_layers_per_block": depths.pop() if len(depths) == 1 else None,
        "cross_attention_dim": inf.shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
    }
    return inf


def infer_vae_config(sd: Mapping) -> _Inferred:
    """diffusers vae/config.json settings of an LDM autoencoder (keys without `first_stage_model.`)."""
    inf = _Inferred("vae", VAE_PREFIX, sd)
    inf.shape("encoder.down.0.block.0.conv1.weight")  # the first level must exist
    channels = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                for i in range(_count(sd, "encoder.down.{}.block.0.conv1.weight"))]
    inf.settings = {
        "in_channels": inf.shape("encoder.conv_in.weight")[1],
        "out_channels": inf.shape("decoder.conv_out.weight")[0],
        "latent_channels": inf.shape("decoder.conv_in.weight")[1],
        "block_out_channels": channels,
        "layers_per_block": _count(sd, "encoder.down.0.block.{}.conv1.weight"),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "sample_size": 8 * _DEFAULT_SAMPLE_SIZE,
        "scaling_factor": 0.18215,
    }
    return inf


def _text_settings(inf: _Inferred, token_embedding: str, position_embedding: str, fc1: str, layers: int,
                   hidden_act: str) -> None:
    vocab_size, hidden = inf.shape(token_embedding)
    if hidden % _HEAD_DIM:
        inf.unknown["num_attention_heads"] = f"hidden size {hidden} is not a multiple of the {_HEAD_DIM}-wide heads"
    inf.settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inf.shape(fc1)[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // _HEAD_DIM,
        "max_position_embeddings": inf.shape(position_embedding)[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }


def infer_openai_clip_config(sd: Mapping) -> _Inferred:
    """transformers text_encoder/config.json settings of SD1's text encoder (keys without
    `cond_stage_model.transformer.`, with or without the `text_model.` level)."""
    inf = _Inferred("text_encoder", OPENAI_CLIP_PREFIX, sd)
    root = _openai_clip_root(sd)
    _text_settings(inf, f"{root}embeddings.token_embedding.weight", f"{root}embeddings.position_embedding.weight",
                   f"{root}encoder.layers.0.mlp.fc1.weight", _count(sd, root + "encoder.layers.{}.layer_norm1.weight"),
                   "quick_gelu")
    return inf


def infer_open_clip_config(sd: Mapping) -> _Inferred:
    """transformers text_encoder/config.json settings of SD2's OpenCLIP text encoder (keys without
    `cond_stage_model.model.`): all resblocks but the last, which SD2 does not use."""
    inf = _Inferred("text_encoder", OPEN_CLIP_PREFIX, sd)
    resblocks = _count(sd, "transformer.resblocks.{}.ln_1.weight")
    _text_settings(inf, "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
                   max(resblocks - 1, 0), "gelu")
    return inf


def _openai_clip_root(sd: Mapping) -> str:
    return "text_model." if any(k.startswith("text_model.") for k in sd) else ""


def _detect(state_dict: Mapping, path: Path) -> tuple[str, StateDict, StateDict, StateDict]:
    """(family, unet, vae, text encoder) state dicts, prefixes removed; raises on anything but SD1/SD2."""
    unet, vae = _sub(state_dict, UNET_PREFIX), _sub(state_dict, VAE_PREFIX)
    openai_clip, open_clip = _sub(state_dict, OPENAI_CLIP_PREFIX), _sub(state_dict, OPEN_CLIP_PREFIX)
    if not unet:
        roots = sorted({k.split(".", 1)[0] for k in state_dict})
        if any(k.startswith("conditioner.embedders.") for k in state_dict):
            hint = " (conditioner.embedders.* is SDXL, which fastdiff does not support)"
        elif any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in state_dict):
            hint = " (these are diffusers/transformers names of one part: load the whole diffusers folder)"
        else:
            hint = ""
        raise CheckpointError(
            f"{path} is not a Stable Diffusion 1.x/2.x single-file checkpoint{hint}: expected keys under "
            f"{UNET_PREFIX}*, {VAE_PREFIX}* and {OPENAI_CLIP_PREFIX}* (SD1) or {OPEN_CLIP_PREFIX}* (SD2); "
            f"its top-level key prefixes are {list_keys(roots)}")
    if not vae:
        raise CheckpointError(f"{path} has a UNet but no VAE: no keys under {VAE_PREFIX}")
    if bool(openai_clip) == bool(open_clip):
        found = "both" if openai_clip else "neither"
        raise CheckpointError(f"{path} must hold one text encoder, under {OPENAI_CLIP_PREFIX} (SD1) or "
                              f"{OPEN_CLIP_PREFIX} (SD2); it has {found}")
    proj_in = unet.get("middle_block.1.proj_in.weight")
    if proj_in is None:
        raise CheckpointError(f"{path} lacks {UNET_PREFIX}middle_block.1.proj_in.weight: the UNet has no "
                              f"middle transformer, so it is not an SD1/SD2 UNet")
    family = SD2 if proj_in.ndim == 2 else SD1
    if (family == SD2) != bool(open_clip):
        raise CheckpointError(
            f"{path} pairs a UNet with {'linear' if family == SD2 else '1x1 conv'} transformer projections "
            f"({family}) with an {'OpenCLIP' if open_clip else 'OpenAI CLIP'} text encoder "
            f"({SD2 if open_clip else SD1}); fastdiff knows only the SD1 and SD2 combinations")
    return family, unet, vae, openai_clip or open_clip


class _Part(NamedTuple):
    """One model inside the file."""

    name: str  # for messages
    model_cls: type
    config: object  # the model_cls config
    sd: StateDict  # the file's tensors of this part, prefix removed
    pairs: list[KeyPair]  # its key map for `config`
    ignored: list[str]  # keys the file may hold that the model does not use
    prefix: str


def _check_keys(part: _Part, path: Path) -> None:
    """The file must hold exactly the keys of the part's map (plus known-unused ones)."""
    expected = {p.ldm for p in part.pairs}
    present = set(part.sd) - set(part.ignored)
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {list_keys(part.prefix + k for k in missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {list_keys(part.prefix + k for k in unexpected)}")
        raise CheckpointError(f"the {part.name} of {path} does not have the keys of the architecture inferred "
                              f"from its shapes: " + "; ".join(problems))


def load_ldm_checkpoint(path: Path, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                        overrides: Optional[Overrides] = None) -> Components:
    """Load a single-file SD1/SD2 checkpoint; see the module docstring for what is inferred and assumed."""
    overrides = overrides or Overrides()
    state_dict = read_state_dict(path)
    family, unet_sd, vae_sd, text_sd = _detect(state_dict, path)

    unet_config = make_config(UNetConfig, infer_unet_config(unet_sd, family).resolve(overrides), f"UNet of {path}")
    vae_config = make_config(VAEConfig, infer_vae_config(vae_sd).resolve(overrides), f"VAE of {path}")
    if family == SD1:
        text_inferred = infer_openai_clip_config(text_sd)
    else:
        text_inferred = infer_open_clip_config(text_sd)
    text_config = make_config(CLIPTextConfig, text_inferred.resolve(overrides), f"text encoder of {path}")
    if unet_config.cross_attention_dim != text_config.hidden_size:
        raise CheckpointError(f"{path}: the UNet cross-attends to a {unet_config.cross_attention_dim}-wide context "
                              f"but the text encoder is {text_config.hidden_size} wide")

    unet_pairs = unet_key_map(unet_config.to_dict())
    vae_pairs = vae_key_map(vae_config.to_dict())
    if family == SD1:
        root = _openai_clip_root(text_sd)
        text_pairs = openai_clip_key_map(text_config.to_dict(), text_model_level=bool(root))
        text_ignored = [f"{root}embeddings.position_ids"]  # a buffer (0..76) older transformers saved
        text_prefix = OPENAI_CLIP_PREFIX
    else:
        resblocks = _count(text_sd, "transformer.resblocks.{}.ln_1.weight")
        text_pairs = open_clip_key_map(text_config.to_dict())
        text_ignored = open_clip_unused(resblocks, text_config.num_hidden_layers)
        text_prefix = OPEN_CLIP_PREFIX
    parts = (_Part("UNet", UNet2DConditionModel, unet_config, unet_sd, unet_pairs, [], UNET_PREFIX),
             _Part("VAE", AutoencoderKL, vae_config, vae_sd, vae_pairs, [], VAE_PREFIX),
             _Part("text encoder", CLIPTextModel, text_config, text_sd, text_pairs, text_ignored, text_prefix))
    for part in parts:  # every key problem of every part is found before any weight is converted
        _check_keys(part, path)
    unet, vae, text_encoder = (
        build_model(part.model_cls, part.config, to_diffusers(part.sd, part.pairs), f"the {part.name} of {path}",
                    device, dtype, file_keys={p.diffusers: part.prefix + p.ldm for p in part.pairs})
        for part in parts)

    if overrides.tokenizer_folder is not None:
        tokenizer = load_tokenizer(overrides.tokenizer_folder, "tokenizer of the config= folder")
    else:
        tokenizer = CLIPTokenizer.default(pad_token=_PAD_TOKEN[family])
    scheduler_config = overrides.apply("scheduler", SD_SCHEDULER_CONFIG)
    return Components(unet, vae, text_encoder, tokenizer, scheduler_config,
                      source=f"single-file {family} checkpoint {path} (architecture inferred from tensor shapes, "
                             f"prediction_type {scheduler_config.get('prediction_type', 'epsilon')})")
