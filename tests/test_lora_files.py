"""fastdiff.loading.lora against peft and diffusers (the oracles), on tiny SD1- and SD2-shaped pipelines, CPU float32.

peft adds an adapter to the diffusers UNet and text encoder (random non-zero B, lora_alpha != r, one
alpha_pattern entry); the adapter is saved as diffusers' `save_lora_weights` writes it (with the adapter metadata
diffusers' training scripts pass) and converted to kohya's format with diffusers' `convert_state_dict_to_kohya`.
`read_lora` must place each layer on exactly the module peft wrapped, with peft's own delta. Every refused file
must be named in a one-line error together with its offending keys.
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.loading.lora import LoraError, LoraLayer, read_lora

from lora_files import add_adapters, kohya_state_dict, peft_layers, peft_state_dicts
from tiny_models import make_tiny_sd, rel

TOL = 1e-6  # relative L2 error of a delta against peft's, float32
# A UNet Linear of the tiny SD1 model (32 -> 32) that the hand-written files below change.
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD1 pipeline in diffusers (with the adapters) and in fastdiff, and the adapter's files."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    folder = tmp_path_factory.mktemp("sd1")
    pipe = make_tiny_sd(folder / "model", "sd1")
    ours = fastdiff.Pipeline.from_pretrained(folder / "model", device="cpu")
    add_adapters(pipe)
    state_dicts = peft_state_dicts(pipe)
    metadata = _collate_lora_metadata({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    StableDiffusionPipeline.save_lora_weights(folder / "peft", unet_lora_layers=state_dicts["unet"],
                                              text_encoder_lora_layers=state_dicts["text_encoder"], **metadata)
    # diffusers' SD1 DreamBooth script saves convert_state_dict_to_diffusers(...): attention as `.lora.down`,
    # the text encoder as `.lora_linear_layer.down`, the other modules as PEFT's lora_A.
    StableDiffusionPipeline.save_lora_weights(
        folder / "old", unet_lora_layers=convert_state_dict_to_diffusers(state_dicts["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(state_dicts["text_encoder"]), **metadata)
    StableDiffusionPipeline.save_lora_weights(folder / "no_metadata", unet_lora_layers=state_dicts["unet"],
                                              text_encoder_lora_layers=state_dicts["text_encoder"])
    return SimpleNamespace(
        folder=folder,
        models={"unet": ours.unet, "text_encoder": ours.text_encoder},
        expected=peft_layers(pipe),
        kohya=kohya_state_dict(pipe, state_dicts),
        files={name: folder / name / "pytorch_lora_weights.safetensors" for name in ("peft", "old", "no_metadata")},
    )


def _check_layers(layers: dict[str, LoraLayer], expected, models, scale_one: bool = False) -> None:
    """The layers are exactly peft's modules, each with peft's delta (divided by peft's scaling if the file
    keeps no alpha), shaped as fastdiff's weight."""
    assert sorted(layers) == sorted(expected)
    for target, layer in layers.items():
        delta, scaling = expected[target]
        model, _, path = target.partition(".")
        weight = models[model].get_submodule(path).weight
        got = layer.delta()
        assert got.dtype == torch.float32 and got.shape == weight.shape, target
        assert layer.scale == pytest.approx(1.0 if scale_one else scaling, rel=1e-6), target
        assert rel(got, delta / scaling if scale_one else delta) < TOL, target


def _error(path: Path, models, match: Optional[str] = None) -> str:
    """The LoraError read_lora raises for `path`: one line, naming the file."""
    with pytest.raises(LoraError, match=match) as info:
        read_lora(path, models)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ---- files that are read ----------------------------------------------------------------------------------------


def test_diffusers_file_gives_peft_modules_and_deltas(sd1):
    unet_kinds = {type(sd1.models["unet"].get_submodule(t.removeprefix("unet."))) for t in sd1.expected
                  if t.startswith("unet.")}
    assert unet_kinds == {torch.nn.Linear, torch.nn.Conv2d} and any(t.startswith("text_encoder.") for t in sd1.expected)
    _check_layers(read_lora(sd1.files["peft"], sd1.models), sd1.expected, sd1.models)


def test_adapter_metadata_is_where_save_lora_weights_puts_alpha(sd1):
    from safetensors import safe_open

    with safe_open(sd1.files["peft"], framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        assert not any(key.endswith(".alpha") for key in f.keys())
    assert (metadata["unet.r"], metadata["unet.lora_alpha"], metadata["unet.alpha_pattern"]) == (4, 8, {"proj_in": 3})
    assert (metadata["text_encoder.r"], metadata["text_encoder.lora_alpha"]) == (2, 5)


@pytest.mark.parametrize("file", ["peft", "no_metadata"])
def test_diffusers_loader_gives_the_same_unet_deltas(sd1, file):
    """diffusers' own loader reads the file into a fresh UNet (its text encoder loader needs a newer peft than
    transformers 5 accepts): the same scales, patterns and defaults."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    unet = UNet2DConditionModel.from_pretrained(sd1.folder / "model", subfolder="unet")
    state_dict, _, metadata = StableDiffusionPipeline.lora_state_dict(sd1.files[file], return_lora_metadata=True)
    unet.load_lora_adapter(state_dict, prefix="unet", metadata=metadata, adapter_name="default")
    ours = read_lora(sd1.files[file], sd1.models)
    theirs = {f"unet.{name}": module.get_delta_weight("default") for name, module in unet.named_modules()
              if isinstance(module, PeftLoraLayer)}
    assert sorted(theirs) == sorted(t for t in ours if t.startswith("unet."))
    for target, delta in theirs.items():
        assert rel(ours[target].delta(), delta.detach()) < TOL, target


def test_older_diffusers_layout_gives_the_same_layers(sd1):
    _check_layers(read_lora(sd1.files["old"], sd1.models), sd1.expected, sd1.models)


def test_diffusers_file_without_metadata_has_scale_one(sd1):
    _check_layers(read_lora(sd1.files["no_metadata"], sd1.models), sd1.expected, sd1.models, scale_one=True)


@pytest.mark.parametrize("variant", ["converter", "sd_scripts_names", "pickle"])
def test_kohya_file_gives_peft_modules_and_deltas(sd1, tmp_path, variant):
    """As diffusers' converter names it (lora_te1_, transformers 5's paths); as sd-scripts names an SD1 LoRA
    (lora_te_text_model_...); and pickled (.pt, read with weights_only=True)."""
    kohya = sd1.kohya
    if variant == "sd_scripts_names":
        kohya = {key.replace("lora_te1_", "lora_te_text_model_"): value for key, value in kohya.items()}
        assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in kohya)
    path = tmp_path / ("lora.pt" if variant == "pickle" else "lora.safetensors")
    torch.save(kohya, path) if variant == "pickle" else save_file(kohya, path)
    _check_layers(read_lora(path, sd1.models), sd1.expected, sd1.models)


def test_kohya_file_without_alpha_has_scale_one(sd1, tmp_path):
    kohya = {key: value for key, value in sd1.kohya.items() if not key.endswith(".alpha")}
    kohya[f"{KOHYA_TO_Q}.alpha"] = torch.tensor(0.0)  # sd-scripts reads alpha 0 as alpha = r
    save_file(kohya, tmp_path / "lora.safetensors")
    _check_layers(read_lora(tmp_path / "lora.safetensors", sd1.models), sd1.expected, sd1.models, scale_one=True)


def test_alpha_key_in_diffusers_layout_wins_over_metadata(sd1, tmp_path):
    state = {f"unet.{TO_Q}.lora_A.weight": torch.randn(4, 32), f"unet.{TO_Q}.lora_B.weight": torch.randn(32, 4),
             f"unet.{TO_Q}.alpha": torch.tensor(2.0),
             "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(4, 32, 3, 3),
             "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(32, 4, 1, 1)}
    metadata = {"unet.r": 4, "unet.lora_alpha": 12, "unet.use_rslora": True}
    save_file(state, tmp_path / "lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})
    layers = read_lora(tmp_path / "lora.safetensors", sd1.models)
    assert layers[f"unet.{TO_Q}"].scale == pytest.approx(2.0 / 4)
    assert layers["unet.down_blocks.0.resnets.0.conv1"].scale == pytest.approx(12 / 2)  # rsLoRA: alpha / sqrt(r)


def test_sd2_kohya_file_gives_peft_modules_and_deltas(tmp_path):
    """SD2's linear proj_in/proj_out and heads per level; the UNet only."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    pipe = make_tiny_sd(tmp_path / "model", "sd2")
    ours = fastdiff.Pipeline.from_pretrained(tmp_path / "model", device="cpu")
    models = {"unet": ours.unet, "text_encoder": ours.text_encoder}
    add_adapters(pipe, text_encoder=False)
    assert isinstance(ours.unet.get_submodule("down_blocks.0.attentions.0.proj_in"), torch.nn.Linear)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()})
    save_file(kohya, tmp_path / "lora.safetensors")  # the converter's alpha = r: scale 1
    _check_layers(read_lora(tmp_path / "lora.safetensors", models), peft_layers(pipe), models, scale_one=True)


# ---- files that are refused -------------------------------------------------------------------------------------


def _kohya_to_q() -> dict[str, torch.Tensor]:
    """A good kohya layer (rank 4) beside the keys each error test adds."""
    return {f"{KOHYA_TO_Q}.lora_down.weight": torch.randn(4, 32), f"{KOHYA_TO_Q}.lora_up.weight": torch.randn(32, 4),
            f"{KOHYA_TO_Q}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "not_a_pickle", "missing"])
def test_unreadable_file_is_refused(sd1, tmp_path, damage):
    good = sd1.files["peft"].read_bytes()
    path = tmp_path / ("lora.bin" if damage == "not_a_pickle" else "lora.safetensors")
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage != "missing":
        path.write_bytes(b"\x00\x01 certainly not a weight file " * 10)
    assert "not a readable LoRA file" in _error(path, sd1.models)


def test_pickle_that_would_run_code_is_refused_without_running_it(sd1, tmp_path):
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "lora.ckpt"
    torch.save({f"{KOHYA_TO_Q}.lora_down.weight": RunsCode()}, path)
    message = _error(path, sd1.models, match="weights_only")
    assert not marker.exists()
    assert "system" in message


def test_bad_adapter_metadata_is_refused(sd1, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({f"unet.{TO_Q}.lora_A.weight": torch.randn(4, 32), f"unet.{TO_Q}.lora_B.weight": torch.randn(32, 4)},
              path, metadata={"lora_adapter_metadata": "{not json"})
    assert "lora_adapter_metadata" in _error(path, sd1.models)


@pytest.mark.parametrize("keys, family", [
    (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"],
     "SDXL"),
    (["lora_unet_input_blocks_1_1_proj_in", "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q"], "SDXL"),
    (["lora_unet_down_blocks_0_resnets_0_norm1", "lora_unet_down_blocks_7_attentions_0_proj_in"], None),
])
def test_keys_that_cannot_be_placed_are_refused(sd1, tmp_path, keys, family):
    """SDXL's second text encoder, SGM block names, a GroupNorm and a block this UNet lacks: refused, with the
    family when it is recognisable, never silently dropped."""
    state = _kohya_to_q()
    for name in keys:
        state.update({f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4)})
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models, match="name no Linear or Conv2d")
    assert all(f"{name}.lora_down.weight" in message for name in keys)
    assert (family in message) if family else "look like" not in message
    assert KOHYA_TO_Q not in message


def test_unknown_keys_beside_a_good_layer_are_refused(sd1, tmp_path):
    state = {**_kohya_to_q(), "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
             torch.randn(4, 32), "unet.conv_in.lora_A.bias": torch.randn(4)}
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models)
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "unet.conv_in.lora_A.bias" in message and "SDXL" in message


def test_layer_of_another_architecture_is_refused_with_its_shapes(sd1, tmp_path):
    """An SDXL-sized cross-attention to_k (2048-wide context) on SD1's 32-wide one, and a 64-wide to_v output."""
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    to_v = f"unet.{TO_Q[:-1]}v"
    state = {**_kohya_to_q(), f"{to_k}.lora_down.weight": torch.randn(4, 2048),
             f"{to_k}.lora_up.weight": torch.randn(32, 4), f"{to_v}.lora_A.weight": torch.randn(4, 32),
             f"{to_v}.lora_B.weight": torch.randn(64, 4)}
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models, match="do not fit")
    assert f"{to_k}.lora_down.weight (4, 2048)" in message and f"{to_k}.lora_up.weight (32, 4)" in message
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight (32, 32)" in message
    assert f"{to_v}.lora_B.weight (64, 4) vs {to_v}.weight (32, 32)" in message


@pytest.mark.parametrize("suffixes, kind", [
    ([".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"], "LoHa"),
    ([".lokr_w1", ".lokr_w2", ".alpha"], "LoKr"),
    ([".dora_scale", ".lora_down.weight", ".lora_up.weight", ".alpha"], "DoRA"),
    ([".lora_mid.weight", ".lora_down.weight", ".lora_up.weight", ".alpha"], "lora_mid"),
])
def test_unsupported_variants_are_named(sd1, tmp_path, suffixes, kind):
    """The first suffix is the variant's own key."""
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    state = {**_kohya_to_q(), **{name + suffix: torch.ones(2, 2) for suffix in suffixes}}
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models, match=kind)
    assert name + suffixes[0] in message
    assert "without their" not in message and "name no" not in message  # its other keys are that variant's


def test_peft_dora_is_named(sd1, tmp_path):
    state = {f"unet.{TO_Q}.lora_A.weight": torch.randn(4, 32), f"unet.{TO_Q}.lora_B.weight": torch.randn(32, 4),
             f"unet.{TO_Q}.lora_magnitude_vector": torch.ones(32)}
    save_file(state, tmp_path / "lora.safetensors")
    assert f"unet.{TO_Q}.lora_magnitude_vector" in _error(tmp_path / "lora.safetensors", sd1.models, match="DoRA")


def test_file_without_lora_keys_is_refused(sd1, tmp_path):
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "embedding.safetensors")
    message = _error(tmp_path / "embedding.safetensors", sd1.models, match="holds no LoRA layers")
    assert "emb_params" in message


def test_down_without_up_is_refused(sd1, tmp_path):
    """And an up without its down, and an alpha alone."""
    conv1, conv2 = "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_conv2"
    to_q2 = f"unet.{TO_Q.replace('attn1', 'attn2')}"
    state = {**_kohya_to_q(), f"{conv1}.lora_down.weight": torch.randn(4, 32, 3, 3),
             f"{to_q2}.lora_B.weight": torch.randn(32, 4), f"{conv2}.alpha": torch.tensor(1.0)}
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models, match="without their up weight")
    assert f"down weights without their up weight: {conv1}.lora_down.weight" in message
    assert f"up weights without their down weight: {to_q2}.lora_B.weight" in message
    assert f"alpha keys without their down and up weights: {conv2}.alpha" in message


def test_two_layers_on_one_module_and_a_non_scalar_alpha_are_refused(sd1, tmp_path):
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    state = {**_kohya_to_q(), f"unet.{TO_Q}.lora_A.weight": torch.randn(4, 32),
             f"unet.{TO_Q}.lora_B.weight": torch.randn(32, 4), f"{conv1}.lora_down.weight": torch.randn(4, 32, 3, 3),
             f"{conv1}.lora_up.weight": torch.randn(32, 4, 1, 1), f"{conv1}.alpha": torch.ones(4)}
    save_file(state, tmp_path / "lora.safetensors")
    message = _error(tmp_path / "lora.safetensors", sd1.models)
    assert f"modules changed by more than one layer of the file: unet.{TO_Q}" in message
    assert f"alpha keys that are not a single number: {conv1}.alpha" in message
