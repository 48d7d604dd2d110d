"""fastdiff's UNet2DConditionModel against diffusers' (the oracle), on tiny float32 configs on CPU."""
import warnings

import pytest
import torch

from fastdiff import ops
from fastdiff.models.unet import UNet2DConditionModel, UNetConfig, timestep_embedding
from cuda_graphs import capture

TOL = 1e-5  # relative L2 error, float32
BATCH, TOKENS = 2, 77

# Two tiny UNets shaped like the real ones: three levels (the last without attention, as SD's), channels
# changing between levels so conv_shortcut and the skip-channel bookkeeping are exercised.
CONFIGS = {
    # SD1: one head count for every level (attention_head_dim=8 means 8 heads: head size 4, 8, 8 here), 1x1 conv
    # proj_in/proj_out, one resnet per level.
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SD2: a head count per level (head size 16 everywhere), Linear proj_in/proj_out, upcast_attention, plus two
    # resnets per level and two transformer layers at the lower levels.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, cross_attention_dim=48,
                attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=(1, 2, 2),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}

# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, as published.
_SD_LEVELS = dict(block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "center_input_sample": False, "cross_attention_dim": 768, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, **_SD_LEVELS,
}
SD21_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "center_input_sample": False, "cross_attention_dim": 1024,
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "use_linear_projection": True, "upcast_attention": True, **_SD_LEVELS,
}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs()
    print(f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}")
    return ((ours - theirs).norm() / theirs.norm()).item()


def diffusers_unet(config: UNetConfig):
    from diffusers import UNet2DConditionModel as DiffusersUNet

    return DiffusersUNet(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})


def make_pair(name: str):
    """A randomly initialised diffusers UNet, every parameter perturbed so that zero/one inits cannot hide a
    swapped or skipped tensor, and fastdiff's UNet built from its config and loaded from it strictly."""
    theirs = diffusers_unet(UNetConfig(**CONFIGS[name])).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


TIMESTEPS = {
    "int": 999,
    "float": 10.5,
    "0-d tensor": torch.tensor(250),
    "(B,) tensor": torch.tensor([1, 500]),
    "(B,) fractional": torch.tensor([0.25, 981.75]),
}


@pytest.mark.parametrize("size", [(8, 12), (7, 9)], ids=["8x12", "7x9 (rounded up on the way down)"])
@pytest.mark.parametrize("timestep", TIMESTEPS.values(), ids=TIMESTEPS.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name, timestep, size):
    ours, theirs = make_pair(name)
    sample = torch.randn(BATCH, 4, *size)
    context = torch.randn(BATCH, TOKENS, ours.config.cross_attention_dim)
    with torch.no_grad():
        expected = theirs(sample, timestep, context).sample
        got = ours(sample, timestep, context)
    assert got.shape == expected.shape == sample.shape
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_in_float64(name):
    # float32 parity is bounded by float32 rounding (~1e-6 here); in float64 any real difference (an eps, a
    # missing scale, a swapped order of operations beyond rounding) stands out.
    ours, theirs = (m.double() for m in make_pair(name))
    sample = torch.randn(BATCH, 4, 8, 12, dtype=torch.float64)
    context = torch.randn(BATCH, TOKENS, ours.config.cross_attention_dim, dtype=torch.float64)
    timestep = torch.tensor([3, 700])
    with torch.no_grad():
        err = rel_err(ours(sample, timestep, context), theirs(sample, timestep, context).sample)
    assert err <= 1e-12


def test_per_sample_timesteps_match_single_runs():
    ours, _ = make_pair("sd1")
    sample = torch.randn(BATCH, 4, 8, 8)
    context = torch.randn(BATCH, TOKENS, ours.config.cross_attention_dim)
    with torch.no_grad():
        batched = ours(sample, torch.tensor([20, 800]), context)
        singles = torch.cat([ours(sample[:1], 20, context[:1]), ours(sample[1:], torch.tensor(800), context[1:])])
        broadcast = ours(sample, torch.tensor(20), context)
        repeated = ours(sample, torch.tensor([20, 20]), context)
    assert rel_err(batched, singles) <= TOL
    # a shared timestep's embedding is computed once, as one row (a matrix-vector product instead of a
    # matrix product: float32 rounding apart, the same)
    assert rel_err(broadcast, repeated) <= 1e-6


def test_context_rows_must_match_the_samples():
    # the reference has no shared sample (fastdiff.engine.FastUNet has): one context row per sample
    ours, _ = make_pair("sd1")
    with pytest.raises(ValueError, match=r"context has 4 rows, expected sample's batch 2"):
        ours(torch.randn(BATCH, 4, 8, 8), torch.tensor(10), torch.randn(2 * BATCH, TOKENS, 32))


def test_timestep_of_wrong_shape_raises():
    ours, _ = make_pair("sd1")
    with pytest.raises(ValueError, match=r"timestep .* got shape \(3,\)"):
        ours(torch.randn(BATCH, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(BATCH, TOKENS, 32))


@pytest.mark.parametrize("flip_sin_to_cos, freq_shift, dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos, freq_shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 999, 500.5])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
    got = timestep_embedding(t, dim, flip_sin_to_cos, freq_shift)
    print(f"max abs err {(got - expected).abs().max().item():.3e}")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_diffusers(name):
    config = UNetConfig(**CONFIGS[name])
    theirs = diffusers_unet(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is known to fastdiff
        assert UNetConfig.from_dict(dict(theirs.config)) == config
        assert UNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("published", [SD15_UNET_CONFIG, SD21_UNET_CONFIG], ids=["sd1.5", "sd2.1"])
def test_full_size_configs_have_diffusers_keys_and_shapes(published):
    # Built on the meta device: shapes only, no memory, no time.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published config must read without complaint
        config = UNetConfig.from_dict(published)
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
        theirs = diffusers_unet(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    # Every transformer of both SD generations works with 64-wide heads (SD1: 320/8 = 40 at the top level).
    head_sizes = {block.attn1.to_q.out_features // block.attn1.heads
                  for name, block in ours.named_modules() if name.endswith("transformer_blocks.0")}
    assert head_sizes == ({40, 80, 160} if published is SD15_UNET_CONFIG else {64})
    assert sum(p.numel() for p in ours.parameters()) == (859_520_964 if published is SD15_UNET_CONFIG else 865_910_724)


UNSUPPORTED = [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("dual_cross_attention", True),
    ("num_attention_heads", 8),
    ("time_cond_proj_dim", 256),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"]),
    ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2]]),
    ("cross_attention_dim", [32, 32, 32]),
    ("attention_head_dim", [8, 8]),
    ("norm_num_groups", 12),
]


@pytest.mark.parametrize("key, value", UNSUPPORTED, ids=[k for k, _ in UNSUPPORTED])
def test_unsupported_settings_raise_value_error_naming_them(key, value):
    d = {**UNetConfig(**CONFIGS["sd1"]).to_dict(), key: value}
    with pytest.raises(ValueError, match=key) as info:
        UNetConfig.from_dict(d)
    print(info.value)


def test_bookkeeping_keys_and_neutral_fixed_settings_are_ignored_silently():
    d = {**UNetConfig(**CONFIGS["sd1"]).to_dict(), "_diffusers_version": "0.42.1", "_name_or_path": "x",
         "class_embed_type": None, "act_fn": "swish", "mid_block_scale_factor": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert UNetConfig.from_dict(d) == UNetConfig(**CONFIGS["sd1"])


def test_unknown_keys_are_ignored_with_one_warning_naming_them():
    d = {**UNetConfig(**CONFIGS["sd1"]).to_dict(), "a_setting_from_the_future": 1, "another_one": [2]}
    with pytest.warns(UserWarning) as record:
        config = UNetConfig.from_dict(d)
    print(record[0].message)
    assert len(record) == 1
    assert "'a_setting_from_the_future', 'another_one'" in str(record[0].message)
    assert config == UNetConfig(**CONFIGS["sd1"])


def test_time_embed_matches_diffusers():
    # the embedding every ResNet block receives (before its SiLU), for a shared and for per-sample timesteps
    ours, theirs = make_pair("sd1")
    for timestep in (torch.tensor(250.0), torch.tensor([1.0, 981.75])):
        with torch.no_grad():
            expected = theirs.time_embedding(theirs.time_proj(timestep.reshape(-1)))
            got = ours.time_embed(timestep, BATCH, torch.device("cpu"), torch.float32)
        assert got.shape == (timestep.numel(), ours.config.time_embed_dim)
        assert rel_err(got, expected) <= 1e-6


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_runs_in_plain_pytorch_without_the_ops_seam(name, monkeypatch):
    # The reference says what the network computes; which kernels run it is the engine's business
    # (fastdiff.engine.FastUNet): no fastdiff.ops call may happen in its forward.
    def refuse(*args, **kwargs):
        raise AssertionError("the reference UNet called fastdiff.ops")

    for op in ops.OPS:
        monkeypatch.setattr(ops, op, refuse)
    ours, theirs = make_pair(name)
    sample = torch.randn(BATCH, 4, 8, 12)
    context = torch.randn(BATCH, TOKENS, ours.config.cross_attention_dim)
    with torch.no_grad():
        assert rel_err(ours(sample, 10, context), theirs(sample, 10, context).sample) <= TOL


@pytest.mark.gpu
def test_forward_replays_in_a_cuda_graph():
    # No host synchronisation and no branching on tensor values: the whole forward can be captured once and
    # replayed with new inputs (timesteps included) copied into the captured buffers.
    torch.manual_seed(0)
    ours = UNet2DConditionModel(UNetConfig(**CONFIGS["sd2"])).cuda().eval()
    sample = torch.randn(BATCH, 4, 8, 12, device="cuda")
    timestep = torch.tensor([5.0, 600.0], device="cuda")
    context = torch.randn(BATCH, TOKENS, ours.config.cross_attention_dim, device="cuda")
    with ops.use_backend("reference"), torch.no_grad():
        graph, out = capture(lambda: ours(sample, timestep, context))
        for t in ([5.0, 600.0], [999.0, 0.5]):
            sample.copy_(torch.randn_like(sample))
            timestep.copy_(torch.tensor(t))
            graph.replay()
            expected = ours(sample, timestep, context)
            assert rel_err(out, expected) <= TOL
