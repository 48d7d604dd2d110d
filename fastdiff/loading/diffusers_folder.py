"""diffusers-format Stable Diffusion 1.x / 2.x / XL folders, as `StableDiffusionPipeline.save_pretrained` (and the
SDXL pipelines') write them:

    model_index.json   the parts and their classes; SDXL's pipeline options (`PIPELINE_OPTIONS`)
    unet/              config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin, or sharded + .index.json)
    vae/               config.json + diffusion_pytorch_model[.fp16].safetensors (...)
    text_encoder/      config.json + model[.fp16].safetensors or pytorch_model[.fp16].bin (...)
    tokenizer/         vocab.json + merges.txt (or tokenizer.json), special_tokens_map.json, tokenizer_config.json
    text_encoder_2/    SDXL: OpenCLIP ViT-bigG as transformers' CLIPTextModelWithProjection (same files)
    tokenizer_2/       SDXL: its tokenizer (pad token "!")
    scheduler/         scheduler_config.json

The family is read from the files: SD1/SD2 have the first text encoder alone; SDXL's base has both and a UNet with
addition_embed_type "text_time"; SDXL's refiner has the second alone (text_encoder and tokenizer null in
model_index.json) and five time ids (an aesthetic score in place of the target size). The state-dict keys are
already fastdiff's (diffusers' and transformers' own), so no key map is needed; only the text encoders' two
transformers layouts (with and without the `text_model.` level) are unified.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fastdiff.models.clip import CLIPTextConfig, CLIPTextModel
from fastdiff.models.unet import UNet2DConditionModel, UNetConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

from .common import (CONFIG_FILES, CheckpointError, Components, Overrides, StateDict, build_model, list_keys,
                     load_tokenizer, make_config, read_json, read_state_dict)

# model_index.json entry -> the classes fastdiff implements for it.
_EXPECTED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# The text encoders a folder may have (each with its tokenizer): SD1/SD2 the first, SDXL both, its refiner the second.
_TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# model_index.json's settings of the SDXL pipelines that change what they compute (`Components.options`).
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
# Weight file names in order of preference (safetensors first, as in diffusers); diffusers names both
# formats `diffusion_pytorch_model`, transformers `model.safetensors` / `pytorch_model.bin`.
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
}


def _with_variant(name: str, variant: Optional[str]) -> str:
    """diffusers' and transformers' rule: the variant goes before the last suffix
    (`diffusion_pytorch_model.fp16.safetensors`, `model.safetensors.index.fp16.json`)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def weight_files(folder: Path, part: str, variant: Optional[str]) -> list[Path]:
    """The weight file(s) of one part: a single file, or the shards a `*.index.json` lists.
    safetensors is preferred over .bin, as in diffusers."""
    candidates = [_with_variant(name + index, variant) for name in _WEIGHT_NAMES[part] for index in ("", ".index.json")]
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path} has no weight_map (a dict of tensor name -> shard file)")
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    variant_note = f" for variant {variant!r}" if variant else ""
    raise CheckpointError(f"missing weights in {folder}{variant_note}: expected one of {candidates}; "
                          f"the folder has {present}")


def _read_files(files: list[Path]) -> StateDict:
    state_dict: StateDict = {}
    for path in files:
        shard = read_state_dict(path)
        clash = shard.keys() & state_dict.keys()
        if clash:
            raise CheckpointError(f"shard {path} repeats keys of an earlier shard: {list_keys(clash)}")
        state_dict.update(shard)
    return state_dict


def _unify_text_encoder_keys(state_dict: StateDict) -> StateDict:
    """transformers' CLIPTextModel(WithProjection) layouts -> fastdiff's: the transformer's keys `text_model.`
    prefixed (transformers 4 and every published SD folder; transformers 5 writes them without it), the projection's
    `text_projection.weight` as it is, and no `position_ids` buffer (saved by transformers < 4.31; positions are
    always 0..T-1)."""
    out = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix("text_model.")
        if bare == "embeddings.position_ids":
            continue
        transformer = key.startswith("text_model.") or bare.split(".", 1)[0] in ("embeddings", "encoder",
                                                                               "final_layer_norm")
        out["text_model." + bare if transformer else key] = tensor
    return out


def _read_model_index(folder: Path) -> tuple[dict, list[tuple[str, str]]]:
    """model_index.json and the (text encoder, tokenizer) pairs it lists, checked: every part a class fastdiff
    implements, each text encoder with its tokenizer, at least one text encoder."""
    path = folder / "model_index.json"
    index = read_json(path)
    problems = []
    for part, classes in _EXPECTED_CLASSES.items():
        entry = index.get(part)
        if part not in ("unet", "vae") and not _listed(index, part):  # the text parts are checked below
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            problems.append(f"{part} is {entry!r}, expected [library, class] with class {' or '.join(classes)}")
        elif entry[1] not in classes:
            problems.append(f"{part} is a {entry[1]}, fastdiff implements {' or '.join(classes)}")
    listed = [(encoder, tokenizer) for encoder, tokenizer in _TEXT_PARTS
              if _listed(index, encoder) or _listed(index, tokenizer)]
    for encoder, tokenizer in listed:
        for part, other in ((encoder, tokenizer), (tokenizer, encoder)):
            if not _listed(index, part):
                problems.append(f"{other} is listed without {part}")
    if not listed:
        problems.append("it lists no text encoder (text_encoder, or SDXL's text_encoder_2)")
    for option in PIPELINE_OPTIONS:
        if option in index and not isinstance(index[option], bool):
            problems.append(f"{option} is {index[option]!r}, expected true or false")
    if problems:
        raise CheckpointError(f"{path} does not describe a Stable Diffusion 1.x/2.x/XL pipeline: "
                              + "; ".join(problems))
    return index, listed


def _listed(index: dict, part: str) -> bool:
    """Whether model_index.json names a class for `part` (diffusers writes [null, null] for a part left out)."""
    entry = index.get(part)
    return entry is not None and not (isinstance(entry, (list, tuple)) and list(entry) == [None, None])


def _check_sdxl(folder: Path, unet_config: UNetConfig, text_configs: dict[str, CLIPTextConfig],
                options: dict) -> None:
    """The parts of an SDXL folder must fit together: the UNet's context width is the text encoders' hidden widths
    side by side, and its add embedding reads the second encoder's projection and six time ids (base) or five
    (refiner: requires_aesthetics_score)."""
    index = folder / "model_index.json"
    sdxl_unet = unet_config.addition_embed_type == "text_time"
    second = text_configs.get("text_encoder_2")
    if sdxl_unet != (second is not None):
        raise CheckpointError(
            f"{folder}: an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and tokenizer_2 in "
            f"{index}, and they need such a UNet; got addition_embed_type {unet_config.addition_embed_type!r} "
            f"with{'' if second is not None else 'out'} text_encoder_2")
    if not sdxl_unet:
        return
    if second.projection_dim is None:
        raise CheckpointError(f"{folder / CONFIG_FILES['text_encoder_2']}: SDXL's second text encoder must be a "
                              f"CLIPTextModelWithProjection (its pooled output is projected), got architectures "
                              f"['CLIPTextModel']")
    widths = {part: config.hidden_size for part, config in text_configs.items()}
    if unet_config.cross_attention_dim != sum(widths.values()):
        raise CheckpointError(f"{folder / CONFIG_FILES['unet']}: cross_attention_dim is "
                              f"{unet_config.cross_attention_dim}, but the text encoders' hidden states are "
                              f"{' + '.join(f'{w} ({p})' for p, w in widths.items())} wide")
    time_ids, rest = divmod(unet_config.projection_class_embeddings_input_dim - second.projection_dim,
                            unet_config.addition_time_embed_dim)
    expected = 5 if options.get("requires_aesthetics_score", False) else 6
    if rest or time_ids != expected:
        raise CheckpointError(
            f"{folder / CONFIG_FILES['unet']}: projection_class_embeddings_input_dim "
            f"{unet_config.projection_class_embeddings_input_dim} must be text_encoder_2's projection_dim "
            f"{second.projection_dim} + {expected} time ids * addition_time_embed_dim "
            f"{unet_config.addition_time_embed_dim} (requires_aesthetics_score "
            f"{options.get('requires_aesthetics_score', False)} in {index})")


def load_diffusers_folder(folder: Path, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                          variant: Optional[str] = None, overrides: Optional[Overrides] = None) -> Components:
    """Load every part of a diffusers Stable Diffusion 1.x/2.x/XL folder; `variant="fp16"` reads the `*.fp16.*`
    weights."""
    overrides = overrides or Overrides()
    index, text_parts = _read_model_index(folder)
    encoders = [encoder for encoder, _ in text_parts]
    for sub in ("unet", "vae", *encoders, "scheduler"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"missing folder {folder / sub}")
    configs = {part: overrides.apply(part, read_json(folder / CONFIG_FILES[part]))
               for part in ("unet", "vae", *encoders, "scheduler")}
    unet_config = make_config(UNetConfig, configs["unet"], f"{folder / CONFIG_FILES['unet']}")
    vae_config = make_config(VAEConfig, configs["vae"], f"{folder / CONFIG_FILES['vae']}")
    text_configs = {part: make_config(CLIPTextConfig, configs[part], f"{folder / CONFIG_FILES[part]}")
                    for part in encoders}
    options = {option: index[option] for option in PIPELINE_OPTIONS if option in index}
    _check_sdxl(folder, unet_config, text_configs, options)
    tokenizers = {}
    for _, tokenizer in text_parts:
        # a config= folder's tokenizer/ replaces the first tokenizer only: the second pads differently
        override = overrides.tokenizer_folder if tokenizer == "tokenizer" else None
        tokenizers[tokenizer] = load_tokenizer(override or folder / tokenizer, tokenizer)

    parts = (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config),
             *((part, CLIPTextModel, config) for part, config in text_configs.items()))
    files = {part: weight_files(folder / part, part, variant) for part, _, _ in parts}  # all found before any is read
    models = {}
    for part, cls, config in parts:
        state_dict = _read_files(files[part])
        if part in encoders:
            state_dict = _unify_text_encoder_keys(state_dict)
        what = "the weights " + ", ".join(str(p) for p in files[part])
        models[part] = build_model(cls, config, state_dict, what, device, dtype)

    kinds = sorted({p.suffix for paths in files.values() for p in paths})
    family = "" if "text_encoder_2" not in encoders else "SDXL, " if "text_encoder" in encoders else "SDXL refiner, "
    return Components(models["unet"], models["vae"], models.get("text_encoder"), tokenizers.get("tokenizer"),
                      configs["scheduler"], source=f"diffusers folder {folder} ({family}{'/'.join(kinds)} weights"
                                                   f"{f', variant {variant}' if variant else ''})",
                      text_encoder_2=models.get("text_encoder_2"), tokenizer_2=tokenizers.get("tokenizer_2"),
                      options=options)
