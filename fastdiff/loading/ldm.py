"""Single-file Stable Diffusion 1.x / 2.x / XL checkpoints in the original CompVis/LDM layout (SDXL: Stability's
generative-models layout, which kept LDM's names).

One file (`.safetensors`, or `.ckpt` / `.pt` read with torch.load(weights_only=True), bare or wrapped in
Lightning's `{"state_dict": ...}`) holds the whole model under one prefix per part:

    model.diffusion_model.                UNet                                     ldm_keys.unet_key_map
    first_stage_model.                    VAE                                      ldm_keys.vae_key_map
    cond_stage_model.transformer.         SD1 text encoder (transformers CLIP)     ldm_keys.openai_clip_key_map
    cond_stage_model.model.               SD2 text encoder (OpenCLIP ViT-H/14)     ldm_keys.open_clip_key_map
    conditioner.embedders.0.transformer.  SDXL base text_encoder (CLIP ViT-L/14)   ldm_keys.openai_clip_key_map
    conditioner.embedders.1.model.        SDXL base text_encoder_2 (ViT-bigG/14)   ldm_keys.open_clip_key_map
    conditioner.embedders.0.model.        SDXL refiner text_encoder_2 (bigG alone) ldm_keys.open_clip_key_map

Every other key is training state and ignored: the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...)
and EMA bookkeeping (`model_ema.*`). The UNet is read from `model.diffusion_model.`, as diffusers does by
default; in "-ema-only" files that already is the EMA copy.

The family is told by the layout. `conditioner.embedders.` is SDXL: CLIP ViT-L and ViT-bigG side by side the
base, bigG alone the refiner. Otherwise SD2 pairs linear transformer projections (proj_in of shape (C, C), SD1
has 1x1 convs) with an OpenCLIP text encoder; real files also differ in context width (768 vs 1024), but
small models of either shape load too. The architecture is read from tensor shapes (`infer_*_config`),
including SDXL's transformer depth per level and its add embedding's width (`label_emb`).
What shapes cannot tell, and what is assumed:
    attention heads      UNet: SD1 8 per level, SD2 and SDXL 64-wide heads; CLIP: 64-wide heads (every SD model)
    GroupNorm groups     32, as in every SD model
    time id embedding    SDXL: addition_time_embed_dim 256, checked against the add embedding's width, which
                         is the pooled text embedding plus 6 time ids (base) or 5 (refiner: aesthetic score)
    prediction_type      "epsilon". SD2 768-v (v_prediction) and SD2 512-base (epsilon) have identical
                         tensors: load 768-v files with
                         config={"scheduler": {"prediction_type": "v_prediction"}, "unet": {"sample_size": 96}}
    sample_size          64 latents (512 px) for SD1/SD2, 128 (1024 px) for SDXL: the default image size
    VAE scaling_factor   0.18215 (SD1 and SD2), 0.13025 (SDXL)
    scheduler            diffusers' published scheduler_config.json of the family (SDXL: EulerDiscreteScheduler)
    pipeline options     SDXL base: force_zeros_for_empty_prompt; refiner: requires_aesthetics_score, as the
                         published model_index.json files say
All can be set with `config=`: a diffusers folder whose configs replace the inferred ones, or per-part
dicts merged over them (see `common.Overrides`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from fastdiff.models.clip import WITH_PROJECTION, CLIPTextConfig, CLIPTextModel
from fastdiff.models.tokenizer import CLIPTokenizer
from fastdiff.models.unet import UNet2DConditionModel, UNetConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

from .common import (CheckpointError, Components, Overrides, StateDict, build_model, list_keys, load_tokenizer,
                     make_config, read_state_dict)
from .ldm_keys import (OPEN_CLIP_PREFIX, OPENAI_CLIP_PREFIX, SDXL_BIGG_PREFIX, SDXL_CLIP_L_PREFIX,
                       SDXL_REFINER_BIGG_PREFIX, UNET_PREFIX, VAE_PREFIX, KeyPair, open_clip_key_map,
                       open_clip_unused, openai_clip_key_map, to_diffusers, unet_key_map, vae_key_map)

SD1, SD2, SDXL, SDXL_REFINER = "SD1", "SD2", "SDXL", "SDXL refiner"
XL = (SDXL, SDXL_REFINER)

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
# What diffusers' SDXL base and refiner scheduler_config.json say: SD's betas, sampled with Euler.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
_SCHEDULER_CONFIG = {SD1: SD_SCHEDULER_CONFIG, SD2: SD_SCHEDULER_CONFIG, SDXL: SDXL_SCHEDULER_CONFIG,
                     SDXL_REFINER: SDXL_SCHEDULER_CONFIG}
# The published SDXL model_index.json settings (`Components.options`): the base encodes an empty negative prompt
# as zeros, the refiner conditions on an aesthetic score in place of the target size.
_OPTIONS = {SD1: {}, SD2: {}, SDXL: {"force_zeros_for_empty_prompt": True},
            SDXL_REFINER: {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}

_SAMPLE_SIZE = {SD1: 64, SD2: 64, SDXL: 128, SDXL_REFINER: 128}  # latents; 512 px, 1024 px
_VAE_SCALING_FACTOR = {SD1: 0.18215, SD2: 0.18215, SDXL: 0.13025, SDXL_REFINER: 0.13025}
_HEAD_DIM = 64  # SD2 and SDXL UNets and every CLIP text encoder
_SD1_UNET_HEADS = 8
_SDXL_TIME_EMBED_DIM = 256  # sinusoidal embedding width of each SDXL time id
_SDXL_TIME_IDS = {SDXL: 6, SDXL_REFINER: 5}  # (height, width) x (original, crop, target); the refiner's aesthetic
#   score replaces the target size
_SDXL_UNET_KEY = "label_emb.0.0.weight"  # the add embedding's first layer (time embed width, its input width)


class _Encoder(NamedTuple):
    """One text encoder of a family, as the file stores it."""

    part: str  # the Components field and config= part: "text_encoder" or "text_encoder_2"
    name: str  # for messages
    prefix: str
    open_clip: bool  # OpenCLIP's layout (resblocks, fused in_proj); else transformers' CLIP keys
    pad_token: str  # OpenAI CLIP's tokenizer pads with <|endoftext|>, OpenCLIP's with "!" (id 0)


_CLIP_L = _Encoder("text_encoder", "text encoder", OPENAI_CLIP_PREFIX, False, "<|endoftext|>")
_ENCODERS = {
    SD1: (_CLIP_L,),
    SD2: (_Encoder("text_encoder", "text encoder", OPEN_CLIP_PREFIX, True, "!"),),
    SDXL: (_CLIP_L._replace(prefix=SDXL_CLIP_L_PREFIX),
           _Encoder("text_encoder_2", "text encoder 2", SDXL_BIGG_PREFIX, True, "!")),
    SDXL_REFINER: (_Encoder("text_encoder_2", "text encoder 2", SDXL_REFINER_BIGG_PREFIX, True, "!"),),
}


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
            raise CheckpointError(f"the {self.part} weights lack {self.prefix}{key}, which every checkpoint of "
                                  f"this layout has; the file is not a complete Stable Diffusion checkpoint")
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
    # Where each level's first transformer would be: after its first resnet going down, and in its first
    # output_blocks entry coming up (output_blocks run lowest level first, layers + 1 entries per level).
    down_first = [f"input_blocks.{level[0]}.1" for level in levels]
    up_first = [f"output_blocks.{sum(count + 1 for count in layers[i + 1:])}.1" for i in range(len(levels))]
    down_attention = [f"{block}.proj_in.weight" in sd for block in down_first]
    up_attention = [f"{block}.proj_in.weight" in sd for block in up_first]

    # Transformer depth per level, read where the level has transformers (the last level's mid block counts).
    # A level without any has no depth: 1 stands there, as in diffusers' configs (SDXL's [1, 2, 10]).
    depths: list[Optional[int]] = []
    for i in range(len(levels)):
        blocks = [block for block, present in ((down_first[i], down_attention[i]), (up_first[i], up_attention[i]),
                                               ("middle_block.1", i == len(levels) - 1)) if present]
        depths.append(_count(sd, blocks[0] + ".transformer_blocks.{}.norm1.weight") if blocks else None)
    known = {d for d in depths if d is not None}

    proj_in = inf.shape("middle_block.1.proj_in.weight")  # SD2/SDXL (C, C) linear, SD1 (C, C, 1, 1) conv
    if family == SD1:
        heads = _SD1_UNET_HEADS
    else:
        heads = [c // _HEAD_DIM for c in channels]
        if any(c % _HEAD_DIM for c in channels):
            inf.unknown["attention_head_dim"] = (f"{family} uses {_HEAD_DIM}-wide heads but the level channels "
                                                 f"{channels} are not all multiples of {_HEAD_DIM}")
    inf.settings = {
        "sample_size": _SAMPLE_SIZE[family],
        "in_channels": in_channels,
        "out_channels": inf.shape("out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention[::-1]],
        "transformer_layers_per_block": known.pop() if len(known) == 1 else [d or 1 for d in depths],
        "cross_attention_dim": inf.shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
    }
    if family in XL:
        inf.settings.update({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": inf.shape(_SDXL_UNET_KEY)[1],
        })
    return inf


def infer_vae_config(sd: Mapping, family: str) -> _Inferred:
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
        "sample_size": 8 * _SAMPLE_SIZE[family],
        "scaling_factor": _VAE_SCALING_FACTOR[family],
        "force_upcast": True,  # diffusers' default and SDXL's setting: SDXL's VAE overflows float16
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
        "eos_token_id": 2,  # what every published SD and SDXL text encoder config says (see CLIPTextConfig)
    }


def infer_openai_clip_config(sd: Mapping, prefix: str = OPENAI_CLIP_PREFIX) -> _Inferred:
    """transformers text_encoder/config.json settings of SD1's text encoder or SDXL's CLIP ViT-L (keys without
    `prefix`, with or without the `text_model.` level)."""
    inf = _Inferred("text_encoder", prefix, sd)
    root = _openai_clip_root(sd)
    _text_settings(inf, f"{root}embeddings.token_embedding.weight", f"{root}embeddings.position_embedding.weight",
                   f"{root}encoder.layers.0.mlp.fc1.weight", _count(sd, root + "encoder.layers.{}.layer_norm1.weight"),
                   "quick_gelu")
    return inf


def infer_open_clip_config(sd: Mapping, with_projection: bool = False, part: str = "text_encoder",
                           prefix: str = OPEN_CLIP_PREFIX) -> _Inferred:
    """transformers config.json settings of an OpenCLIP text encoder (keys without `prefix`). SD2's
    (with_projection False): all resblocks but the last, which SD2 does not use. SDXL's ViT-bigG (True): every
    resblock, as a CLIPTextModelWithProjection whose projection_dim is text_projection's (D, P) width."""
    inf = _Inferred(part, prefix, sd)
    resblocks = _count(sd, "transformer.resblocks.{}.ln_1.weight")
    _text_settings(inf, "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
                   resblocks if with_projection else max(resblocks - 1, 0), "gelu")
    if with_projection:
        inf.settings.update({"architectures": WITH_PROJECTION, "projection_dim": inf.shape("text_projection")[1]})
    return inf


def _openai_clip_root(sd: Mapping) -> str:
    return "text_model." if any(k.startswith("text_model.") for k in sd) else ""


def _detect(state_dict: Mapping, path: Path) -> tuple[str, StateDict, StateDict]:
    """(family, unet, vae state dicts with their prefixes removed); raises on anything but SD1/SD2/SDXL."""
    unet, vae = _sub(state_dict, UNET_PREFIX), _sub(state_dict, VAE_PREFIX)
    if not unet:
        roots = sorted({k.split(".", 1)[0] for k in state_dict})
        hint = ""
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in state_dict):
            hint = " (these are diffusers/transformers names of one part: load the whole diffusers folder)"
        raise CheckpointError(
            f"{path} is not a Stable Diffusion 1.x/2.x/XL single-file checkpoint{hint}: expected keys under "
            f"{UNET_PREFIX}*, {VAE_PREFIX}* and the text encoders' prefix, {OPENAI_CLIP_PREFIX}* (SD1), "
            f"{OPEN_CLIP_PREFIX}* (SD2) or conditioner.embedders.* (SDXL); its top-level key prefixes are "
            f"{list_keys(roots)}")
    if not vae:
        raise CheckpointError(f"{path} has a UNet but no VAE: no keys under {VAE_PREFIX}")
    sd_text = any(k.startswith("cond_stage_model.") for k in state_dict)
    # "conditioner.embedders.N.transformer." or "conditioner.embedders.N.model.": which encoder sits where
    embedders = {".".join(k.split(".", 4)[:4]) + "." for k in state_dict if k.startswith("conditioner.embedders.")}
    if embedders:
        if sd_text:
            raise CheckpointError(f"{path} holds text encoders under both cond_stage_model. (SD1/SD2) and "
                                  f"conditioner.embedders. (SDXL)")
        return _detect_xl(embedders, unet, path), unet, vae
    return _detect_sd(state_dict, unet, path), unet, vae


def _detect_sd(state_dict: Mapping, unet: Mapping, path: Path) -> str:
    """SD1 or SD2, from the text encoder's prefix and the UNet's transformer projections, which must agree."""
    openai_clip = any(k.startswith(OPENAI_CLIP_PREFIX) for k in state_dict)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict)
    if openai_clip == open_clip:
        found = "both" if openai_clip else "neither"
        raise CheckpointError(f"{path} must hold one text encoder, under {OPENAI_CLIP_PREFIX} (SD1) or "
                              f"{OPEN_CLIP_PREFIX} (SD2), or SDXL's under conditioner.embedders.; it has {found}")
    proj_in = unet.get("middle_block.1.proj_in.weight")
    if proj_in is None:
        raise CheckpointError(f"{path} lacks {UNET_PREFIX}middle_block.1.proj_in.weight: the UNet has no "
                              f"middle transformer, so it is not an SD1/SD2 UNet")
    family = SD2 if proj_in.ndim == 2 else SD1
    if (family == SD2) != open_clip:
        raise CheckpointError(
            f"{path} pairs a UNet with {'linear' if family == SD2 else '1x1 conv'} transformer projections "
            f"({family}) with an {'OpenCLIP' if open_clip else 'OpenAI CLIP'} text encoder "
            f"({SD2 if open_clip else SD1}); fastdiff knows only the SD1 and SD2 combinations")
    return family


def _detect_xl(embedders: set[str], unet: Mapping, path: Path) -> str:
    """SDXL base (CLIP ViT-L and OpenCLIP ViT-bigG) or refiner (bigG alone), from the embedders' prefixes; the UNet
    must have SDXL's add embedding."""
    layouts = {family: {e.prefix for e in _ENCODERS[family]} for family in XL}
    family = next((f for f, prefixes in layouts.items() if embedders == prefixes), None)
    if family is None:
        expected = "; ".join(f"{f}: {', '.join(sorted(prefixes))}" for f, prefixes in layouts.items())
        raise CheckpointError(f"{path} has SDXL text encoders under {', '.join(sorted(embedders))}, which is neither "
                              f"SDXL layout ({expected})")
    if _SDXL_UNET_KEY not in unet:
        raise CheckpointError(f"{path} has {family}'s text encoders but its UNet lacks {UNET_PREFIX}{_SDXL_UNET_KEY}, "
                              f"the embedding of SDXL's pooled text and size conditioning")
    return family


def _check_fit(family: str, unet: UNetConfig, texts: Mapping[str, CLIPTextConfig], path: Path) -> None:
    """The inferred parts must fit together: the UNet's context is the text encoders' hidden states side by side,
    and SDXL's add embedding reads the second encoder's pooled projection and the family's time ids."""
    widths = [config.hidden_size for config in texts.values()]
    if unet.cross_attention_dim != sum(widths):
        raise CheckpointError(f"{path}: the UNet cross-attends to a {unet.cross_attention_dim}-wide context but the "
                              f"text encoders are {' + '.join(map(str, widths))} wide")
    if family in XL:
        pooled, ids = texts["text_encoder_2"].projection_dim, _SDXL_TIME_IDS[family]
        expected = pooled + ids * unet.addition_time_embed_dim
        if unet.projection_class_embeddings_input_dim != expected:
            raise CheckpointError(
                f"{path}: the UNet's add embedding ({UNET_PREFIX}{_SDXL_UNET_KEY}) reads "
                f"{unet.projection_class_embeddings_input_dim} features, but {family} gives it the pooled text "
                f"embedding ({pooled}) and {ids} time ids x addition_time_embed_dim "
                f"{unet.addition_time_embed_dim} = {expected}")


class _Part(NamedTuple):
    """One model inside the file."""

    name: str  # for messages
    model_cls: type
    config: object  # the model_cls config
    sd: StateDict  # the file's tensors of this part, prefix removed
    pairs: list[KeyPair]  # its key map for `config`
    ignored: list[str]  # keys the file may hold that the model does not use
    prefix: str


def _text_part(encoder: _Encoder, config: CLIPTextConfig, sd: StateDict) -> _Part:
    if encoder.open_clip:
        resblocks = _count(sd, "transformer.resblocks.{}.ln_1.weight")
        pairs = open_clip_key_map(config.to_dict())
        ignored = open_clip_unused(resblocks, config.num_hidden_layers, projection=config.projection_dim is not None)
    else:
        root = _openai_clip_root(sd)
        pairs = openai_clip_key_map(config.to_dict(), text_model_level=bool(root))
        ignored = [f"{root}embeddings.position_ids"]  # a buffer (0..76) older transformers saved
    return _Part(encoder.name, CLIPTextModel, config, sd, pairs, ignored, encoder.prefix)


def _key_problems(part: _Part, path: Path) -> Optional[str]:
    """What keeps the file from holding exactly the keys of the part's map (plus known-unused ones), if anything."""
    expected = {p.ldm for p in part.pairs}
    present = set(part.sd) - set(part.ignored)
    missing, unexpected = expected - present, present - expected
    if not (missing or unexpected):
        return None
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {list_keys(part.prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {list_keys(part.prefix + k for k in unexpected)}")
    return (f"the {part.name} of {path} does not have the keys of the architecture inferred from its shapes: "
            + "; ".join(problems))


def load_ldm_checkpoint(path: Path, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                        overrides: Optional[Overrides] = None) -> Components:
    """Load a single-file SD1/SD2/SDXL checkpoint; see the module docstring for what is inferred and assumed."""
    overrides = overrides or Overrides()
    state_dict = read_state_dict(path)
    family, unet_sd, vae_sd = _detect(state_dict, path)
    encoders = _ENCODERS[family]
    text_sds = {e.part: _sub(state_dict, e.prefix) for e in encoders}

    unet_config = make_config(UNetConfig, infer_unet_config(unet_sd, family).resolve(overrides), f"UNet of {path}")
    vae_config = make_config(VAEConfig, infer_vae_config(vae_sd, family).resolve(overrides), f"VAE of {path}")
    text_configs = {}
    for e in encoders:
        if e.open_clip:
            inferred = infer_open_clip_config(text_sds[e.part], with_projection=family in XL, part=e.part,
                                              prefix=e.prefix)
        else:
            inferred = infer_openai_clip_config(text_sds[e.part], e.prefix)
        text_configs[e.part] = make_config(CLIPTextConfig, inferred.resolve(overrides), f"{e.name} of {path}")
    _check_fit(family, unet_config, text_configs, path)

    parts = {"unet": _Part("UNet", UNet2DConditionModel, unet_config, unet_sd, unet_key_map(unet_config.to_dict()),
                           [], UNET_PREFIX),
             "vae": _Part("VAE", AutoencoderKL, vae_config, vae_sd, vae_key_map(vae_config.to_dict()), [], VAE_PREFIX),
             **{e.part: _text_part(e, text_configs[e.part], text_sds[e.part]) for e in encoders}}
    # Every key problem of every part is reported at once, before any weight is converted.
    problems = [problem for part in parts.values() if (problem := _key_problems(part, path))]
    if problems:
        raise CheckpointError("; ".join(problems))
    models = {name: build_model(part.model_cls, part.config, to_diffusers(part.sd, part.pairs),
                                f"the {part.name} of {path}", device, dtype,
                                file_keys={p.diffusers: part.prefix + p.ldm for p in part.pairs})
              for name, part in parts.items()}

    tokenizers = {}
    for e in encoders:
        # a config= folder's tokenizer/ replaces the first tokenizer only: SDXL's second pads differently
        if e.part == "text_encoder" and overrides.tokenizer_folder is not None:
            tokenizers[e.part] = load_tokenizer(overrides.tokenizer_folder, "tokenizer of the config= folder")
        else:
            tokenizers[e.part] = CLIPTokenizer.default(pad_token=e.pad_token)
    scheduler_config = overrides.apply("scheduler", _SCHEDULER_CONFIG[family])
    return Components(models["unet"], models["vae"], models.get("text_encoder"), tokenizers.get("text_encoder"),
                      scheduler_config,
                      source=f"single-file {family} checkpoint {path} (architecture inferred from tensor shapes, "
                             f"prediction_type {scheduler_config.get('prediction_type', 'epsilon')})",
                      text_encoder_2=models.get("text_encoder_2"), tokenizer_2=tokenizers.get("text_encoder_2"),
                      options=dict(_OPTIONS[family]))
