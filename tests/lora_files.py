"""LoRA files made the way users' tools make them, from a tiny diffusers pipeline: peft adapters on its UNet and
text encoder (random non-zero factors, lora_alpha != r), saved as diffusers' `save_lora_weights` writes them and
converted to kohya's format with diffusers' own converter. And random kohya-format LoRAs for fastdiff's own models
(`random_kohya_lora`), which need neither peft nor diffusers. SDXL pipelines get adapters on both text encoders
(`save_sdxl_lora_files`), and their kohya file names the UNet's modules as sd-scripts does, with SGM's names."""
from pathlib import Path

import torch
from safetensors.torch import save_file

# peft's target module names (any module path ending so)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# random_kohya_lora's: every attention projection and feed-forward layer, and the text encoder's layers
KOHYA_UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
KOHYA_TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2")


def _text_encoders(pipe) -> list[str]:
    return [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]


def add_adapters(pipe, text_encoder: bool = True) -> None:
    """peft LoRA adapters on the diffusers pipeline's UNet (r 4, alpha 8, proj_in alpha 3) and text encoder(s)
    (r 2, alpha 5), every factor random (init_lora_weights=False) so that no product is zero."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"proj_in": 3}, init_lora_weights=False,
                                     target_modules=UNET_TARGETS))
    if text_encoder:  # transformers' add_adapter wants a newer peft than the venv's; this is what it calls
        for name in _text_encoders(pipe):
            inject_adapter_in_model(LoraConfig(r=2, lora_alpha=5, init_lora_weights=False,
                                               target_modules=TEXT_TARGETS), getattr(pipe, name))


def peft_layers(pipe) -> dict[str, tuple[torch.Tensor, float]]:
    """fastdiff target -> (peft's delta, peft's scaling), for every module peft wrapped."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers = {}
    for model_name in ["unet", *_text_encoders(pipe)]:
        for name, module in getattr(pipe, model_name).named_modules():
            if isinstance(module, PeftLoraLayer):
                # transformers 5's CLIPTextModel has no `text_model.` level; fastdiff's (and transformers 4's) has.
                path = f"text_model.{name}" if model_name != "unet" and not name.startswith("text_model.") \
                    else name
                with torch.no_grad():
                    layers[f"{model_name}.{path}"] = (module.get_delta_weight("default").float(),
                                                      module.scaling["default"])
    return layers


def peft_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    from peft.utils import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(getattr(pipe, name)) for name in ["unet", *_text_encoders(pipe)]}


def kohya_state_dict(pipe, state_dicts) -> dict[str, torch.Tensor]:
    """The adapter as diffusers' `convert_state_dict_to_kohya` writes it, with each alpha key set to the layer's
    lora_alpha as sd-scripts stores it (the converter writes alpha = r, which loses lora_alpha != r)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    prefixed = {f"{model}.{key}": value for model, sd in state_dicts.items() for key, value in sd.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    for model_name, kohya_prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"),
                                     ("text_encoder_2", "lora_te2_")):
        if getattr(pipe, model_name, None) is None:
            continue
        for name, module in getattr(pipe, model_name).named_modules():
            if isinstance(module, PeftLoraLayer):
                key = f"{kohya_prefix}{name.replace('.', '_')}.alpha"
                assert key in kohya, key
                kohya[key] = torch.tensor(float(module.lora_alpha["default"]))
    return kohya


def save_lora_files(pipe, folder: Path) -> dict[str, Path]:
    """Add the adapters to the diffusers `pipe` and save them: {"diffusers": save_lora_weights' file with the
    adapter metadata diffusers' training scripts pass, "kohya": the same converted to kohya's format}."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata

    add_adapters(pipe)
    state_dicts = peft_state_dicts(pipe)
    metadata = _collate_lora_metadata({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    StableDiffusionPipeline.save_lora_weights(folder / "diffusers", unet_lora_layers=state_dicts["unet"],
                                              text_encoder_lora_layers=state_dicts["text_encoder"], **metadata)
    save_file(kohya_state_dict(pipe, state_dicts), folder / "kohya.safetensors")
    return {"diffusers": folder / "diffusers" / "pytorch_lora_weights.safetensors",
            "kohya": folder / "kohya.safetensors"}


def save_sdxl_lora_files(pipe, folder: Path) -> dict[str, Path]:
    """save_lora_files for a diffusers SDXL pipeline: adapters on the UNet and both text encoders; "diffusers" is
    `StableDiffusionXLPipeline.save_lora_weights`' file, "kohya" the same as sd-scripts writes an SDXL LoRA:
    lora_te1_/lora_te2_ and the UNet's modules by their SGM names (`lora_unet_input_blocks_4_1_...`), which diffusers
    reads back through its own SGM -> diffusers mapping."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.training_utils import _collate_lora_metadata

    from fastdiff.loading.ldm_keys import unet_key_map

    add_adapters(pipe)
    state_dicts = peft_state_dicts(pipe)
    metadata = _collate_lora_metadata({name: getattr(pipe, name) for name in state_dicts})
    StableDiffusionXLPipeline.save_lora_weights(
        folder / "diffusers", unet_lora_layers=state_dicts["unet"],
        text_encoder_lora_layers=state_dicts["text_encoder"], text_encoder_2_lora_layers=state_dicts["text_encoder_2"],
        **metadata)
    sgm = {pair.diffusers[: -len(".weight")].replace(".", "_"): pair.ldm[: -len(".weight")].replace(".", "_")
           for pair in unet_key_map(dict(pipe.unet.config)) if pair.diffusers.endswith(".weight")}
    kohya = {}
    for key, value in kohya_state_dict(pipe, state_dicts).items():
        if key.startswith("lora_unet_"):
            name, dot, part = key[len("lora_unet_"):].partition(".")
            key = f"lora_unet_{sgm[name]}{dot}{part}"
        kohya[key] = value
    save_file(kohya, folder / "kohya.safetensors")
    return {"diffusers": folder / "diffusers" / "pytorch_lora_weights.safetensors",
            "kohya": folder / "kohya.safetensors"}


def random_kohya_lora(pipe, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random kohya-format LoRA of `rank` (alpha = rank) for a fastdiff Pipeline: on every attention projection and
    feed-forward layer of its UNet and every attention and MLP layer of its text encoder."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model, targets in (("lora_unet", pipe.unet, KOHYA_UNET_TARGETS),
                                   ("lora_te", pipe.text_encoder, KOHYA_TEXT_TARGETS)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                out_features, in_features = module.weight.shape
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) / in_features**0.5
                tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * 0.1 / rank**0.5
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return tensors
