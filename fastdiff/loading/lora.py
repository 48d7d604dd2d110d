"""LoRA files as users have them, read and placed on fastdiff's models: one `LoraLayer` (down, up, scale) per
nn.Linear or nn.Conv2d weight the file changes. Merging the layers into the weights is `fastdiff.lora`'s job.

Each key layout is read by one rule:

  kohya / A1111 (sd-scripts, LyCORIS LoCon, and what A1111, ComfyUI and diffusers' `convert_state_dict_to_kohya`
  export):
      lora_unet_<module path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
      lora_te_<module path, "." -> "_">...                        the text encoder
      lora_te1_... / lora_te2_...                                 SDXL's text_encoder / text_encoder_2
    The underscore name is looked up among the model's own Linear/Conv2d paths written the same way. On an SDXL
    UNet the SGM names sd-scripts writes (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) are accepted too,
    through `ldm_keys.unet_key_map`, beside diffusers' names (which diffusers' converter writes). `lora_te1_` is
    the first text encoder on SD1 as well: diffusers' converter names an SD1 text encoder so, and A1111 accepts it.
    scale = alpha / r; without an alpha key (or with alpha 0) alpha = r, as sd-scripts does.

  diffusers / PEFT:
      unet.<module path>.lora_A.weight / .lora_B.weight           PEFT (what `save_lora_weights` writes)
      unet.<module path>.lora.down.weight / .lora.up.weight       older diffusers
      unet.<module path>.lora_linear_layer.down.weight / .up...   older diffusers, text encoder
      text_encoder.<module path>...                               the text encoder
      text_encoder_2.<module path>...                             SDXL's second text encoder
    scale = lora_alpha / r with the adapter's settings from the safetensors header's `lora_adapter_metadata`
    entry, which diffusers' `save_lora_weights` writes: a JSON object of each model's `LoraConfig.to_dict()`,
    keys prefixed with the model's name ("unet.lora_alpha": 8, "unet.alpha_pattern": {...},
    "text_encoder.lora_alpha": ...); `alpha_pattern` is matched against the module path as PEFT does, and
    `use_rslora` makes it lora_alpha / sqrt(r). A `<prefix>.<module path>.alpha` key, which some converters
    write, wins over the header. Neither: 1.0 (alpha = r, diffusers' convention).

transformers 5 names the text encoder's modules without the `text_model.` level that transformers 4 (and every
kohya file) has, so text-encoder paths are accepted with and without it.

A file of the other family (an SDXL LoRA, by its `lora_te2_`/`text_encoder_2.` keys or SGM UNet names, on an
SD1/SD2 model; an SD1/SD2 one, by its `lora_te_` keys, on SDXL) is refused as such, its telling keys named.

The whole file is checked before anything is returned: keys that cannot be placed (never silently dropped),
layers that do not fit their target's weight, LoRA variants fastdiff does not compute (LoHa, LoKr, DoRA,
LoCon's Tucker `lora_mid`), and incomplete layers all end up in one `LoraError` naming the file.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .common import CheckpointError, PathLike, list_keys, read_state_dict
from .ldm_keys import unet_key_map


class LoraError(ValueError):
    """A LoRA file that cannot be applied; the message names the file."""


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank change of one weight: W += scale * up @ down."""

    target: str  # "<model>.<module path>" (unet, text_encoder, text_encoder_2): an nn.Linear or nn.Conv2d
    down: Tensor  # float32 CPU: (r, in) for a Linear, (r, in, kh, kw) for a Conv2d
    up: Tensor  # float32 CPU: (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r; 1.0 when the file gives no alpha (diffusers' and kohya's convention)

    def delta(self) -> Tensor:
        """scale * up @ down, shaped as the target's weight (out, in) or (out, in, kh, kw), float32."""
        product = self.up.flatten(1) @ self.down.flatten(1)
        return (self.scale * product).reshape(self.up.shape[0], *self.down.shape[1:])


# Which factor a key holds, by how the key ends, per layout.
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_DIFFUSERS_PARTS = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# Which model a layer name's prefix places it on.
_KOHYA_MODELS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_DIFFUSERS_MODELS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# A level of module path that some writers of a model's LoRAs leave out (transformers 5's text encoder).
_OPTIONAL_LEVEL = {"text_encoder": "text_model.", "text_encoder_2": "text_model."}

# Key fragments of LoRA variants whose weight change is not up @ down, and their names.
_UNSUPPORTED = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon-Tucker (lora_mid)",
}
# Keys that tell a file's family: SDXL's second text encoder and the SGM UNet's block names, which kohya writes for
# SDXL (for SD1 it writes diffusers' names); SD1/SD2's single text encoder as kohya names it (SDXL's are te1/te2).
_SDXL_KEYS = re.compile(r"^(lora_te2_|text_encoder_2\.|(lora_unet_|unet\.)"
                        r"(input_blocks|middle_block|output_blocks)[._])")
_SD_KEYS = re.compile(r"^lora_te_")
# Key patterns that tell which other model family a key that cannot be placed belongs to.
_FAMILIES = [(_SDXL_KEYS, "SDXL"), (re.compile(r"^(lora_transformer_|transformer\.)"), "SD3/Flux")]
# What a layer that has only one part lacks, by that part.
_INCOMPLETE = {
    "down": "down weights without their up weight",
    "up": "up weights without their down weight",
    "alpha": "alpha keys without their down and up weights",
}
# How many misfit layers an error message describes.
_MAX_MISFITS = 4


def read_lora(path: PathLike, models: Mapping[str, nn.Module]) -> dict[str, LoraLayer]:
    """The LoRA layers in the file at `path`, keyed by target, for models {"unet": ..., "text_encoder": ...,
    "text_encoder_2": ... (SDXL)}; the UNet's config tells SDXL (addition_embed_type "text_time")."""
    path = Path(path)
    tensors, header = _read_file(path)
    unsupported, groups, unknown = _group_keys(tensors)
    if not unsupported and not any({"down", "up"} & parts.keys() for parts in groups.values()):
        raise LoraError(f"LoRA file {path} holds no LoRA layers (no lora_down/lora_up, lora_A/lora_B or "
                        f"lora.down/lora.up weights); its keys: {list_keys(tensors)}")
    family_problem = _family_mismatch(tensors, models)
    adapters = {name: _AdapterSettings.from_header(header, name, path) for name in _DIFFUSERS_MODELS.values()}
    targets = {name: _Targets(name, model) for name, model in models.items()}
    # an SDXL file's lora_te1_ is SDXL's first text encoder, never an SD1/SD2 one
    sdxl_te1 = any(key.startswith("lora_te2_") for key in tensors) and not _is_sdxl(models)

    layers: dict[str, LoraLayer] = {}
    unplaced, bad_alpha, misfits, twice = list(unknown), [], [], []
    incomplete: dict[str, list[str]] = {part: [] for part in _INCOMPLETE}  # the part a layer has -> its keys
    for name, parts in groups.items():
        placed = _place(name, targets, sdxl_te1)
        if placed is None:
            unplaced.extend(parts.values())
            continue
        if "down" not in parts or "up" not in parts:
            present = next(part for part in _INCOMPLETE if part in parts)
            incomplete[present].append(parts[present])
            continue
        target, module_path = placed
        model = target.partition(".")[0]
        down_key, up_key = parts["down"], parts["up"]
        module = targets[model].modules[target]
        fitted = _fit(tensors[down_key], tensors[up_key], module)
        if fitted is None:
            misfits.append(f"{down_key} {tuple(tensors[down_key].shape)} and {up_key} {tuple(tensors[up_key].shape)} "
                           f"vs {target}.weight {tuple(module.weight.shape)}")
            continue
        down, up = fitted
        if "alpha" in parts:
            alpha = tensors[parts["alpha"]]
            if alpha.numel() != 1:
                bad_alpha.append(parts["alpha"])
                continue
            scale = _alpha_scale(float(alpha.reshape(-1)[0]), down.shape[0])
        elif name.startswith("lora_"):  # kohya without alpha: alpha = r
            scale = 1.0
        else:
            scale = adapters[model].scale(module_path, down.shape[0])
        if target in layers:
            twice.append(target)
        layers[target] = LoraLayer(target, down, up, scale)

    problems = [family_problem] if family_problem else []
    problems += [f"{kind} layers, which fastdiff does not support: {list_keys(keys)}"
                 for kind, keys in unsupported.items()]
    if unplaced:
        families = {family for key in unplaced for pattern, family in _FAMILIES if pattern.match(key)}
        looks = f" (they look like {' or '.join(sorted(families))} keys)" if families else ""
        problems.append(f"keys that name no Linear or Conv2d of this model's {'/'.join(models)}{looks}: "
                        f"{list_keys(unplaced)}")
    problems += [f"{_INCOMPLETE[part]}: {list_keys(keys)}" for part, keys in incomplete.items() if keys]
    if bad_alpha:
        problems.append(f"alpha keys that are not a single number: {list_keys(bad_alpha)}")
    if misfits:
        problems.append("layers that do not fit the model's weights (a LoRA for another architecture?): "
                        + "; ".join(misfits[:_MAX_MISFITS])
                        + (f" ... and {len(misfits) - _MAX_MISFITS} more" if len(misfits) > _MAX_MISFITS else ""))
    if twice:
        problems.append(f"modules changed by more than one layer of the file: {list_keys(twice)}")
    if problems:
        raise LoraError(f"LoRA file {path} cannot be applied to this model: " + "; ".join(problems))
    return layers


def _is_sdxl(models: Mapping[str, nn.Module]) -> bool:
    """Whether `models` are SDXL's: a second text encoder, or a UNet with SDXL's added conditioning."""
    config = getattr(models.get("unet"), "config", None)
    return "text_encoder_2" in models or getattr(config, "addition_embed_type", None) == "text_time"


def _family_mismatch(tensors: Mapping[str, Tensor], models: Mapping[str, nn.Module]) -> Optional[str]:
    """What tells that the file is a LoRA of the other family than `models` (SDXL vs SD1/SD2), or None."""
    sdxl = _is_sdxl(models)
    pattern, file_family = (_SD_KEYS, "an SD1/SD2") if sdxl else (_SDXL_KEYS, "an SDXL")
    telling = [key for key in tensors if pattern.match(key)]
    if not telling:
        return None
    return (f"it is {file_family} LoRA and this model is {'SDXL' if sdxl else 'SD1/SD2'} "
            f"(keys such as {list_keys(telling)})")


def _group_keys(tensors: Mapping[str, Tensor]) -> tuple[dict[str, list[str]], dict[str, dict[str, str]], list[str]]:
    """The file's keys sorted out: ({variant name: keys} of unsupported variants, {layer name: {part: key}} of
    LoRA layers, keys of neither layout). The other keys of an unsupported variant's layer (its alpha) are
    that variant's, not a LoRA's, and are left out."""
    unsupported: dict[str, list[str]] = {}
    unsupported_layers = set()
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in tensors:
        marker = next((m for m in _UNSUPPORTED if m in key), None)
        if marker is not None:
            unsupported.setdefault(_UNSUPPORTED[marker], []).append(key)
            unsupported_layers.add(key[: key.find(marker)].rstrip("._"))
    for key in tensors:
        if any(m in key for m in _UNSUPPORTED):
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
        elif split[0] not in unsupported_layers:
            groups.setdefault(split[0], {})[split[1]] = key
    return unsupported, groups, unknown


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors and, for a .safetensors file, its header metadata (empty for pickled files, which
    `read_state_dict` reads with weights_only=True)."""
    try:
        tensors = read_state_dict(path)
    except CheckpointError as e:
        raise LoraError(f"not a readable LoRA file: {' '.join(str(e).split())}") from e
    if path.suffix != ".safetensors":
        return tensors, {}
    with safe_open(path, framework="pt") as f:
        return tensors, f.metadata() or {}


def _split_key(key: str) -> Optional[tuple[str, str]]:
    """(layer name, part) of a key of either layout: ("lora_unet_..._to_q", "down"), ("unet.....to_q", "alpha")."""
    if key.startswith("lora_"):
        name, dot, rest = key.partition(".")
        part = _KOHYA_PARTS.get(dot + rest)
        return (name, part) if part else None
    for suffix, part in _DIFFUSERS_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _place(name: str, targets: Mapping[str, _Targets], skip_te1: bool) -> Optional[tuple[str, str]]:
    """(target, module path as the file writes it) of a layer name, or None if it names no Linear/Conv2d (or is
    a `lora_te1_` layer and `skip_te1`)."""
    for prefix, model in _KOHYA_MODELS.items():
        if name.startswith(prefix) and not (prefix == "lora_te1_" and skip_te1) and model in targets:
            rest = name[len(prefix):]
            target = targets[model].by_kohya_name.get(rest)
            return (target, rest) if target else None
    for prefix, model in _DIFFUSERS_MODELS.items():
        if name.startswith(prefix) and model in targets:
            rest = name[len(prefix):]
            target = targets[model].by_path.get(rest)
            return (target, rest) if target else None
    return None


class _Targets:
    """The nn.Linear and nn.Conv2d modules of one model, by every name a LoRA file may give them."""

    def __init__(self, model_name: str, model: nn.Module):
        self.modules = {f"{model_name}.{path}": module for path, module in model.named_modules()
                        if isinstance(module, (nn.Linear, nn.Conv2d))}
        self.by_path: dict[str, str] = {}  # module path as a diffusers file writes it -> target
        optional = _OPTIONAL_LEVEL.get(model_name)
        for target in self.modules:
            path = target[len(model_name) + 1:]
            self.by_path[path] = target
            if optional and path.startswith(optional):
                self.by_path[path[len(optional):]] = target
        self.by_kohya_name = {path.replace(".", "_"): target for path, target in self.by_path.items()}
        config = getattr(model, "config", None)
        if model_name == "unet" and getattr(config, "addition_embed_type", None) == "text_time":
            # SDXL: sd-scripts names the UNet's modules as SGM's UNet does
            for pair in unet_key_map(config.to_dict()):
                if pair.ldm.endswith(".weight") and pair.diffusers.endswith(".weight"):
                    target = self.by_path.get(pair.diffusers[: -len(".weight")])
                    if target is not None:
                        self.by_kohya_name.setdefault(pair.ldm[: -len(".weight")].replace(".", "_"), target)


def _fit(down: Tensor, up: Tensor, module: Union[nn.Linear, nn.Conv2d]) -> Optional[tuple[Tensor, Tensor]]:
    """down and up as float32 copies in the target's layout, or None if they do not make its weight's shape.
    A 1x1 convolution and a Linear are the same map: their factors are accepted for either."""
    weight = module.weight.shape
    if isinstance(module, nn.Conv2d):
        down = down[:, :, None, None] if down.dim() == 2 else down
        up = up[:, :, None, None] if up.dim() == 2 else up
    else:
        down = down.flatten(1) if down.dim() == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.dim() == 4 and up.shape[2:] == (1, 1) else up
    fits = (down.dim() == up.dim() == len(weight) and up.shape[1] == down.shape[0] and up.shape[0] == weight[0]
            and down.shape[1:] == weight[1:] and all(n == 1 for n in up.shape[2:]))
    if not fits:
        return None
    return (down.detach().to(torch.float32, copy=True).contiguous(),
            up.detach().to(torch.float32, copy=True).contiguous())


def _alpha_scale(alpha: float, rank: int) -> float:
    """alpha / r from an alpha key, where alpha 0 means r (sd-scripts: `if alpha is None or alpha == 0: alpha =
    lora_dim`)."""
    return alpha / rank if alpha else 1.0


@dataclass(frozen=True)
class _AdapterSettings:
    """The PEFT LoraConfig settings that set one model's scales, from diffusers' `lora_adapter_metadata`."""

    lora_alpha: Optional[float]  # None: the header says nothing about this model
    alpha_pattern: dict[str, float]
    use_rslora: bool

    @classmethod
    def from_header(cls, header: Mapping[str, str], model: str, path: Path) -> _AdapterSettings:
        raw = header.get("lora_adapter_metadata")
        if raw is None:
            return cls(None, {}, False)
        try:
            metadata = json.loads(raw)
            alpha = metadata.get(f"{model}.lora_alpha")
            return cls(None if alpha is None else float(alpha),
                       {str(k): float(v) for k, v in (metadata.get(f"{model}.alpha_pattern") or {}).items()},
                       bool(metadata.get(f"{model}.use_rslora", False)))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            raise LoraError(f"LoRA file {path} has a lora_adapter_metadata header that is not diffusers' JSON "
                            f"object of LoraConfig settings: {' '.join(str(e).split())}") from e

    def scale(self, module_path: str, rank: int) -> float:
        """PEFT's scaling of the layer on `module_path` (as the file writes it): its alpha_pattern entry or
        lora_alpha, over r (or sqrt(r) with use_rslora); 1.0 without settings."""
        if self.lora_alpha is None:
            return 1.0
        alpha = next((a for pattern, a in self.alpha_pattern.items()
                      if re.match(rf"(.*\.)?({pattern})$", module_path)), self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)
