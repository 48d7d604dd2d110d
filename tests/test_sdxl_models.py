"""SDXL's model parts against their oracles, on tiny float32 configs on CPU: the UNet (fastdiff.models and the
engine's FastUNet) against diffusers' with the added conditioning (pooled text embedding + time ids), transformer
depth per level and no attention at the top level; the second text encoder (CLIPTextModelWithProjection) against
transformers': penultimate hidden states and the pooled, projected output under both end-of-text rules."""
import contextlib
import copy
import json
import warnings

import pytest
import torch
import transformers

from fastdiff import ops
from fastdiff.engine import FastConfig, FastUNet
from fastdiff.models import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig

TOL = 1e-5  # relative L2 error, float32
BATCH, TOKENS = 2, 77
CONTEXT_DIM = 32 + 48  # two tiny text encoders' hidden states side by side (SDXL: 768 + 1280)
POOLED_DIM = 40  # the second encoder's projection_dim (SDXL: 1280), unlike its hidden width (48)
TIME_DIM = 10  # addition_time_embed_dim (SDXL: 256): 5 frequencies

# Tiny UNets shaped like SDXL's: no attention at the top level, head dims 20 and 24 (SDXL: 64 everywhere).
CONFIGS = {
    # base: 3 levels, (1, 2, 3) transformer layers per level (SDXL: (1, 2, 10)), the mid block takes the last
    # level's; 5 "heads" at the top level, which has no attention (SDXL lists 5 there too), so they need not
    # divide its 32 channels; six time ids.
    "base": dict(block_out_channels=(32, 40, 72), layers_per_block=2, norm_num_groups=8,
                 cross_attention_dim=CONTEXT_DIM, attention_head_dim=(5, 2, 3), transformer_layers_per_block=(1, 2, 3),
                 use_linear_projection=True, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM),
    # refiner: 4 levels, attention at the middle two (and the mid block), one depth for all, the second encoder's
    # context alone; five time ids (the aesthetic score in place of the target size).
    "refiner": dict(block_out_channels=(32, 48, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=48,
                    attention_head_dim=(2, 4, 4, 4), transformer_layers_per_block=2, use_linear_projection=True,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                    projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_DIM),
}
# (original height, width, crop top, left, target height, width); the refiner's end with an aesthetic score
TIME_IDS = {
    "base": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]]),
    "refiner": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [896.0, 1152.0, 16.0, 0.0, 2.5]]),
}

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, as published.
_SDXL_COMMON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_BASE_UNET_CONFIG = {
    **_SDXL_COMMON, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SDXL_REFINER_UNET_CONFIG = {
    **_SDXL_COMMON, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    diff = (ours - theirs).abs()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"{what}: max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, rel {err:.3e}")
    return err


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def diffusers_unet(config: UNetConfig):
    from diffusers import UNet2DConditionModel as DiffusersUNet

    return DiffusersUNet(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})


def make_pair(name: str):
    """A randomly initialised diffusers UNet of CONFIGS[name], every parameter perturbed (zero-initialised layers
    such as conv_out would hide a wrong tensor), and fastdiff's UNet built from its config and loaded strictly."""
    theirs = diffusers_unet(UNetConfig(**CONFIGS[name])).eval().requires_grad_(False)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(theirs.config))).eval().requires_grad_(False)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _conditioning(name: str, rows: int = BATCH):
    """context (rows, T, D), text_embeds (rows, POOLED_DIM), time_ids (rows, N): TIME_IDS repeated to `rows`."""
    cfg = UNetConfig(**CONFIGS[name])
    time_ids = TIME_IDS[name].repeat(rows // BATCH, 1)
    return torch.randn(rows, TOKENS, cfg.cross_attention_dim), torch.randn(rows, POOLED_DIM), time_ids


def _diffusers_out(theirs, sample, timestep, context, text_embeds, time_ids):
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return theirs(sample, timestep, context, added_cond_kwargs=added).sample


# ---- the UNet: fastdiff.models against diffusers ---------------------------------------------------------------

TIMESTEPS = {"0-d tensor": torch.tensor(250), "(B,) fractional": torch.tensor([0.25, 981.75]), "int": 999}


@pytest.mark.parametrize("size", [(12, 10), (9, 13)], ids=["12x10", "9x13 (rounded up on the way down)"])
@pytest.mark.parametrize("timestep", TIMESTEPS.values(), ids=TIMESTEPS.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_sdxl_unet_matches_diffusers_with_added_conditioning(name, timestep, size):
    ours, theirs = make_pair(name)
    sample = torch.randn(BATCH, 4, *size)
    context, text_embeds, time_ids = _conditioning(name)
    with torch.no_grad():
        expected = _diffusers_out(theirs, sample, timestep, context, text_embeds, time_ids)
        got = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids)
    assert got.shape == expected.shape == sample.shape
    assert _rel_err(got, expected, f"{name} UNet") <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_sdxl_unet_matches_diffusers_in_float64(name):
    # float32 parity is bounded by rounding; in float64 a real difference (the order of the pooled embedding and
    # the time-id embeddings, a missing sin/cos flip) stands out
    ours, theirs = (m.double() for m in make_pair(name))
    sample = torch.randn(BATCH, 4, 12, 10, dtype=torch.float64)
    context, text_embeds, time_ids = (t.double() for t in _conditioning(name))
    timestep = torch.tensor([3, 700])
    with torch.no_grad():
        err = _rel_err(ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids),
                       _diffusers_out(theirs, sample, timestep, context, text_embeds, time_ids), f"{name} float64")
    assert err <= 1e-12


@pytest.mark.parametrize("name", CONFIGS)
def test_add_embed_is_diffusers_aug_emb_and_depends_on_every_input(name):
    ours, theirs = make_pair(name)
    _, text_embeds, time_ids = _conditioning(name)
    emb = torch.randn(BATCH, ours.config.time_embed_dim)
    with torch.no_grad():
        expected = theirs.get_aug_embed(emb, None, {"text_embeds": text_embeds, "time_ids": time_ids})
        got = ours.add_embed(text_embeds, time_ids)
        moved = ours.add_embed(text_embeds, time_ids + torch.eye(time_ids.shape[1])[-1])  # the last id, +1
    assert got.shape == (BATCH, ours.config.time_embed_dim)
    assert _rel_err(got, expected, f"{name} add_embed") <= 1e-6
    assert (moved - got).abs().max() > 1e-4  # the last time id reaches the embedding


@pytest.mark.parametrize("name", CONFIGS)
def test_transformer_depth_per_level_and_no_attention_at_the_top_level(name):
    ours, _ = make_pair(name)
    cfg = ours.config
    depth = (cfg.transformer_layers_per_block if isinstance(cfg.transformer_layers_per_block, tuple)
             else (cfg.transformer_layers_per_block,) * len(cfg.block_out_channels))
    down = [None if b.attentions is None else len(b.attentions[0].transformer_blocks) for b in ours.down_blocks]
    up = [None if b.attentions is None else len(b.attentions[0].transformer_blocks) for b in ours.up_blocks]
    print(f"{name}: transformer layers down {down}, mid {len(ours.mid_block.attentions[0].transformer_blocks)}, "
          f"up {up}")
    assert down[0] is None and up[-1] is None
    assert down == [None if t == "DownBlock2D" else d for t, d in zip(cfg.down_block_types, depth)]
    assert up == [None if t == "UpBlock2D" else d for t, d in zip(cfg.up_block_types, reversed(depth))]
    assert len(ours.mid_block.attentions[0].transformer_blocks) == depth[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_sdxl_config_round_trips_through_diffusers(name):
    config = UNetConfig(**CONFIGS[name])
    theirs = diffusers_unet(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is known to fastdiff
        assert UNetConfig.from_dict(dict(theirs.config)) == config
        assert UNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("published", [SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG], ids=["base", "refiner"])
def test_full_size_sdxl_configs_have_diffusers_keys_and_shapes(published):
    # Built on the meta device: shapes only, no memory, no time.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published config must read without complaint
        config = UNetConfig.from_dict(published)
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
        theirs = diffusers_unet(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes["add_embedding.linear_1.weight"] == (1280 if published is SDXL_BASE_UNET_CONFIG else 1536,
                                                            published["projection_class_embeddings_input_dim"])
    head_sizes = {block.attn1.head_dim for name, block in ours.named_modules() if name.endswith("transformer_blocks.0")}
    count = sum(p.numel() for p in ours.parameters())
    print(f"{count:,} parameters, head sizes {head_sizes}")
    assert head_sizes == {64}
    assert count == (2_567_463_684 if published is SDXL_BASE_UNET_CONFIG else 2_259_526_660)


# ---- the added conditioning's inputs ----------------------------------------------------------------------------

BAD_INPUTS = {
    "text_embeds missing": (dict(text_embeds=None), r"^text_embeds missing: .*text_embeds \(B, P\) and time_ids \(B, N\)"),
    "time_ids missing": (dict(time_ids=None), r"^time_ids missing"),
    "both missing": (dict(text_embeds=None, time_ids=None), r"^text_embeds and time_ids missing"),
    "time_ids 1-D": (dict(time_ids=TIME_IDS["base"].flatten()), r"^time_ids must be \(B, N\), got shape \(12,\)"),
    "text_embeds 3-D": (dict(text_embeds=torch.randn(BATCH, 1, POOLED_DIM)),
                        r"^text_embeds must be \(B, P\), got shape \(2, 1, 40\)"),
    "five time ids": (dict(time_ids=TIME_IDS["base"][:, :5]),
                      r"^text_embeds \(2, 40\) and time_ids \(2, 5\) must be .* P \+ N \* 10 = 100"),
    "pooled width": (dict(text_embeds=torch.randn(BATCH, 48)), r"^text_embeds \(2, 48\) and time_ids \(2, 6\)"),
    "rows of time_ids": (dict(time_ids=TIME_IDS["base"][:1]), r"^text_embeds \(2, 40\) and time_ids \(1, 6\)"),
    "rows of both": (dict(text_embeds=torch.randn(1, POOLED_DIM), time_ids=TIME_IDS["base"][:1]),
                     r"^text_embeds and time_ids have 1 rows, expected sample's batch 2"),
}


@pytest.mark.parametrize("change, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_missing_or_misshapen_added_conditioning_raises_one_line_naming_it(change, message):
    ours, _ = make_pair("base")
    sample = torch.randn(BATCH, 4, 8, 8)
    context, text_embeds, time_ids = _conditioning("base")
    inputs = {"text_embeds": text_embeds, "time_ids": time_ids, **change}
    with pytest.raises(ValueError, match=message) as info:
        ours(sample, 10, context, **inputs)
    print(info.value)
    assert "\n" not in str(info.value)


def test_a_unet_without_add_embedding_refuses_the_added_conditioning():
    cfg = UNetConfig(**{**CONFIGS["base"], "addition_embed_type": None})
    unet = UNet2DConditionModel(cfg).eval()
    assert unet.add_embedding is None and not any(k.startswith("add_") for k in unet.state_dict())
    context, text_embeds, time_ids = _conditioning("base")
    with pytest.raises(ValueError, match=r"^time_ids given, but this UNet has no add embedding") as info:
        unet(torch.randn(BATCH, 4, 8, 8), 10, context, time_ids=time_ids)
    print(info.value)
    fast = FastUNet(unet, FastConfig())
    with pytest.raises(ValueError, match=r"^text_embeds and time_ids given, but this UNet has no add embedding"):
        fast(torch.randn(BATCH, 4, 8, 8), 10, context, text_embeds=text_embeds, time_ids=time_ids)
    with pytest.raises(ValueError, match=r"^add_embeds given, but this UNet has no add embedding"):
        fast.time_features(10, 1, torch.device("cpu"), torch.float32, torch.randn(2, cfg.time_embed_dim))


@pytest.mark.parametrize("key, value, message", [
    ("addition_embed_type", "text", r"addition_embed_type must be one of \(None, 'text_time'\), got 'text'"),
    ("addition_time_embed_dim", None, r"addition_time_embed_dim must be a positive int .* got None"),
    ("projection_class_embeddings_input_dim", 0, r"projection_class_embeddings_input_dim must be a positive int"),
])
def test_unsupported_added_conditioning_settings_raise_naming_them(key, value, message):
    with pytest.raises(ValueError, match=message) as info:
        UNetConfig.from_dict({**UNetConfig(**CONFIGS["base"]).to_dict(), key: value})
    print(info.value)


# ---- the UNet on the engine's fast path ---------------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [torch.tensor(250.0), torch.tensor([0.25, 981.75])], ids=["0-d", "(B,)"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fast_unet_matches_diffusers_with_added_conditioning(name, timestep):
    ours, theirs = make_pair(name)
    fast = FastUNet(ours, FastConfig())
    assert sorted(fast.state_dict()) == sorted(theirs.state_dict())  # add_embedding's keys included
    sample = torch.randn(BATCH, 4, 12, 10)
    context, text_embeds, time_ids = _conditioning(name)
    with torch.no_grad():
        expected = _diffusers_out(theirs, sample, timestep, context, text_embeds, time_ids)
        got = fast(_cl(sample), timestep, context, text_embeds=text_embeds, time_ids=time_ids)
    assert _rel_err(got, expected, f"{name} FastUNet") <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_fast_unet_with_guidance_and_conditioning_computed_ahead_matches_diffusers(name):
    """Classifier-free guidance as the engine runs it: B latents, 2B [uncond; cond] contexts with their own
    pooled embeddings and time ids. The conditioning reaches every ResNet block, so the sample is tiled at the
    start; the added embedding (once per prompt) and the time features (once per timestep) computed ahead give the
    same as passing text_embeds and time_ids, and as diffusers on the tiled sample."""
    ours, theirs = make_pair(name)
    fast = FastUNet(ours, FastConfig())
    sample = torch.randn(BATCH, 4, 12, 10)
    context, text_embeds, time_ids = _conditioning(name, 2 * BATCH)
    t = torch.tensor(420.0)
    with torch.no_grad():
        expected = _diffusers_out(theirs, torch.cat([sample, sample]), t, context, text_embeds, time_ids)
        direct = fast(_cl(sample), t, context, text_embeds=text_embeds, time_ids=time_ids)
        added = fast.add_embed(text_embeds, time_ids)  # (2B, 4 * C0): per prompt
        temb = fast.time_features(t, 1, sample.device, sample.dtype, added)  # (2B, width): per step
        ahead = fast(_cl(sample), None, context, temb=temb, out_dtype=torch.float32)
    assert temb.shape == (2 * BATCH, sum(r.conv1.out_channels for r in fast.resnet_blocks))
    assert direct.shape == ahead.shape == (2 * BATCH, 4, 12, 10)
    assert _rel_err(direct, expected, f"{name} guidance, text_embeds and time_ids") <= TOL
    assert _rel_err(ahead, expected, f"{name} guidance, time features ahead") <= TOL


def test_fast_unet_time_features_need_the_added_embedding_and_match_its_rows():
    ours, _ = make_pair("base")
    fast = FastUNet(ours, FastConfig())
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"^this UNet's time features need add_embeds") as info:
        fast.time_features(10, 1, cpu, torch.float32)  # what an engine unaware of the conditioning would ask
    print(info.value)
    added = fast.add_embed(*_conditioning("base")[1:])  # 2 rows
    with pytest.raises(ValueError, match=r"add_embeds must be \(R, 128\) for 1 timestep or R of them, got shape "
                                         r"\(2, 128\) for 3 timesteps"):
        fast.time_features(torch.tensor([1.0, 2.0, 3.0]), 3, cpu, torch.float32, added)
    sample = torch.randn(BATCH, 4, 8, 8)
    context = torch.randn(2 * BATCH, TOKENS, CONTEXT_DIM)
    with pytest.raises(ValueError, match=r"^text_embeds and time_ids have 2 rows, expected one per context row \(4\)"):
        fast(sample, 10, context, text_embeds=_conditioning("base")[1], time_ids=TIME_IDS["base"])
    temb = fast.time_features(10, 1, cpu, torch.float32, added)  # (2, width): neither 1 nor 4 rows
    with pytest.raises(ValueError, match=r"temb must be \(1, width\) or \(4, width\) for 2 samples and 4 contexts"):
        fast(sample, None, context, temb=temb)


def test_fast_unet_shares_the_sample_without_top_level_attention_on_the_triton_kernels():
    """One conditioning row for every context row (temb with one row): the layers before the first cross-attention
    run on the B latents, which here are a whole attention-less level whose skips (B rows) the decoder's last
    level concatenates to 2B-row maps. On the channels_last kernels that part the rows without tiles (Triton
    interpreter) the result is diffusers' on the tiled sample."""
    ours, theirs = make_pair("base")
    fast = FastUNet(ours, FastConfig())
    sample = _cl(torch.randn(1, 4, 12, 10))
    context, text_embeds, time_ids = _conditioning("base")
    text_embeds, time_ids = text_embeds[:1], time_ids[:1]
    rows = []
    fast.down_blocks[0].resnets[0].register_forward_hook(lambda module, args, out: rows.append(out[0].shape[0]))
    with contextlib.ExitStack() as stack:
        for op in ("add_layer_norm", "residual_add", "channel_cat", "residual_add_sums", "channel_cat_sums"):
            stack.enter_context(ops.use_backend("triton", op=op))
        temb = fast.time_features(420, 1, sample.device, sample.dtype, fast.add_embed(text_embeds, time_ids))
        got = fast(sample, None, context, temb=temb)
    assert rows == [1]  # the top level ran once per latent
    with torch.no_grad():
        expected = _diffusers_out(theirs, torch.cat([sample, sample]), 420, context, text_embeds.expand(2, -1),
                                  time_ids.expand(2, -1))
    assert _rel_err(got, expected, "shared sample, Triton kernels") <= TOL


def test_fast_unet_with_every_technique_off_matches_diffusers():
    ours, theirs = make_pair("refiner")
    off = FastConfig(channels_last=False, fuse_projections=False, fuse_geglu=False, linear_epilogues=False,
                     fold_biases=False, subpixel_upsample=False, conv_bias_pass=False, group_sums=False,
                     split_k_conv=False)
    fast = FastUNet(copy.deepcopy(ours), off)
    sample = torch.randn(BATCH, 4, 9, 13)
    context, text_embeds, time_ids = _conditioning("refiner")
    with torch.no_grad():
        got = fast(sample, torch.tensor([5.0, 600.0]), context, text_embeds=text_embeds, time_ids=time_ids)
        expected = _diffusers_out(theirs, sample, torch.tensor([5.0, 600.0]), context, text_embeds, time_ids)
    assert _rel_err(got, expected, "refiner, every technique off") <= TOL


# ---- the second text encoder: CLIPTextModelWithProjection -------------------------------------------------------

# The legacy end-of-text id 2 (every published SD config, SDXL's included) and the fixed one. The vocabulary has
# two tokens past 49407, as textual inversion adds: the two rules then read different positions.
EOS_IDS = [2, 49407]
VOCAB = 49410


def transformers_projection_encoder(eos_token_id: int, hidden: int = 48, layers: int = 3, heads: int = 4):
    """transformers' CLIPTextModelWithProjection (OpenCLIP bigG's shape, tiny: gelu, MLP 4x, projection without
    bias) with random, perturbed weights."""
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=TOKENS, hidden_act="gelu", projection_dim=POOLED_DIM,
        bos_token_id=49406 if eos_token_id != 2 else 0, eos_token_id=eos_token_id, pad_token_id=1,
        attn_implementation="eager")
    model = transformers.CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _prompt_ids() -> torch.Tensor:
    """Two rows as the tokenizer makes them: start token, words, end-of-text, then padding (the end-of-text id
    again in the first row, 0 in the second, bigG's pad token); the second row holds an added token (49409)."""
    ids = torch.randint(1, 49406, (BATCH, TOKENS))
    ids[:, 0] = 49406
    ids[0, 9:] = 49407
    ids[1, 5] = 49409
    ids[1, 30], ids[1, 31:] = 49407, 0
    return ids


def _ours_from_saved(theirs, tmp_path) -> CLIPTextModel:
    """fastdiff's encoder from the config.json transformers writes, loaded strictly from the oracle's weights."""
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key transformers writes is known to fastdiff
        config = CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("eos_token_id", EOS_IDS, ids=["eos 2 (legacy)", "eos 49407"])
def test_projection_encoder_penultimate_and_pooled_match_transformers(eos_token_id, tmp_path):
    theirs = transformers_projection_encoder(eos_token_id)
    ours = _ours_from_saved(theirs, tmp_path)
    assert ours.config.projection_dim == POOLED_DIM and ours.config.eos_token_id == eos_token_id
    assert "text_projection.weight" in ours.state_dict() and ours.text_projection.bias is None
    ids = _prompt_ids()
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        hidden, pooled = ours.encode_penultimate(ours.embed(ids), ids)
        alone, none = ours.encode_penultimate(ours.embed(ids))
        final = ours(ids)
    assert hidden.shape == (BATCH, TOKENS, 48) and pooled.shape == (BATCH, POOLED_DIM) and none is None
    assert _rel_err(hidden, out.hidden_states[-2], f"eos {eos_token_id}: penultimate hidden states") <= TOL
    assert _rel_err(pooled, out.text_embeds, f"eos {eos_token_id}: pooled, projected") <= TOL
    assert _rel_err(final, out.last_hidden_state, f"eos {eos_token_id}: final hidden states") <= TOL
    assert torch.equal(alone, hidden)


def test_the_two_end_of_text_rules_read_different_positions():
    # the check above discriminates: row 1's added token (49409) is the highest id, before its end-of-text token
    theirs = transformers_projection_encoder(2)
    ours = CLIPTextModel(CLIPTextConfig.from_dict({**theirs.config.to_dict(), "architectures":
                                                   ["CLIPTextModelWithProjection"]})).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = _prompt_ids()
    with torch.no_grad():
        final = ours(ids)
        legacy = ours.pool(final, ids)
        ours.config.eos_token_id = 49407
        fixed = ours.pool(final, ids)
        assert torch.equal(legacy, ours.text_projection(final[[0, 1], [9, 5]]))  # the highest id
        assert torch.equal(fixed, ours.text_projection(final[[0, 1], [9, 30]]))  # the first end-of-text token


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_penultimate_with_clip_skip_follows_diffusers_sdxl_rule(clip_skip):
    theirs = transformers_projection_encoder(49407)
    ours = CLIPTextModel(CLIPTextConfig.from_dict({**theirs.config.to_dict(), "architectures":
                                                   ["CLIPTextModelWithProjection"]})).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = _prompt_ids()
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        hidden, pooled = ours.encode_penultimate(ours.embed(ids), ids, clip_skip=clip_skip)
    # StableDiffusionXLPipeline.encode_prompt: hidden_states[-(clip_skip + 2)]; the pooled output unchanged
    assert _rel_err(hidden, out.hidden_states[-(clip_skip + 2)], f"clip_skip={clip_skip}") <= TOL
    assert _rel_err(pooled, out.text_embeds, f"clip_skip={clip_skip} pooled") <= TOL
    with pytest.raises(ValueError, match=r"clip_skip must be in \[0, 2\] .*got 3"):
        ours.encode_penultimate(ours.embed(ids), clip_skip=3)


def test_two_encoders_make_the_sdxl_context_and_the_unet_matches_diffusers_on_it(tmp_path):
    """The whole conditioning path at tiny size: CLIP ViT-L's and bigG's penultimate hidden states side by side
    (32 + 48 wide) and bigG's pooled output, as diffusers' StableDiffusionXLPipeline.encode_prompt takes them
    from transformers, feed the base UNet; fastdiff's encoders and UNet give the same."""
    first = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKENS, hidden_act="quick_gelu", eos_token_id=2, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in first.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = transformers_projection_encoder(2)
    ours_first = CLIPTextModel(CLIPTextConfig.from_dict(first.config.to_dict())).eval()
    ours_first.load_state_dict(first.state_dict(), strict=True)
    assert ours_first.text_projection is None  # a CLIPTextModel config's projection_dim is not read
    ours_second = _ours_from_saved(second, tmp_path)
    unet, theirs_unet = make_pair("base")
    ids = _prompt_ids()
    with torch.no_grad():
        out_first, out_second = first(ids, output_hidden_states=True), second(ids, output_hidden_states=True)
        expected_context = torch.cat([out_first.hidden_states[-2], out_second.hidden_states[-2]], dim=-1)
        context = torch.cat([ours_first.encode_penultimate(ours_first.embed(ids))[0],
                             ours_second.encode_penultimate(ours_second.embed(ids))[0]], dim=-1)
        pooled = ours_second.encode_penultimate(ours_second.embed(ids), ids)[1]
        sample = torch.randn(BATCH, 4, 8, 8)
        expected = _diffusers_out(theirs_unet, sample, 500, expected_context, out_second.text_embeds,
                                  TIME_IDS["base"])
        got = unet(sample, 500, context, text_embeds=pooled, time_ids=TIME_IDS["base"])
    assert context.shape == (BATCH, TOKENS, CONTEXT_DIM)
    assert _rel_err(context, expected_context, "SDXL context") <= TOL
    assert _rel_err(got, expected, "UNet on the SDXL conditioning") <= TOL


def test_projection_config_reads_round_trips_and_needs_projection_dim():
    d = transformers_projection_encoder(2).config.to_dict()
    with_projection = {**d, "architectures": ["CLIPTextModelWithProjection"]}
    config = CLIPTextConfig.from_dict(with_projection)
    assert (config.projection_dim, config.eos_token_id) == (POOLED_DIM, 2)
    assert config.to_dict()["architectures"] == ["CLIPTextModelWithProjection"]
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    theirs = transformers.CLIPTextConfig(**config.to_dict())
    assert {k: getattr(theirs, k) for k in config.__dataclass_fields__} == config.__dict__
    # the same config.json naming a CLIPTextModel: its projection_dim describes no weights of the model
    plain = CLIPTextConfig.from_dict({**d, "architectures": ["CLIPTextModel"]})
    assert plain.projection_dim is None and "text_projection.weight" not in CLIPTextModel(plain).state_dict()
    with pytest.raises(ValueError, match=r"lacks \['projection_dim'\]"):
        CLIPTextConfig.from_dict({k: v for k, v in with_projection.items() if k != "projection_dim"})
