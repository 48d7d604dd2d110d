"""fast_vae (fastdiff.engine.vae) on the CPU in float32: the copy with fused modules decodes and encodes as the
reference VAE and diffusers' do, shares the reference's parameters, and leaves the reference's modules as they
were."""
import copy

import pytest
import torch

from fastdiff import ops
from fastdiff.engine import FastConfig, fast_vae
from fastdiff.engine.unet import FastUpsample
from fastdiff.engine.vae import FastVAEAttention, FastVAEResnetBlock, GroupNormSiLU
from fastdiff.models.vae import Attention, ResnetBlock2D, Upsample2D
from tiny_models import TINY_VAE, rel, tiny_vae


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("vae_attention", ["auto", "sdpa", "matmul"])
def test_fast_vae_matches_reference(vae_attention):
    plain = tiny_vae()
    fast = fast_vae(copy.deepcopy(plain), FastConfig(vae_attention=vae_attention))
    z = torch.randn(2, TINY_VAE.latent_channels, 6, 5)
    x = torch.rand(2, 3, 12, 10) * 2 - 1
    ref, out = plain.decode(z), fast.decode(z)
    err = (out - ref).abs()
    print(f"vae decode ({vae_attention}): max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5
    (mean, logvar), (ref_mean, ref_logvar) = fast.encode_distribution(x), plain.encode_distribution(x)
    print(f"vae encode ({vae_attention}): mean rel {rel(mean, ref_mean):.2e} logvar rel {rel(logvar, ref_logvar):.2e}")
    assert rel(mean, ref_mean) <= 1e-5 and rel(logvar, ref_logvar) <= 1e-5


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_fast_vae_matches_diffusers(channels_last):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    ours = tiny_vae()
    theirs = DiffusersAutoencoderKL(**{k: v for k, v in TINY_VAE.to_dict().items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fast = fast_vae(ours, FastConfig(channels_last=channels_last))
    z = torch.randn(1, TINY_VAE.latent_channels, 4, 6)
    x = torch.rand(1, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        image, expected_image = fast.decode(_cl(z) if channels_last else z), theirs.decode(z).sample
        mean, expected_mean = fast.encode_distribution(x)[0], theirs.encode(x).latent_dist.mean
    print(f"fast VAE vs diffusers: decode rel {rel(image, expected_image):.2e}, encode rel "
          f"{rel(mean, expected_mean):.2e}")
    assert rel(image, expected_image) <= 1e-5
    assert rel(mean, expected_mean) <= 1e-5


def test_fast_vae_leaves_the_reference_modules_unchanged_and_shares_its_parameters():
    vae = tiny_vae()
    z = torch.randn(1, TINY_VAE.latent_channels, 4, 4)
    before = vae.decode(z)
    types = [(name, type(m)) for name, m in vae.named_modules()]
    params = [id(p) for p in vae.parameters()]
    fast = fast_vae(vae, FastConfig())
    assert [(name, type(m)) for name, m in vae.named_modules()] == types
    assert [id(p) for p in vae.parameters()] == params
    assert set(map(id, fast.parameters())) == set(params)  # nothing copied
    assert set(fast.state_dict()) == set(vae.state_dict())
    fast_types = {type(m) for m in fast.modules()}
    assert {FastVAEResnetBlock, FastVAEAttention, FastUpsample, GroupNormSiLU} <= fast_types
    assert not fast_types & {ResnetBlock2D, Attention, Upsample2D}
    after = vae.decode(z)
    print(f"reference decode after fast_vae vs before: rel {rel(after, before):.2e}")
    assert rel(after, before) <= 1e-5  # channels_last: float32 rounding only
    other = tiny_vae()  # a load into the reference reaches the copy: the same tensors
    vae.load_state_dict(other.state_dict())
    assert rel(fast.decode(z), other.decode(z)) <= 1e-5


def test_fast_vae_upsamples_by_subpixel_only_when_configured(monkeypatch):
    vae = tiny_vae()
    z = _cl(torch.randn(1, TINY_VAE.latent_channels, 4, 6))
    ref = vae.decode(z)
    calls = []
    real = ops.subpixel_shuffle
    monkeypatch.setattr(ops, "subpixel_shuffle", lambda *a: calls.append(a[0].shape) or real(*a))
    direct = fast_vae(vae, FastConfig(subpixel_upsample=False)).decode(z)
    assert calls == []
    upsamplers = [m for m in vae.modules() if isinstance(m, Upsample2D)]
    out = fast_vae(vae, FastConfig()).decode(z)
    assert len(calls) == len(upsamplers) > 0
    print(f"VAE subpixel vs direct upsampling: rel {rel(out, direct):.2e}; vs reference {rel(out, ref):.2e}")
    assert rel(out, direct) <= 1e-5 and rel(out, ref) <= 1e-5


def test_fast_vae_attention_picks_matmul_past_the_kernels_widest_head():
    from fastdiff.models.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):  # shapes only
        wide = AutoencoderKL(VAEConfig(block_out_channels=(512,), norm_num_groups=32)).eval()  # SD's 512-wide head
    fast = fast_vae(wide, FastConfig())
    attentions = [m for m in fast.modules() if isinstance(m, FastVAEAttention)]
    assert attentions and all(m.attend is ops.matmul_attention for m in attentions)
    assert all(m.attend is ops.sdpa_attention
               for m in fast_vae(wide, FastConfig(vae_attention="sdpa")).modules() if isinstance(m, FastVAEAttention))
