"""fastdiff's AutoencoderKL against diffusers' (the oracle), on tiny float32 configs on CPU."""
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from fastdiff.models.vae import AutoencoderKL, VAEConfig

TOL = 1e-5  # relative L2 error, float32

# Two small VAEs: one shaped like SD's (attention, quant convs, several resnets per level, channel changes
# that need conv_shortcut), one with every optional piece switched off and three levels.
CONFIGS = {
    "sd_like": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4),
    "bare": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16, latent_channels=3,
                 mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
}

# The SD 1.x vae/config.json as diffusers writes it (old enough to lack scaling_factor and force_upcast).
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512,
}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs()
    print(f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}")
    return ((ours - theirs).norm() / theirs.norm()).item()


def make_pair(name: str) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    """A randomly initialised diffusers VAE, every parameter perturbed so that zero/one inits cannot hide a
    swapped or skipped tensor, and fastdiff's VAE loaded from it strictly."""
    config = VAEConfig(**CONFIGS[name])
    theirs = DiffusersAutoencoderKL(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_matches_diffusers(name):
    ours, theirs = make_pair(name)
    z = torch.randn(2, ours.config.latent_channels, 6, 4)  # non-square
    with torch.no_grad():
        expected = theirs.decode(z).sample
        got = ours.decode(z)
    f = ours.config.downsample_factor
    assert got.shape == expected.shape == (2, 3, 6 * f, 4 * f)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_encode_matches_diffusers_posterior(name):
    ours, theirs = make_pair(name)
    x = torch.rand(2, 3, 24, 16) * 2 - 1  # non-square, in [-1, 1]
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        mean = ours.encode(x)
        mean2, logvar = ours.encode_distribution(x)
    assert mean.shape == dist.mean.shape == (2, ours.config.latent_channels, *(s // ours.config.downsample_factor
                                                                                for s in (24, 16)))
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL
    assert torch.equal(mean, mean2)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_in_float64(name):
    # float32 parity is limited by float32 rounding itself (diffusers' own float32 error vs float64 is ~1e-6
    # here); in float64 any real difference (an eps, an order of operations that is not just rounding) shows.
    ours, theirs = (m.double() for m in make_pair(name))
    x = torch.rand(1, 3, 24, 16, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, ours.config.latent_channels, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours.encode(x), theirs.encode(x).latent_dist.mean) <= 1e-12
        assert rel_err(ours.decode(z), theirs.decode(z).sample) <= 1e-12


def test_channels_last_matches_contiguous():
    # The model is layout-agnostic: channels_last trades speed for a smaller cuDNN workspace on GPU.
    ours, theirs = make_pair("sd_like")
    z = torch.randn(2, 4, 6, 4)
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    with torch.no_grad():
        expected_image, expected_mean = theirs.decode(z).sample, theirs.encode(x).latent_dist.mean
        ours.to(memory_format=torch.channels_last)
        image = ours.decode(z.contiguous(memory_format=torch.channels_last))
        mean = ours.encode(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(image, expected_image) <= TOL
    assert rel_err(mean, expected_mean) <= TOL


def test_forward_is_decode_of_encode():
    ours, theirs = make_pair("sd_like")
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        expected = theirs(x).sample  # diffusers' forward decodes the posterior mode
        got = ours(x)
    assert rel_err(got, expected) <= TOL


def test_backward_runs_through_inplace_residuals():
    ours, _ = make_pair("sd_like")
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    ours(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ours.parameters())


def test_reference_runs_in_plain_pytorch_without_the_ops_seam(monkeypatch):
    # which kernels run the VAE is the engine's business (fastdiff.engine.vae, tested in
    # test_engine_vae.py): the reference calls no fastdiff.ops
    from fastdiff import ops

    def refuse(*args, **kwargs):
        raise AssertionError("the reference VAE called fastdiff.ops")

    for op in ops.OPS:
        monkeypatch.setattr(ops, op, refuse)
    ours, theirs = make_pair("sd_like")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x).sample) <= TOL
    assert all(isinstance(coder.conv_act, torch.nn.SiLU) for coder in (ours.encoder, ours.decoder))  # as diffusers'


def test_from_dict_reads_sd15_config():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published config must read without complaint
        config = VAEConfig.from_dict(SD15_VAE_CONFIG)
    assert config.block_out_channels == (128, 256, 512, 512)
    assert config.layers_per_block == 2 and config.sample_size == 512 and config.downsample_factor == 8
    # Keys absent from old configs take diffusers' defaults.
    assert config.scaling_factor == 0.18215 and config.force_upcast and config.use_quant_conv
    assert config.mid_block_add_attention and config.shift_factor is None


def test_config_round_trips_through_diffusers():
    ours, theirs = make_pair("bare")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is known to fastdiff
        assert VAEConfig.from_dict(dict(theirs.config)) == ours.config
    d = ours.config.to_dict()
    for key, value in theirs.config.items():
        if not key.startswith("_"):
            assert d[key] == (list(value) if isinstance(value, tuple) else value), key
    assert VAEConfig.from_dict(d) == ours.config


def test_defaults_match_diffusers_defaults():
    theirs = DiffusersAutoencoderKL()
    assert VAEConfig.from_dict(dict(theirs.config)) == VAEConfig()


@pytest.mark.parametrize("override, name", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 2},
     "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"latents_std": [1.0] * 4}, "latents_std"),
    ({"norm_num_groups": 24}, "norm_num_groups"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"block_out_channels": [], "down_block_types": [], "up_block_types": []}, "block_out_channels"),
])
def test_from_dict_rejects_unsupported_setting(override, name):
    with pytest.raises(ValueError, match=name) as info:
        VAEConfig.from_dict({**SD15_VAE_CONFIG, **override})
    print(info.value)


def test_from_dict_ignores_unknown_keys_with_one_warning_naming_them():
    with pytest.warns(UserWarning) as record:
        config = VAEConfig.from_dict({**SD15_VAE_CONFIG, "some_new_setting": True, "another_one": None})
    print(record[0].message)
    assert len(record) == 1
    assert "'some_new_setting', 'another_one'" in str(record[0].message)
    assert config == VAEConfig.from_dict(SD15_VAE_CONFIG)


@pytest.mark.parametrize("shape, match", [((1, 3, 15, 16), "multiples of 2"), ((1, 4, 16, 16), "images must be")])
def test_encode_rejects_bad_image_shape(shape, match):
    ours = AutoencoderKL(VAEConfig(**CONFIGS["sd_like"]))
    with pytest.raises(ValueError, match=match):
        ours.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="latents must be"):
        ours.decode(torch.zeros(1, 3, 4, 4))
