"""Single-file SDXL base and refiner checkpoints (Stability's generative-models layout, what A1111 and ComfyUI users
download) against diffusers / transformers, on tiny SDXL-shaped models, CPU float32.

The tiny models keep what a single file does not store and the loader assumes (GroupNorm with 32 groups, 64-wide
heads in the UNet and both text encoders, 256-wide time id embeddings), so their files load without `config=`.
They are written with fastdiff's inverse key maps, and diffusers' own converters
(`diffusers.loaders.single_file_utils`) must turn those files back into exactly the original state dicts, so the
maps are checked against an independent source, not only against themselves.
"""
import sys
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Optional

import pytest
import torch

from fastdiff.loading import CheckpointError, load_components
from fastdiff.loading.common import Overrides
from fastdiff.loading.ldm import (SDXL, SDXL_REFINER, SDXL_SCHEDULER_CONFIG, infer_open_clip_config,
                                  infer_openai_clip_config, infer_unet_config, infer_vae_config)
from fastdiff.loading.ldm_keys import (SDXL_BIGG_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_REFINER_BIGG_PREFIX, UNET_PREFIX,
                                       VAE_PREFIX, open_clip_key_map, openai_clip_key_map, to_ldm, unet_key_map,
                                       vae_key_map)
from fastdiff.models.clip import CLIPTextConfig
from fastdiff.models.unet import UNetConfig
from fastdiff.models.vae import VAEConfig
from fastdiff.schedulers.config import SchedulerConfig
from tiny_models import randomise
from tiny_models import write_single_file as write_checkpoint

sys.path.insert(0, str(Path(__file__).parent))

TOL = 1e-5  # relative L2 error, float32
KINDS = ("base", "refiner")
TIME_IDS = {"base": 6, "refiner": 5}  # (original, crop, target) x (height, width); the refiner: aesthetic score
POOLED = 96  # bigG's projection_dim (SDXL: 1280), unlike its hidden width so that a missed transpose shows
CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
              architectures=["CLIPTextModel"])
BIGG = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=POOLED, bos_token_id=0, eos_token_id=2,
            pad_token_id=1, architectures=["CLIPTextModelWithProjection"])
_SDXL_UNET = dict(sample_size=128, layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256)
UNET_CONFIGS = {
    # SDXL base: no attention at the top level, a transformer depth per level (SDXL: 1, 2, 10; the top level's is
    # unused), the context of both encoders side by side.
    "base": dict(block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2),
                 transformer_layers_per_block=(1, 2, 3),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=CLIP_L["hidden_size"] + BIGG["hidden_size"],
                 projection_class_embeddings_input_dim=POOLED + TIME_IDS["base"] * 256, **_SDXL_UNET),
    # The refiner: four levels, attention at the middle two (and the mid block), one depth, bigG's context alone.
    "refiner": dict(block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
                    transformer_layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=BIGG["hidden_size"],
                    projection_class_embeddings_input_dim=POOLED + TIME_IDS["refiner"] * 256, **_SDXL_UNET),
}
VAE_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, sample_size=1024,
                  scaling_factor=0.13025, force_upcast=True,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
BIGG_PREFIX = {"base": SDXL_BIGG_PREFIX, "refiner": SDXL_REFINER_BIGG_PREFIX}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    diff = (ours - theirs).abs()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"{what}: max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, rel {err:.3e}")
    return err


def transformers_keys(model: torch.nn.Module) -> dict:
    """A transformers CLIP text model's state dict in fastdiff's names (transformers 5 drops `text_model.` from
    CLIPTextModel's keys; every checkpoint has it)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in model.state_dict().items()}


@dataclass
class Tiny:
    """Oracle models of one kind (text_encoder None for the refiner) and fixed inputs."""

    kind: str
    unet: torch.nn.Module  # diffusers UNet2DConditionModel, addition_embed_type "text_time"
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: Optional[torch.nn.Module]  # transformers CLIPTextModel (CLIP ViT-L's shape); None for the refiner
    text_encoder_2: torch.nn.Module  # transformers CLIPTextModelWithProjection (OpenCLIP ViT-bigG's shape)
    inputs: dict


@cache
def tiny(kind: str) -> Tiny:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(3 if kind == "base" else 4)
    unet = UNet2DConditionModel(**UNET_CONFIGS[kind]).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    text_encoder = CLIPTextModel(HFCLIPTextConfig(**CLIP_L)).eval() if kind == "base" else None
    text_encoder_2 = CLIPTextModelWithProjection(HFCLIPTextConfig(**BIGG)).eval()
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:  # away from the initial values: zero-initialised layers could hide a swapped tensor
            randomise(module, scale=0.02)
    return Tiny(kind, unet, vae, text_encoder, text_encoder_2, make_inputs(kind, unet, text_encoder_2))


def make_inputs(kind: str, unet, text_encoder_2) -> dict:
    """Fixed inputs for the oracles of one kind: UNet sample, timesteps, context, pooled embedding and time ids;
    VAE latents and image; token ids."""
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]])
    return {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 700]),
            "context": torch.randn(2, 77, unet.config.cross_attention_dim),
            "text_embeds": torch.randn(2, text_encoder_2.config.projection_dim),
            "time_ids": time_ids[:, :TIME_IDS[kind]], "latents": torch.randn(1, 4, 8, 8),
            "image": torch.rand(1, 3, 16, 16) * 2 - 1, "ids": torch.randint(0, 1000, (2, 77))}


def sgm_state_dict(t: Tiny) -> dict:
    """`t`'s weights in the single-file SDXL layout, with the extras real files carry (CLIP ViT-L's position_ids
    buffer, OpenCLIP's logit_scale)."""
    unet_config = UNetConfig.from_dict(dict(t.unet.config)).to_dict()
    vae_config = VAEConfig.from_dict(dict(t.vae.config)).to_dict()
    sd = {UNET_PREFIX + k: v for k, v in to_ldm(t.unet.state_dict(), unet_key_map(unet_config)).items()}
    sd.update({VAE_PREFIX + k: v for k, v in to_ldm(t.vae.state_dict(), vae_key_map(vae_config)).items()})
    if t.text_encoder is not None:
        pairs = openai_clip_key_map(CLIPTextConfig.from_dict(t.text_encoder.config.to_dict()).to_dict())
        sd.update({SDXL_CLIP_L_PREFIX + k: v for k, v in to_ldm(transformers_keys(t.text_encoder), pairs).items()})
        sd[SDXL_CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    pairs = open_clip_key_map(CLIPTextConfig.from_dict(t.text_encoder_2.config.to_dict()).to_dict())
    prefix = BIGG_PREFIX[t.kind]
    sd.update({prefix + k: v for k, v in to_ldm(transformers_keys(t.text_encoder_2), pairs).items()})
    sd[prefix + "logit_scale"] = torch.tensor(4.6)
    return sd


def write_single_file(path: Path, sd: dict) -> Path:
    return write_checkpoint(path, sd, nested=False)  # .ckpt: a bare state dict, as ComfyUI's savers write


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints written once per module: "base.safetensors", ... -> path."""
    root = tmp_path_factory.mktemp("sdxl")
    written = {}

    def get(name: str) -> Path:
        if name not in written:
            written[name] = write_single_file(root / name, sgm_state_dict(tiny(name.split(".")[0])))
        return written[name]

    return get


# --- the key maps against diffusers' converters and full-size SDXL -------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sgm_layout_is_what_diffusers_converters_read(kind):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    t = tiny(kind)
    sgm = sgm_state_dict(t)
    pairs = {
        "unet": (convert_ldm_unet_checkpoint(sgm, dict(t.unet.config)), t.unet.state_dict()),
        "vae": (convert_ldm_vae_checkpoint(sgm, dict(t.vae.config)), t.vae.state_dict()),
        # diffusers splits in_proj and transposes text_projection itself
        "text encoder 2": (convert_open_clip_checkpoint(t.text_encoder_2, sgm, prefix=BIGG_PREFIX[kind]),
                           transformers_keys(t.text_encoder_2)),
    }
    if kind == "base":
        text = convert_ldm_clip_checkpoint(sgm)
        # diffusers passes CLIP's position_ids buffer through (transformers' load then ignores it); not a weight.
        assert torch.equal(text.pop("text_model.embeddings.position_ids"), torch.arange(77)[None])
        pairs["text encoder"] = (text, transformers_keys(t.text_encoder))
    for name, (converted, original) in pairs.items():
        assert converted.keys() == original.keys(), (name, sorted(converted.keys() ^ original.keys())[:10])
        assert all(torch.equal(converted[k], original[k]) for k in original), name


# Published text encoder configs of stabilityai/stable-diffusion-xl-base-1.0 (text_encoder, text_encoder_2), the
# fields fastdiff reads.
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SDXL_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                 projection_dim=1280)
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_sdxl_shapes_give_the_published_configs(kind):
    # Full-size SDXL on the meta device (no memory): the maps cover every diffusers tensor, use the names
    # diffusers recognises SDXL files by, and the configs inferred from the file's shapes are the published ones.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from test_sdxl_models import SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG

    from fastdiff.models.clip import CLIPTextModel

    family = SDXL if kind == "base" else SDXL_REFINER
    published = SDXL_BASE_UNET_CONFIG if kind == "base" else SDXL_REFINER_UNET_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in published.items() if not k.startswith("_")})
        vae = AutoencoderKL(**SDXL_VAE)
        bigg = CLIPTextModel(CLIPTextConfig(**SDXL_BIGG))
    # The published configs say upcast_attention null, which diffusers reads as false.
    unet_config = replace(UNetConfig.from_dict(published), upcast_attention=False)
    pairs = unet_key_map(unet_config.to_dict())
    assert {p.diffusers for p in pairs} == unet.state_dict().keys()
    assert len(pairs) == len(unet.state_dict()) == (1680 if kind == "base" else 1220)
    sgm_unet = to_ldm(unet.state_dict(), pairs)
    assert UNetConfig.from_dict(infer_unet_config(sgm_unet, family).resolve(Overrides())) == unet_config

    vae_config = VAEConfig.from_dict(SDXL_VAE)
    sgm_vae = to_ldm(vae.state_dict(), vae_key_map(vae_config.to_dict()))
    assert VAEConfig.from_dict(infer_vae_config(sgm_vae, family).resolve(Overrides())) == vae_config

    # OpenCLIP bigG: all 32 layers and the projection, stored (D, P) where nn.Linear's weight is (P, D).
    sgm_bigg = to_ldm(bigg.state_dict(), open_clip_key_map(bigg.config.to_dict()))
    assert len(sgm_bigg) == 2 + 32 * 12 + 2 + 1
    file_keys = {BIGG_PREFIX[kind] + k for k in sgm_bigg}
    assert CHECKPOINT_KEY_NAMES["xl_base" if kind == "base" else "xl_refiner"] in file_keys
    assert CHECKPOINT_KEY_NAMES["open_clip_sdxl" if kind == "base" else "open_clip_sdxl_refiner"] in file_keys
    inferred = infer_open_clip_config(sgm_bigg, with_projection=True).resolve(Overrides())
    assert CLIPTextConfig.from_dict(inferred) == bigg.config
    if kind == "base":
        with torch.device("meta"):
            clip_l = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L))
        sgm_clip_l = to_ldm(clip_l.state_dict(), openai_clip_key_map(clip_l.config.to_dict()))
        assert CHECKPOINT_KEY_NAMES["clip_sdxl"] in {SDXL_CLIP_L_PREFIX + k for k in sgm_clip_l}
        inferred = infer_openai_clip_config(sgm_clip_l, SDXL_CLIP_L_PREFIX).resolve(Overrides())
        assert CLIPTextConfig.from_dict(inferred) == clip_l.config


# --- loading ---------------------------------------------------------------------------------------------------------

def assert_same_weights(ours: torch.nn.Module, theirs: dict, what: str) -> None:
    ours = ours.state_dict()
    assert ours.keys() == theirs.keys(), (what, sorted(ours.keys() ^ theirs.keys())[:10])
    unequal = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not unequal, (what, unequal[:10])


def assert_matches(c, t: Tiny) -> None:
    """Every tensor as the oracles hold it, and the oracles' outputs within TOL."""
    assert_same_weights(c.unet, t.unet.state_dict(), "unet")
    assert_same_weights(c.vae, t.vae.state_dict(), "vae")
    assert_same_weights(c.text_encoder_2, transformers_keys(t.text_encoder_2), "text encoder 2")
    if t.text_encoder is not None:
        assert_same_weights(c.text_encoder, transformers_keys(t.text_encoder), "text encoder")

    x = t.inputs
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        pairs = {
            "unet": (c.unet(x["sample"], x["timestep"], x["context"], **added),
                     t.unet(x["sample"], x["timestep"], x["context"], added_cond_kwargs=added).sample),
            "vae decode": (c.vae.decode(x["latents"]), t.vae.decode(x["latents"]).sample),
            "vae encode": (c.vae.encode(x["image"]), t.vae.encode(x["image"]).latent_dist.mean),
        }
        # SDXL reads the penultimate hidden states of both encoders and bigG's pooled, projected output.
        theirs = t.text_encoder_2(x["ids"], output_hidden_states=True)
        hidden, pooled = c.text_encoder_2.encode_penultimate(c.text_encoder_2.embed(x["ids"]), x["ids"])
        pairs["text encoder 2 penultimate"] = (hidden, theirs.hidden_states[-2])
        pairs["text encoder 2 pooled"] = (pooled, theirs.text_embeds)
        if t.text_encoder is not None:
            theirs = t.text_encoder(x["ids"], output_hidden_states=True)
            hidden, _ = c.text_encoder.encode_penultimate(c.text_encoder.embed(x["ids"]))
            pairs["text encoder penultimate"] = (hidden, theirs.hidden_states[-2])
            pairs["text encoder"] = (c.text_encoder(x["ids"]), theirs.last_hidden_state)
    for name, (ours, expected) in pairs.items():
        assert rel_err(ours, expected, name) <= TOL, name


@pytest.mark.parametrize("name", ["base.safetensors", "refiner.safetensors", "base.ckpt"])
def test_single_file_matches_oracles(name, files):
    kind = name.split(".")[0]
    t = tiny(kind)
    c = load_components(files(name))
    assert_matches(c, t)
    # The architecture read from shapes is the oracles' configs (the fields fastdiff reads).
    assert c.unet.config == UNetConfig.from_dict(dict(t.unet.config))
    assert c.vae.config == VAEConfig.from_dict(dict(t.vae.config))
    assert c.text_encoder_2.config == CLIPTextConfig.from_dict(t.text_encoder_2.config.to_dict())
    assert c.text_encoder_2.config.eos_token_id == 2
    assert c.tokenizer_2.pad_token == "!"
    assert c.scheduler_config == SDXL_SCHEDULER_CONFIG
    assert SchedulerConfig.from_dict(c.scheduler_config, "euler").timestep_spacing == "leading"
    if kind == "base":
        assert c.text_encoder.config == CLIPTextConfig.from_dict(t.text_encoder.config.to_dict())
        assert c.tokenizer.pad_token == "<|endoftext|>"
        assert c.options == {"force_zeros_for_empty_prompt": True}
        assert "SDXL checkpoint" in c.source
    else:
        assert c.text_encoder is None and c.tokenizer is None
        assert c.options == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
        assert "SDXL refiner checkpoint" in c.source


def test_config_overrides_reach_every_part(files):
    c = load_components(files("base.safetensors"),
                        config={"unet": {"sample_size": 96}, "vae": {"force_upcast": False},
                                "text_encoder_2": {"eos_token_id": 49407},
                                "scheduler": {"prediction_type": "v_prediction"}})
    assert c.unet.config.sample_size == 96 and not c.vae.config.force_upcast
    assert c.text_encoder_2.config.eos_token_id == 49407 and c.text_encoder.config.eos_token_id == 2
    assert c.scheduler_config["prediction_type"] == "v_prediction" and "prediction_type v_prediction" in c.source


# --- errors ----------------------------------------------------------------------------------------------------------

def test_missing_keys_of_every_part_are_named_in_one_error(tmp_path):
    sd = sgm_state_dict(tiny("base"))
    gone = {"UNet": UNET_PREFIX + "label_emb.0.2.bias",
            "text encoder": SDXL_CLIP_L_PREFIX + "text_model.encoder.layers.1.mlp.fc2.bias",
            "text encoder 2": SDXL_BIGG_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"}
    for key in gone.values():
        del sd[key]
    path = write_single_file(tmp_path / "truncated.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load_components(path)
    message = str(e.value)
    print(message)
    for part, key in gone.items():
        assert f"the {part} of {path} does not have the keys of the architecture inferred from its shapes: " \
               f"1 missing keys: {key}" in message
    assert "VAE" not in message


@pytest.mark.parametrize("key, shape, diffusers_key, expected", [
    (SDXL_BIGG_PREFIX + "transformer.resblocks.0.attn.out_proj.weight", (128, 64),
     "text_model.encoder.layers.0.self_attn.out_proj.weight", (128, 128)),
    (UNET_PREFIX + "label_emb.0.2.weight", (256, 128), "add_embedding.linear_2.weight", (256, 256)),
], ids=["bigG", "UNet add embedding"])
def test_wrong_shape_names_key_and_both_shapes(key, shape, diffusers_key, expected, tmp_path):
    sd = sgm_state_dict(tiny("base"))
    sd[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError) as e:
        load_components(write_single_file(tmp_path / "m.safetensors", sd))
    print(e.value)
    assert f"{diffusers_key} (file key {key}): checkpoint {shape} vs model {expected}" in str(e.value)


def test_parts_that_do_not_fit_together_are_refused(tmp_path):
    # A projection of another width: the UNet's add embedding no longer reads the pooled embedding + 6 time ids.
    sd = sgm_state_dict(tiny("base"))
    sd[SDXL_BIGG_PREFIX + "text_projection"] = torch.zeros(128, 80)
    with pytest.raises(CheckpointError, match=r"add embedding .*reads 1632 features, but SDXL gives it the pooled "
                                              r"text embedding \(80\) and 6 time ids x addition_time_embed_dim 256 "
                                              r"= 1616"):
        load_components(write_single_file(tmp_path / "m.safetensors", sd))
    # The refiner's bigG with the base's UNet: a 192-wide context from a 128-wide encoder.
    sd = {k: v for k, v in sgm_state_dict(tiny("base")).items() if not k.startswith("conditioner.")}
    sd.update({k: v for k, v in sgm_state_dict(tiny("refiner")).items() if k.startswith("conditioner.")})
    with pytest.raises(CheckpointError, match="cross-attends to a 192-wide context but the text encoders are 128 wide"):
        load_components(write_single_file(tmp_path / "m.safetensors", sd))


def test_unknown_sdxl_layouts_say_what_was_expected(tmp_path):
    base = sgm_state_dict(tiny("base"))
    clip_l_alone = {k: v for k, v in base.items() if not k.startswith(SDXL_BIGG_PREFIX)}
    with pytest.raises(CheckpointError, match=r"SDXL text encoders under conditioner.embedders.0.transformer., "
                                              r"which is neither SDXL layout \(SDXL: "
                                              r"conditioner.embedders.0.transformer., conditioner.embedders.1.model.; "
                                              r"SDXL refiner: conditioner.embedders.0.model.\)"):
        load_components(write_single_file(tmp_path / "m.safetensors", clip_l_alone))
    without_label_emb = {k: v for k, v in base.items() if not k.startswith(UNET_PREFIX + "label_emb.")}
    with pytest.raises(CheckpointError, match=r"has SDXL's text encoders but its UNet lacks "
                                              r"model.diffusion_model.label_emb.0.0.weight"):
        load_components(write_single_file(tmp_path / "m.safetensors", without_label_emb))
    with_sd1_text = {**base, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(64)}
    with pytest.raises(CheckpointError, match=r"both cond_stage_model. \(SD1/SD2\) and conditioner.embedders. "
                                              r"\(SDXL\)"):
        load_components(write_single_file(tmp_path / "m.safetensors", with_sd1_text))


def test_config_folder_supplies_what_shapes_cannot_tell(tmp_path):
    # tests/tiny_sdxl.py's models have none of SDXL's unstated values (8 GroupNorm groups, heads narrower than 64,
    # 8-wide time id embeddings): their single files load with config= their diffusers folder, as a user would
    # load a fine-tune of an unusual shape.
    from tiny_sdxl import save_sdxl_folder, sdxl_components

    for kind in KINDS:
        pipe = sdxl_components(kind)
        folder = save_sdxl_folder(pipe, tmp_path / kind)
        t = Tiny(kind, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                 make_inputs(kind, pipe.unet, pipe.text_encoder_2))
        path = write_single_file(tmp_path / f"{kind}.safetensors", sgm_state_dict(t))
        with pytest.raises(CheckpointError, match=r"cannot infer the unet setting attention_head_dim .*config="):
            load_components(path)
        c = load_components(path, config=folder)
        assert_matches(c, t)
        assert c.unet.config == UNetConfig.from_dict(dict(pipe.unet.config))
        assert c.text_encoder_2.config == CLIPTextConfig.from_dict(pipe.text_encoder_2.config.to_dict())
