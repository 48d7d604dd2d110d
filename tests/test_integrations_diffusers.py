"""fastdiff.integrations.diffusers: diffusers models patched onto fastdiff's kernels, against themselves unpatched.

CPU, float32. Under `auto` the ops run their plain-PyTorch references; forcing the `triton` backend runs
the real kernels under TRITON_INTERPRET=1, on a tiny UNet whose heads are 16 wide (the kernel's minimum;
the shared tiny models have 4-wide heads).
"""
import functools
import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from fastdiff import ops
from fastdiff.integrations.diffusers import FastdiffAttnProcessor, _fused_resnet_forward, is_patched, patch, unpatch
from tiny_models import _perturb, make_tiny_sd

PROMPT = "a red circle on a white background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    err = (got.double() - expected.double()).abs()
    print(f"max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def tiny_unet_for_kernels(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """The tiny SD1 UNet's layout with 16-wide heads (2 heads at 32 channels, 4 at 64), so the Triton
    attention kernel covers every attention layer."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8,
    ).eval()
    _perturb(unet, seed=1)
    return unet


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    return {kind: make_tiny_sd(tmp_path_factory.mktemp(kind), kind) for kind in ("sd1", "sd2")}


def generate(pipe, prompts=(PROMPT, "a blue square"), steps: int = 3, size: int = 64) -> np.ndarray:
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                generator=torch.Generator().manual_seed(0), output_type="np").images


class CallCounter:
    """Counts calls of fastdiff.ops.attention / group_norm while passing them through."""

    def __init__(self, monkeypatch):
        self.calls = {"attention": 0, "group_norm": 0}
        for name in self.calls:
            monkeypatch.setattr(ops, name, self._counted(name, getattr(ops, name)))

    def _counted(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_patched_pipeline_matches_unpatched_and_unpatch_restores_it_exactly(tiny_pipes, kind):
    pipe = tiny_pipes[kind]
    expected = generate(pipe)
    patch(pipe)
    try:
        assert is_patched(pipe)
        got = generate(pipe)
    finally:
        unpatch(pipe)
    restored = generate(pipe)
    print(f"{kind}: PSNR patched vs unpatched {psnr(got, expected):.1f} dB")
    assert psnr(got, expected) >= 40.0
    assert not is_patched(pipe)
    assert np.array_equal(restored, expected)


def test_patched_pipeline_on_triton_kernels_matches_unpatched(tiny_pipes, monkeypatch):
    """The whole pipeline with every attention and GroupNorm+SiLU on the Triton kernels (interpreter, which
    is slow: one prompt, one step, 32x32 pixels)."""
    pipe = tiny_pipes["sd1"]
    run = functools.partial(generate, prompts=(PROMPT,), steps=1, size=32)
    original_unet = pipe.unet
    pipe.unet = tiny_unet_for_kernels(cross_attention_dim=pipe.text_encoder.config.hidden_size)
    try:
        expected = run(pipe)
        originals = {name: m.processor for name, m in pipe.unet.named_modules() if isinstance(m, Attention)}
        patch(pipe)
        counter = CallCounter(monkeypatch)
        with ops.use_backend("triton", op="attention"), ops.use_backend("triton", op="group_norm"):
            got = run(pipe)
        unpatch(pipe)
        restored = run(pipe)
        print(f"PSNR on Triton kernels vs unpatched {psnr(got, expected):.1f} dB; op calls {counter.calls}")
        assert counter.calls["attention"] > 0 and counter.calls["group_norm"] > 0
        assert psnr(got, expected) >= 40.0
        assert np.array_equal(restored, expected)
        assert all(m.processor is originals[name] for name, m in pipe.unet.named_modules() if isinstance(m, Attention))
    finally:
        pipe.unet = original_unet


@pytest.mark.parametrize("model", ["unet", "vae"])
def test_every_attention_and_resnet_norm_goes_through_the_ops(tiny_pipes, monkeypatch, model):
    pipe = tiny_pipes["sd1"]
    target = getattr(pipe, model)
    used = target if model == "unet" else target.decoder  # decode runs the decoder only
    n_attention = sum(isinstance(m, Attention) for m in used.modules())
    n_resnets = sum(isinstance(m, ResnetBlock2D) for m in used.modules())
    patch(target)
    counter = CallCounter(monkeypatch)
    try:
        with torch.no_grad():
            if model == "unet":
                target(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 77, 32))
            else:
                target.decode(torch.randn(1, 4, 8, 8))
    finally:
        unpatch(target)
    print(f"{model}: {n_attention} attention layers, {n_resnets} resnets, op calls {counter.calls}")
    assert n_attention > 0 and n_resnets > 0
    assert counter.calls == {"attention": n_attention, "group_norm": 2 * n_resnets}


def _attention_case(case: str):
    """(Attention module, call kwargs) exercising one feature of diffusers' Attention; heads 16 wide."""
    torch.manual_seed(2)
    if case == "self-3d":
        attn = Attention(32, heads=2, dim_head=16)
        kwargs = dict(hidden_states=torch.randn(2, 37, 32))
    elif case == "cross-norm_cross":
        attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm")
        kwargs = dict(hidden_states=torch.randn(2, 37, 32), encoder_hidden_states=torch.randn(2, 7, 24))
    elif case == "vae-4d-group_norm-residual-rescale":
        attn = Attention(32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True,
                         rescale_output_factor=2.0, bias=True, _from_deprecated_attn_block=True)
        kwargs = dict(hidden_states=torch.randn(2, 32, 5, 6))
    elif case == "spatial_norm-temb":
        attn = Attention(32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True)
        kwargs = dict(hidden_states=torch.randn(2, 32, 4, 4), temb=torch.randn(2, 4, 2, 2))
    elif case == "no-scale_qk":  # diffusers' default processor is AttnProcessor here, with attn.scale = 1
        attn = Attention(32, heads=2, dim_head=16, scale_qk=False)
        kwargs = dict(hidden_states=torch.randn(2, 37, 32) * 0.1)
    else:
        raise ValueError(f"unknown case {case!r}")
    _perturb(attn, seed=3)
    return attn.eval(), kwargs


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["self-3d", "cross-norm_cross", "vae-4d-group_norm-residual-rescale",
                                  "spatial_norm-temb", "no-scale_qk"])
def test_processor_matches_diffusers_processor(case, backend):
    attn, kwargs = _attention_case(case)
    assert type(attn.processor) in (AttnProcessor, AttnProcessor2_0)
    with torch.no_grad():
        expected = attn(**kwargs)
        attn.set_processor(FastdiffAttnProcessor(attn.processor))
        with ops.use_backend(backend, op="attention"):
            got = attn(**kwargs)
    err = rel_err(got, expected)
    print(f"{case} on {backend}: relative error {err:.2e}")
    assert got.shape == expected.shape
    assert err <= 1e-5


def test_attention_mask_goes_to_the_original_processor(monkeypatch):
    attn, kwargs = _attention_case("self-3d")
    mask = torch.zeros(2, 1, 37)
    mask[:, :, 30:] = -10000.0  # diffusers' additive mask: hide the last 7 keys
    with torch.no_grad():
        expected = attn(**kwargs, attention_mask=mask)
        attn.set_processor(FastdiffAttnProcessor(attn.processor))
        counter = CallCounter(monkeypatch)
        got = attn(**kwargs, attention_mask=mask)
    assert counter.calls["attention"] == 0
    assert torch.equal(got, expected)


RESNETS = {
    "default-temb-shortcut": dict(in_channels=16, out_channels=32, temb_channels=8, groups=4),
    "scale_shift": dict(in_channels=16, temb_channels=8, groups=4, time_embedding_norm="scale_shift"),
    "up": dict(in_channels=16, temb_channels=8, groups=4, up=True),
    "down": dict(in_channels=16, temb_channels=8, groups=4, down=True),
    "vae-no-temb": dict(in_channels=16, temb_channels=None, groups=4, time_embedding_norm="group"),
    "skip_time_act-output_scale": dict(in_channels=16, temb_channels=8, groups=4, skip_time_act=True,
                                       output_scale_factor=2.0),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(RESNETS))
def test_fused_resnet_forward_matches_diffusers(name, backend):
    """On the reference backend F.group_norm + F.silu is what diffusers runs: the results must be identical."""
    torch.manual_seed(4)
    config = RESNETS[name]
    block = ResnetBlock2D(**config).eval()
    _perturb(block, seed=5)
    x = torch.randn(2, 16, 6, 6)
    temb = None if config["temb_channels"] is None else torch.randn(2, 8)
    with torch.no_grad():
        expected = block(x, temb)
        block.forward = _patched_forward_of(block)
        with ops.use_backend(backend, op="group_norm"):
            got = block(x, temb)
    err = rel_err(got, expected)
    print(f"{name} on {backend}: relative error {err:.2e}")
    if backend == "reference":
        assert torch.equal(got, expected)
    else:
        assert err <= 1e-5


def _patched_forward_of(block: ResnetBlock2D):
    """The forward `patch` installs on each ResnetBlock2D of a model, for a block on its own."""
    return types.MethodType(_fused_resnet_forward, block)


def test_fused_resnet_forward_passes_the_deprecated_scale_argument_to_diffusers():
    block = ResnetBlock2D(**RESNETS["default-temb-shortcut"]).eval()
    x, temb = torch.randn(1, 16, 4, 4), torch.randn(1, 8)
    with torch.no_grad():
        expected = block(x, temb)
        block.forward = _patched_forward_of(block)
        got = block(x, temb, scale=None)
    assert torch.equal(got, expected)


def test_lora_layers_around_the_projections_keep_working():
    """PEFT's LoRA wraps to_q / to_k / to_v / to_out[0] in modules of its own; the processor must call those
    modules, not read their weights. A stand-in wrapper (no peft needed) adds a low-rank update."""

    class LowRank(nn.Module):
        def __init__(self, base: nn.Linear, rank: int = 2):
            super().__init__()
            self.base = base
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    unet = tiny_unet_for_kernels()
    args = (torch.randn(2, 4, 8, 8), 10, torch.randn(2, 7, 32))
    with torch.no_grad():
        plain = unet(*args).sample
        for m in unet.modules():
            if isinstance(m, Attention):
                m.to_q, m.to_k, m.to_v = LowRank(m.to_q), LowRank(m.to_k), LowRank(m.to_v)
                m.to_out[0] = LowRank(m.to_out[0])
        _perturb(unet, seed=6)
        expected = unet(*args).sample
        patch(unet)
        got = unet(*args).sample
    lora_effect, err = rel_err(expected, plain), rel_err(got, expected)
    print(f"LoRA changes the output by {lora_effect:.2e}; patched vs unpatched relative error {err:.2e}")
    assert err <= 1e-5
    assert lora_effect > 1e-2


def test_peft_lora_adapter_keeps_working():
    pytest.importorskip("peft", reason="peft is not installed (optional: diffusers' LoRA loading needs it)")
    from peft import LoraConfig

    unet = tiny_unet_for_kernels()
    args = (torch.randn(2, 4, 8, 8), 10, torch.randn(2, 7, 32))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    with torch.no_grad():
        expected = unet(*args).sample
        unet.disable_adapters()
        plain = unet(*args).sample
        unet.enable_adapters()
        patch(unet)
        got = unet(*args).sample
    lora_effect, err = rel_err(expected, plain), rel_err(got, expected)
    print(f"LoRA changes the output by {lora_effect:.2e}; patched vs unpatched relative error {err:.2e}")
    assert err <= 1e-5
    assert lora_effect > 1e-2


def test_patched_unet_compiles_without_graph_breaks_on_the_kernels(monkeypatch):
    """fullgraph=True fails on any graph break. `auto` is made to prefer Triton on the CPU as it does on CUDA,
    and the ops start with nothing imported: `patch` must preload them (an import cannot be traced)."""
    monkeypatch.setitem(ops._AUTO_ORDER, "cpu", {**ops._AUTO_ORDER["cpu"], "attention": ("triton", "reference"),
                                                 "group_norm": ("triton", "reference")})
    monkeypatch.setattr(ops, "_impl_cache", {})
    monkeypatch.setattr(ops, "_module_cache", {})
    unet = tiny_unet_for_kernels()
    args = (torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 7, 32))
    with torch.no_grad():
        expected = unet(*args).sample
        patch(unet)
        torch._dynamo.reset()
        counter = CallCounter(monkeypatch)
        got = torch.compile(unet, backend="aot_eager", fullgraph=True)(*args).sample
    assert counter.calls["attention"] > 0 and ops.resolve("attention", "cpu") == "triton"
    err = rel_err(got, expected)
    print(f"compiled patched UNet on Triton kernels: relative error {err:.2e}")
    assert err <= 1e-5


def _state(model: nn.Module):
    """What patch may change: each Attention's processor object, each module's instance-level forward."""
    return ([m.processor for m in model.modules() if isinstance(m, Attention)],
            [m.__dict__.get("forward") for m in model.modules()])


def test_refuses_unsupported_processors_before_changing_anything(tiny_pipes):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    pipe = tiny_pipes["sd1"]
    name, attn = next((n, m) for n, m in pipe.unet.named_modules() if isinstance(m, Attention))
    original = attn.processor
    attn.set_processor(SlicedAttnProcessor(1))
    before = _state(pipe.unet), _state(pipe.vae)
    try:
        with pytest.raises(ValueError, match=f"unet.{name} has processor SlicedAttnProcessor"):
            patch(pipe)
        assert (_state(pipe.unet), _state(pipe.vae)) == before
        patch(pipe, attention=False)  # GroupNorm alone does not care about processors
        assert is_patched(pipe)
    finally:
        unpatch(pipe)
        attn.set_processor(original)


def test_refuses_non_silu_resnets():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, act_fn="mish",
                                cross_attention_dim=16)
    with pytest.raises(ValueError, match="nonlinearity Mish; the fused kernel computes SiLU"):
        patch(unet)
    assert not is_patched(unet)


@pytest.mark.parametrize("hook", ["instance forward", "accelerate hook on norm1"])
def test_refuses_hooked_resnets(hook):
    """Sequential CPU offload hooks every leaf module; the fused forward would read norm1's weights around
    the hook, so such blocks are refused (and nothing else gets patched)."""
    unet = tiny_unet_for_kernels()
    name, block = next((n, m) for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D))
    if hook == "instance forward":
        block.forward = block.forward
        expected = "has its forward replaced on the instance"
    else:
        block.norm1._hf_hook = object()
        expected = "has an accelerate hook on norm1"
    with pytest.raises(ValueError, match=f"UNet2DConditionModel.{name} {expected}"):
        patch(unet)
    assert not is_patched(unet)


def test_refuses_wrong_objects_and_double_patching(tiny_pipes):
    with pytest.raises(ValueError, match="expected a diffusers pipeline, UNet2DConditionModel or AutoencoderKL, "
                                         "got torch.nn.modules.linear.Linear"):
        patch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing to patch"):
        patch(tiny_pipes["sd1"], attention=False, group_norm=False)
    unet = tiny_unet_for_kernels()
    with pytest.raises(ValueError, match="patch the model first and compile it after"):
        patch(torch.compile(unet))
    patch(unet)
    with pytest.raises(ValueError, match="is already patched"):
        patch(unet)
    unpatch(unet)
    assert not is_patched(unet)


def test_patching_the_vae_alone_leaves_the_unet_alone(tiny_pipes):
    pipe = tiny_pipes["sd1"]
    unet_before = _state(pipe.unet)
    patch(pipe.vae)
    try:
        assert is_patched(pipe.vae) and _state(pipe.unet) == unet_before
        assert isinstance(pipe.vae, AutoencoderKL)
    finally:
        unpatch(pipe.vae)


@pytest.mark.gpu
def test_patched_float16_unet_on_cuda_is_as_accurate_as_unpatched(monkeypatch):
    """SD1.5's widths and head dims (40, 80) on the Triton kernels: the float16 error against float32 is
    within 2x of diffusers' own float16 error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true float32 reference
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).cuda().eval()
    args = (torch.randn(2, 4, 32, 32, device="cuda"), torch.tensor([500, 500], device="cuda"),
            torch.randn(2, 77, 768, device="cuda"))
    with torch.no_grad():
        reference = unet(*args).sample
        unet.half()
        args = (args[0].half(), args[1], args[2].half())
        unpatched = unet(*args).sample
        patch(unet)
        assert ops.resolve("attention", "cuda") == "triton" and ops.resolve("group_norm", "cuda") == "triton"
        patched = unet(*args).sample
    theirs, ours = rel_err(unpatched, reference), rel_err(patched, reference)
    print(f"float16 relative error vs float32: diffusers {theirs:.2e}, patched {ours:.2e}")
    assert ours <= 2 * theirs
