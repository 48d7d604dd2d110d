"""fastdiff.loading against diffusers / transformers (the oracles), on tiny SD1- and SD2-shaped models, CPU float32.

The same random weights are written as diffusers folders (safetensors, .bin, fp16 variant, shards) and as
single-file LDM checkpoints (.safetensors, .ckpt); every load must reproduce the oracle models' outputs.
The LDM files are written with fastdiff's inverse key map, and diffusers' own LDM converters
(`diffusers.loaders.single_file_utils`) must turn them back into exactly the original state dicts, so the
key maps are checked against an independent source, not only against themselves.
"""
import copy
import json
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff import ops
from fastdiff.loading import CheckpointError, load_components
from fastdiff.loading.common import Overrides
from fastdiff.loading.ldm import infer_openai_clip_config
from fastdiff.loading.ldm_keys import (OPEN_CLIP_PREFIX, OPENAI_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
                                       open_clip_key_map, open_clip_unused, openai_clip_key_map, to_ldm,
                                       unet_key_map, vae_key_map)
from fastdiff.models.clip import CLIPTextConfig
from fastdiff.models.unet import UNetConfig
from fastdiff.models.vae import VAEConfig

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_sd, write_single_file  # noqa: E402

TOL = 1e-5  # relative L2 error, float32
ASSETS = Path(__file__).resolve().parent.parent / "fastdiff" / "assets" / "clip"

# Tiny models in SD's shape, including what a single file does not store and the loader assumes: GroupNorm
# with 32 groups, SD1's 8 UNet heads, SD2's and CLIP's 64-wide heads, default sample sizes. Three UNet levels
# (the last without attention, channels changing then staying) and two resnets per level as in SD.
_LEVELS = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
               sample_size=64, cross_attention_dim=128)
UNET_CONFIGS = {
    "sd1": dict(block_out_channels=(32, 64, 64), attention_head_dim=8, **_LEVELS),
    "sd2": dict(block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), use_linear_projection=True, **_LEVELS),
}
VAE_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT_CONFIGS = {
    kind: dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, hidden_act=act, bos_token_id=998, eos_token_id=999, pad_token_id=1)
    for kind, act in (("sd1", "quick_gelu"), ("sd2", "gelu"))
}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs()
    print(f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}")
    return ((ours - theirs).norm() / theirs.norm()).item()


@dataclass
class Tiny:
    """Oracle models of one kind, fixed inputs, and the oracle outputs on them."""

    kind: str
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text: torch.nn.Module  # transformers CLIPTextModel
    inputs: dict
    expected: dict

    def text_state_dict(self) -> dict:
        """The text encoder's keys as every SD checkpoint has them (transformers 5 drops `text_model.`)."""
        return {"text_model." + k.removeprefix("text_model."): v for k, v in self.text.state_dict().items()}


def _outputs(unet, vae, text, inputs) -> dict:
    with torch.no_grad():
        return {
            "unet": unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample,
            "vae decode": vae.decode(inputs["latents"]).sample,
            "vae encode": vae.encode(inputs["image"]).latent_dist.mean,
            "text encoder": text(inputs["ids"]).last_hidden_state,
        }


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    # Away from the initial values, so zero-initialised layers and unit norms cannot hide a swapped tensor.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module.eval()


@cache
def tiny(kind: str) -> Tiny:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel

    torch.manual_seed(1 if kind == "sd1" else 2)
    unet = _perturbed(UNet2DConditionModel(**UNET_CONFIGS[kind]))
    vae = _perturbed(AutoencoderKL(**VAE_CONFIG))
    text = _perturbed(CLIPTextModel(HFCLIPTextConfig(**TEXT_CONFIGS[kind])))
    inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 700]),
              "context": torch.randn(2, 77, 128), "latents": torch.randn(1, 4, 8, 8),
              "image": torch.rand(1, 3, 16, 16) * 2 - 1, "ids": torch.randint(0, 1000, (2, 77))}
    return Tiny(kind, unet, vae, text, inputs, _outputs(unet, vae, text, inputs))


@cache
def tiny_fp16(kind: str) -> Tiny:
    """The same models with every weight rounded to float16 (what an fp16 variant stores), still float32."""
    t = tiny(kind)
    unet, vae, text = (copy.deepcopy(m).half().float() for m in (t.unet, t.vae, t.text))
    return Tiny(kind, unet, vae, text, t.inputs, _outputs(unet, vae, text, t.inputs))


def assert_matches(components, t: Tiny) -> None:
    x = t.inputs
    with torch.no_grad():
        got = {
            "unet": components.unet(x["sample"], x["timestep"], x["context"]),
            "vae decode": components.vae.decode(x["latents"]),
            "vae encode": components.vae.encode(x["image"]),
            "text encoder": components.text_encoder(x["ids"]),
        }
    for name, expected in t.expected.items():
        print(name, end=": ")
        assert rel_err(got[name], expected) <= TOL, name


# --- writing checkpoints ------------------------------------------------------------------------------------

def write_tokenizer(folder: Path, pad_token: str) -> None:
    """A tokenizer/ folder as published SD repos have it (vocab.json + merges.txt + special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "vocab.json", folder / "vocab.json")
    shutil.copy(ASSETS / "merges.txt", folder / "merges.txt")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))


def write_folder(root: Path, t: Tiny, fmt: str = "safetensors", variant=None, shard: bool = False) -> Path:
    """A diffusers-format folder of `t`'s weights: fp32 files, plus float16 `variant` files when given.

    fmt "bin" writes the text encoder as transformers 4 did (pytorch_model.bin, `text_model.` keys plus the
    position_ids buffer); "safetensors" as transformers 5 does (keys without `text_model.`).
    """
    shard_size = "100KB" if shard else "10GB"
    for name, model in (("unet", t.unet), ("vae", t.vae)):
        model.save_pretrained(root / name, safe_serialization=fmt == "safetensors", max_shard_size=shard_size)
        if variant:
            copy.deepcopy(model).half().save_pretrained(root / name, safe_serialization=fmt == "safetensors",
                                                         variant=variant, max_shard_size=shard_size)
    if fmt == "safetensors":
        t.text.save_pretrained(root / "text_encoder", max_shard_size=shard_size)
        if variant:
            copy.deepcopy(t.text).half().save_pretrained(root / "text_encoder", variant=variant,
                                                         max_shard_size=shard_size)
    else:
        (root / "text_encoder").mkdir(parents=True)
        t.text.config.to_json_file(root / "text_encoder" / "config.json")
        state = {**t.text_state_dict(), "text_model.embeddings.position_ids": torch.arange(77)[None]}
        torch.save(state, root / "text_encoder" / "pytorch_model.bin")
        if variant:
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                       root / "text_encoder" / f"pytorch_model.{variant}.bin")
    write_tokenizer(root / "tokenizer", "!" if t.kind == "sd2" else "<|endoftext|>")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "prediction_type": "v_prediction" if t.kind == "sd2" else "epsilon"}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
         "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return root


def ldm_state_dict(t: Tiny, text_model_level: bool = True) -> dict:
    """`t`'s weights in the single-file LDM layout, with the extras real files carry (schedule buffers, EMA
    bookkeeping; SD1's position_ids; SD2's unused last OpenCLIP layer, text_projection and logit_scale)."""
    unet_config = UNetConfig.from_dict(dict(t.unet.config)).to_dict()
    vae_config = VAEConfig.from_dict(dict(t.vae.config)).to_dict()
    text_config = CLIPTextConfig.from_dict(t.text.config.to_dict()).to_dict()
    sd = {UNET_PREFIX + k: v for k, v in to_ldm(t.unet.state_dict(), unet_key_map(unet_config)).items()}
    sd.update({VAE_PREFIX + k: v for k, v in to_ldm(t.vae.state_dict(), vae_key_map(vae_config)).items()})
    if t.kind == "sd1":
        pairs = openai_clip_key_map(text_config, text_model_level=text_model_level)
        root = "text_model." if text_model_level else ""
        sd.update({OPENAI_CLIP_PREFIX + k: v for k, v in to_ldm(t.text_state_dict(), pairs).items()})
        sd[f"{OPENAI_CLIP_PREFIX}{root}embeddings.position_ids"] = torch.arange(77)[None]
    else:
        pairs = open_clip_key_map(text_config)
        sd.update({OPEN_CLIP_PREFIX + k: v for k, v in to_ldm(t.text_state_dict(), pairs).items()})
        last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.2."
        for k in [k for k in sd if k.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.")]:
            sd[last + k.split("resblocks.0.", 1)[1]] = torch.randn_like(sd[k])
        sd[OPEN_CLIP_PREFIX + "text_projection"] = torch.randn(128, 64)
        sd[OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)
    sd.update({"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.rand(1000),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints written once per module: name -> path."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache_ = {}

    def get(name: str) -> Path:
        if name not in cache_:
            kind, what = name.split("/")
            t = tiny(kind)
            if what == "folder":
                cache_[name] = write_folder(root / name, t)
            elif what in ("model.safetensors", "model.ckpt"):
                cache_[name] = write_single_file(root / f"{kind}-{what}", ldm_state_dict(t))
            else:
                raise KeyError(name)
        return cache_[name]

    return get


def copy_folder(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# --- diffusers folders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_folder_matches_oracles(kind, fmt, tmp_path):
    t = tiny(kind)
    components = load_components(write_folder(tmp_path / "model", t, fmt))
    assert_matches(components, t)
    assert next(components.unet.parameters()).dtype == torch.float32
    assert f".{fmt}" in components.source
    assert components.scheduler_config["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    assert components.tokenizer.pad_token == ("!" if kind == "sd2" else "<|endoftext|>")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fp16_variant_is_read_when_asked(fmt, tmp_path):
    t, rounded = tiny("sd1"), tiny_fp16("sd1")
    folder = write_folder(tmp_path / "model", t, fmt, variant="fp16")
    half = load_components(folder, variant="fp16")
    assert "variant fp16" in half.source
    # float32 by default, holding exactly the float16 values (so the fp16 files were the ones read).
    assert all(torch.equal(v, rounded.unet.state_dict()[k]) for k, v in half.unet.state_dict().items())
    assert_matches(half, rounded)
    full = load_components(folder)
    assert all(torch.equal(v, t.unet.state_dict()[k]) for k, v in full.unet.state_dict().items())


def test_dtype_and_device_are_applied(files):
    c = load_components(files("sd1/folder"), device="cpu", dtype=torch.float16)
    for model in (c.unet, c.vae, c.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_sharded_folder_matches_oracles(tmp_path):
    t = tiny("sd1")
    folder = write_folder(tmp_path / "model", t, shard=True)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()
    assert_matches(load_components(folder), t)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_pipeline_saved_folder_matches_pipeline(kind, tmp_path):
    # StableDiffusionPipeline.save_pretrained output (tests/tiny_models.py): diffusers' own model_index.json,
    # GroupNorm with 8 groups, per-level heads, upcast_attention, only the folder's configs can tell.
    pipe = make_tiny_sd(tmp_path / "pipe", kind)
    c = load_components(tmp_path / "pipe")
    ids = torch.randint(0, 49408, (2, 77))
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert rel_err(c.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) <= TOL
        expected = pipe.unet(sample, 321, encoder_hidden_states=context).sample
        assert rel_err(c.unet(sample, 321, context), expected) <= TOL
        latents = torch.randn(1, 4, 4, 4)
        assert rel_err(c.vae.decode(latents), pipe.vae.decode(latents).sample) <= TOL
    assert c.scheduler_config["_class_name"] == "DDIMScheduler"


# --- single-file LDM checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_ldm_layout_is_what_diffusers_converters_read(kind):
    # The oracle for the key maps: diffusers' LDM -> diffusers converters must give back exactly the
    # original state dicts from the file fastdiff's inverse maps wrote.
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    t = tiny(kind)
    ldm = ldm_state_dict(t)
    pairs = {
        "unet": (convert_ldm_unet_checkpoint(ldm, dict(t.unet.config)), t.unet.state_dict()),
        "vae": (convert_ldm_vae_checkpoint(ldm, dict(t.vae.config)), t.vae.state_dict()),
    }
    if kind == "sd1":
        text = convert_ldm_clip_checkpoint(ldm)
        # diffusers passes SD1's position_ids buffer through (transformers' load then ignores it); not a weight.
        assert torch.equal(text.pop("text_model.embeddings.position_ids"), torch.arange(77)[None])
    else:
        text = convert_open_clip_checkpoint(t.text, ldm)
        # diffusers drops the last of SD2's 24 OpenCLIP layers by its fixed name `resblocks.23`; the tiny
        # model's unused last layer is resblocks.2, which fastdiff drops by count. Only that layer differs.
        text = {k: v for k, v in text.items() if not k.startswith("text_model.encoder.layers.2.")}
    pairs["text encoder"] = (text, t.text_state_dict())
    for name, (converted, original) in pairs.items():
        assert converted.keys() == original.keys(), (name, sorted(converted.keys() ^ original.keys())[:10])
        assert all(torch.equal(converted[k], original[k]) for k in original), name


def test_key_maps_of_real_sd_configs():
    # Full-size SD1.5 / SD2.1 models on the meta device (no memory): the maps cover every diffusers tensor and
    # use the LDM names that published files have, where the converter oracle above accepts either of two.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
    from test_unet import SD15_UNET_CONFIG, SD21_UNET_CONFIG

    for config, known in ((SD15_UNET_CONFIG, CHECKPOINT_KEY_NAMES["v1"]),
                          (SD21_UNET_CONFIG, CHECKPOINT_KEY_NAMES["v2"])):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        pairs = unet_key_map(UNetConfig.from_dict(config).to_dict())
        assert len(pairs) == len(unet.state_dict()) == 686
        assert {p.diffusers for p in pairs} == unet.state_dict().keys()
        ldm = {p.ldm for p in pairs}
        assert known.removeprefix(UNET_PREFIX) in ldm
        # LDM appends the upsampler after the level's last layer: slot 1 without attention, 2 after a transformer.
        assert {k for k in ldm if k.endswith(".conv.weight") and k.startswith("output_blocks")} == {
            "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight"}

    vae_config = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
    pairs = vae_key_map(VAEConfig.from_dict(vae_config).to_dict())
    assert {p.diffusers for p in pairs} == vae.state_dict().keys()
    ldm = {p.ldm for p in pairs}
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.0.downsample.conv.weight" in ldm and "encoder.down.3.downsample.conv.weight" not in ldm

    # SD2: 24 OpenCLIP resblocks in the file, 23 used; diffusers' list of what it skips is the oracle.
    sd21_text = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, hidden_act="gelu").to_dict()
    assert len(open_clip_key_map(sd21_text)) == 2 + 23 * 16 + 2
    assert set(open_clip_unused(24, 23)) == {k.removeprefix(OPEN_CLIP_PREFIX)
                                             for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE} | {"logit_scale"}


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_matches_oracles(kind, suffix, files):
    t = tiny(kind)
    c = load_components(files(f"{kind}/model.{suffix}"))
    assert_matches(c, t)
    # The architecture read from shapes is the oracle's config, sample sizes included (SD's defaults here).
    assert c.unet.config == UNetConfig.from_dict(dict(t.unet.config))
    assert c.vae.config == VAEConfig.from_dict(dict(t.vae.config))
    assert c.text_encoder.config == CLIPTextConfig.from_dict(t.text.config.to_dict())
    assert f"{kind.upper()} checkpoint" in c.source
    assert c.tokenizer.pad_token == ("!" if kind == "sd2" else "<|endoftext|>")
    assert c.scheduler_config["prediction_type"] == "epsilon"


def test_single_file_without_text_model_level(tmp_path):
    # Some SD1 files store the CLIP keys as cond_stage_model.transformer.embeddings... (no text_model.).
    t = tiny("sd1")
    sd = ldm_state_dict(t, text_model_level=False)
    assert f"{OPENAI_CLIP_PREFIX}embeddings.token_embedding.weight" in sd
    assert_matches(load_components(write_single_file(tmp_path / "m.safetensors", sd)), t)


def test_config_dict_overrides_what_weights_cannot_tell(files):
    c = load_components(files("sd2/model.safetensors"),
                        config={"scheduler": {"prediction_type": "v_prediction"}, "unet": {"sample_size": 96}})
    assert c.scheduler_config["prediction_type"] == "v_prediction"
    assert c.unet.config.sample_size == 96
    assert "prediction_type v_prediction" in c.source


def test_config_folder_supplies_configs_and_tokenizer(files, tmp_path):
    folder = copy_folder(files("sd2/folder"), tmp_path / "config")
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|startoftext|>"}))
    c = load_components(files("sd2/model.ckpt"), config=folder)
    assert c.scheduler_config["prediction_type"] == "v_prediction"
    assert c.tokenizer.pad_token == "<|startoftext|>"
    assert_matches(c, tiny("sd2"))


def test_uninferable_heads_ask_for_config():
    # A 96-wide CLIP has no 64-wide heads: the SD rule cannot apply, and the error says how to set it.
    sd = {"text_model.embeddings.token_embedding.weight": torch.zeros(1000, 96),
          "text_model.embeddings.position_embedding.weight": torch.zeros(77, 96),
          "text_model.encoder.layers.0.layer_norm1.weight": torch.zeros(96),
          "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(192, 96)}
    inferred = infer_openai_clip_config(sd)
    with pytest.raises(CheckpointError, match=r"num_attention_heads .*config=\{'text_encoder'"):
        inferred.resolve(Overrides())
    settings = inferred.resolve(Overrides.parse({"text_encoder": {"num_attention_heads": 3}}))
    assert settings["num_attention_heads"] == 3 and settings["hidden_size"] == 96 and settings["num_hidden_layers"] == 1


# --- errors -------------------------------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder: .*nowhere.safetensors"):
        load_components(tmp_path / "nowhere.safetensors")


def test_missing_folder_and_weights_are_named(files, tmp_path):
    folder = copy_folder(files("sd1/folder"), tmp_path / "model")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing weights in .*vae: expected one of "
                                              r"\['diffusion_pytorch_model.safetensors'.*has \['config.json'\]"):
        load_components(folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(CheckpointError, match=r"missing folder .*text_encoder"):
        load_components(folder)


def test_missing_variant_lists_expected_files(files):
    with pytest.raises(CheckpointError, match=r"for variant 'fp16': expected one of "
                                              r"\['diffusion_pytorch_model.fp16.safetensors'"):
        load_components(files("sd1/folder"), variant="fp16")


@pytest.mark.parametrize("name", ["sd1/model.safetensors", "sd1/model.ckpt", "sd1/folder"])
def test_truncated_file_is_named(name, files, tmp_path):
    src = files(name)
    if src.is_dir():
        src = copy_folder(src, tmp_path / "model")
        damaged = src / "unet" / "diffusion_pytorch_model.safetensors"
    else:
        damaged = Path(shutil.copy(src, tmp_path / src.name))
        src = damaged
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{damaged.name}.*(truncated|corrupt)"):
        load_components(src)


def test_ldm_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = ldm_state_dict(tiny("sd1"))
    gone = f"{UNET_PREFIX}output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    del sd[gone]
    sd[f"{VAE_PREFIX}decoder.up.0.block.7.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_components(write_single_file(tmp_path / "m.safetensors", sd))
    print(e.value)
    assert "the UNet of" in str(e.value) and f"1 missing keys: {gone}" in str(e.value)
    del sd[f"{VAE_PREFIX}decoder.up.0.block.7.conv1.weight"]
    sd[gone] = torch.zeros(1)
    sd[f"{VAE_PREFIX}decoder.up.0.block.7.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=rf"the VAE of .*1 unexpected keys: {VAE_PREFIX}decoder.up.0.block.7"):
        load_components(write_single_file(tmp_path / "m.safetensors", sd))


def test_long_key_lists_are_truncated(files, tmp_path):
    folder = copy_folder(files("sd1/folder"), tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    removed = sorted(k for k in sd if k.startswith("up_blocks.2."))
    save_file({k: v for k, v in sd.items() if k not in removed} | {"extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as e:
        load_components(folder)
    message = str(e.value)
    print(message)
    assert f"{len(removed)} missing keys: {removed[0]}" in message and f"and {len(removed) - 12} more" in message
    assert "1 unexpected keys: extra.weight" in message and "diffusion_pytorch_model.safetensors" in message


def test_wrong_shape_names_key_and_both_shapes(files, tmp_path):
    folder = copy_folder(files("sd1/folder"), tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["conv_in.bias"] = torch.zeros(33)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"conv_in.bias: checkpoint \(33,\) vs model \(32,\)"):
        load_components(folder)

    ldm = ldm_state_dict(tiny("sd1"))
    ldm[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"encoder.mid_block.attentions.0.to_q.weight \(file key "
                                              rf"{VAE_PREFIX}encoder.mid.attn_1.q.weight\): "
                                              r"checkpoint \(64, 64, 3, 3\) vs model \(64, 64\)"):
        load_components(write_single_file(tmp_path / "m.safetensors", ldm))


def test_unknown_formats_say_what_was_expected(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1.x/2.x/XL single-file checkpoint \(these "
                                              r"are diffusers.* load the whole diffusers folder\): expected keys "
                                              r"under model.diffusion_model.*prefixes are conv_in, conv_norm_out"):
        load_components(files("sd1/folder") / "unet" / "diffusion_pytorch_model.safetensors")
    # SDXL's text encoders without a UNet (SDXL files themselves load: tests/test_sdxl_loading.py).
    sdxl = write_single_file(tmp_path / "xl.safetensors", {"conditioner.embedders.0.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1.x/2.x/XL single-file checkpoint: expected "
                                              r"keys under model.diffusion_model.*conditioner.embedders.\* \(SDXL\)"):
        load_components(sdxl)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"unknown format: expected a diffusers folder or .*\.safetensors"):
        load_components(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="folder without model_index.json"):
        load_components(tmp_path)
    mixed = ldm_state_dict(tiny("sd2"))
    mixed = {k: v for k, v in mixed.items() if not k.startswith(OPEN_CLIP_PREFIX)}
    mixed.update({k: v for k, v in ldm_state_dict(tiny("sd1")).items() if k.startswith(OPENAI_CLIP_PREFIX)})
    with pytest.raises(CheckpointError, match=r"linear transformer projections \(SD2\) with an OpenAI CLIP"):
        load_components(write_single_file(tmp_path / "mixed.safetensors", mixed))


def test_model_index_of_other_pipelines_is_refused(files, tmp_path):
    folder = copy_folder(files("sd1/folder"), tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (folder / "model_index.json").write_text(json.dumps(index))
    # SDXL folders load; a second text encoder without its tokenizer does not.
    with pytest.raises(CheckpointError, match=r"vae is a AutoencoderTiny, fastdiff implements AutoencoderKL.*"
                                              r"text_encoder_2 is listed without tokenizer_2"):
        load_components(folder)


def test_bad_config_override_is_refused(files):
    with pytest.raises(CheckpointError, match=r"config= keys must be among .*got \['unett'\]"):
        load_components(files("sd1/model.safetensors"), config={"unett": {"sample_size": 96}})
    with pytest.raises(CheckpointError, match=r"UNet of .*: UNet setting class_embed_type='timestep' is not supported"):
        load_components(files("sd1/model.safetensors"), config={"unet": {"class_embed_type": "timestep"}})
    with pytest.raises(CheckpointError, match=r"variant='fp16' selects weight files inside a diffusers folder"):
        load_components(files("sd1/model.safetensors"), variant="fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_loads_onto_cuda_in_float16(kind, tmp_path):
    # Built from fastdiff's own models (no diffusers on GPU machines): the tensors are cast and moved before
    # they become parameters, and the float16 CUDA models stay close to the float32 CPU ones.
    from fastdiff.models.clip import CLIPTextModel
    from fastdiff.models.unet import UNet2DConditionModel
    from fastdiff.models.vae import AutoencoderKL

    unet_config = UNetConfig(**UNET_CONFIGS[kind])
    vae_config = VAEConfig.from_dict(VAE_CONFIG)
    fields = CLIPTextConfig.__dataclass_fields__
    text_config = CLIPTextConfig(**{k: v for k, v in TEXT_CONFIGS[kind].items() if k in fields})
    unet, vae, text = (_perturbed(cls(config)) for cls, config in ((UNet2DConditionModel, unet_config),
                                                                  (AutoencoderKL, vae_config),
                                                                  (CLIPTextModel, text_config)))
    sd = {UNET_PREFIX + k: v for k, v in to_ldm(unet.state_dict(), unet_key_map(unet_config.to_dict())).items()}
    sd.update({VAE_PREFIX + k: v for k, v in to_ldm(vae.state_dict(), vae_key_map(vae_config.to_dict())).items()})
    text_map = (openai_clip_key_map if kind == "sd1" else open_clip_key_map)(text_config.to_dict())
    prefix = OPENAI_CLIP_PREFIX if kind == "sd1" else OPEN_CLIP_PREFIX
    sd.update({prefix + k: v for k, v in to_ldm(text.state_dict(), text_map).items()})
    if kind == "sd2":  # the unused last OpenCLIP layer
        for k in [k for k in sd if k.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.")]:
            sd[k.replace("resblocks.0.", "resblocks.2.")] = torch.randn_like(sd[k])
    path = write_single_file(tmp_path / "m.safetensors", sd)

    cpu = load_components(path)
    gpu = load_components(path, device="cuda", dtype=torch.float16)
    assert {p.device.type for p in gpu.unet.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu.text_encoder.parameters()} == {torch.float16}
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    ids = torch.randint(0, 1000, (2, 77))
    # The tiny SD1 UNet's 4-wide heads are below the Triton attention kernel's minimum; loading is under test.
    with torch.no_grad(), ops.use_backend("reference", op="attention"):
        pairs = {
            "unet": (gpu.unet(sample.cuda().half(), 500, context.cuda().half()), cpu.unet(sample, 500, context)),
            "vae decode": (gpu.vae.decode(sample[:1].cuda().half()), cpu.vae.decode(sample[:1])),
            "text encoder": (gpu.text_encoder(ids.cuda()), cpu.text_encoder(ids)),
        }
    for name, (ours, reference) in pairs.items():
        print(name, end=": ")
        assert rel_err(ours.float().cpu(), reference) <= 1e-2, name
