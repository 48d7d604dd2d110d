"""diffusers-format Stable Diffusion folders, as `StableDiffusionPipeline.save_pretrained` writes them:

    model_index.json
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin, or sharded + .index.json)
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors (...)
    text_encoder/  config.json + model[.fp16].safetensors or pytorch_model[.fp16].bin (...)
    tokenizer/     vocab.json + merges.txt (or tokenizer.json), special_tokens_map.json, tokenizer_config.json
    scheduler/     scheduler_config.json

The state-dict keys are already fastdiff's (diffusers' and transformers' own), so no key map is needed;
only the text encoder's two transformers layouts (with and without the `text_model.` level) are unified.
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
}
# Weight file names in order of preference (safetensors first, as in diffusers); diffusers names both
# formats `diffusion_pytorch_model`, transformers `model.safetensors` / `pytorch_model.bin`.
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
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
    """transformers' CLIPTextModel layouts -> fastdiff's: `text_model.` prefixed (transformers 4 and every
    published SD folder; transformers 5 writes the keys without it) and no `position_ids` buffer (saved by
    transformers < 4.31; positions are always 0..T-1)."""
    out = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix("text_model.")
        if bare == "embeddings.position_ids":
            continue
        out[key if key.startswith("text_model.") else "text_model." + bare] = tensor
    return out


def _check_model_index(folder: Path) -> None:
    index = read_json(folder / "model_index.json")
    problems = []
    for part, classes in _EXPECTED_CLASSES.items():
        entry = index.get(part)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            problems.append(f"{part} is {entry!r}, expected [library, class] with class {' or '.join(classes)}")
        elif entry[1] not in classes:
            problems.append(f"{part} is a {entry[1]}, fastdiff implements {' or '.join(classes)}")
    for extra in ("text_encoder_2", "tokenizer_2"):  # SDXL
        if index.get(extra) is not None:
            problems.append(f"{extra} is present (SDXL), which fastdiff does not support")
    if problems:
        raise CheckpointError(f"{folder / 'model_index.json'} does not describe a Stable Diffusion 1.x/2.x "
                              f"pipeline: " + "; ".join(problems))


def load_diffusers_folder(folder: Path, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                          variant: Optional[str] = None, overrides: Optional[Overrides] = None) -> Components:
    """Load every part of a diffusers Stable Diffusion folder; `variant="fp16"` reads the `*.fp16.*` weights."""
    overrides = overrides or Overrides()
    _check_model_index(folder)
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"missing folder {folder / sub}")
    configs = {part: overrides.apply(part, read_json(folder / name)) for part, name in CONFIG_FILES.items()}
    unet_config = make_config(UNetConfig, configs["unet"], f"{folder / CONFIG_FILES['unet']}")
    vae_config = make_config(VAEConfig, configs["vae"], f"{folder / CONFIG_FILES['vae']}")
    text_config = make_config(CLIPTextConfig, configs["text_encoder"], f"{folder / CONFIG_FILES['text_encoder']}")
    tokenizer_folder = overrides.tokenizer_folder or folder / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_folder, "tokenizer")

    parts = (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config),
             ("text_encoder", CLIPTextModel, text_config))
    files = {part: weight_files(folder / part, part, variant) for part, _, _ in parts}  # all found before any is read
    models = {}
    for part, cls, config in parts:
        state_dict = _read_files(files[part])
        if part == "text_encoder":
            state_dict = _unify_text_encoder_keys(state_dict)
        what = "the weights " + ", ".join(str(p) for p in files[part])
        models[part] = build_model(cls, config, state_dict, what, device, dtype)

    kinds = sorted({p.suffix for paths in files.values() for p in paths})
    return Components(models["unet"], models["vae"], models["text_encoder"], tokenizer, configs["scheduler"],
                      source=f"diffusers folder {folder} ({'/'.join(kinds)} weights"
                             f"{f', variant {variant}' if variant else ''})")
