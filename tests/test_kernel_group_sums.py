"""The producers that sum their output for the next GroupNorm (residual_add_sums, channel_cat_sums) and
group_norm(sums=), which then only normalizes.

CPU: under TRITON_INTERPRET=1 on 96 channels in 32 groups (3 channels each), 7x9 pixels, channels_last, every
dtype: the output equals the plain kernel's bit for bit, the sums equal `group_sums_ref` of that output, and
the norm from them equals the norm that computes its own statistics; several slices (forced by a smaller tile
and more "SMs" than the interpreter has) and a consumer cut differently from its producer; the format on
both layouts; invalid inputs; the ops seam.
GPU (`-m gpu`): SD1.5's UNet shapes at CFG batch 2 in every dtype, judged against torch's own error, the
sizes where the ops seam sums under auto, and CUDA-graph capture.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels import _triton
from fastdiff.kernels.channel_cat import channel_cat
from fastdiff.kernels.group_norm import group_norm, group_norm_ref, group_sums_ref
from fastdiff.kernels.group_sums import (channel_cat_sums, channel_cat_sums_ref, residual_add_sums,
                                         residual_add_sums_ref)
from fastdiff.kernels.residual_add import residual_add
from cuda_graphs import capture

gn_module = importlib.import_module("fastdiff.kernels.group_norm")  # the package re-exports the functions
gs_module = importlib.import_module("fastdiff.kernels.group_sums")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = 32


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _map(shape, dtype, mean=0.0, device="cpu"):
    # A mean far from zero checks that the shifted sums do not cancel.
    return _cl((torch.randn(shape, device=device) * 2 + mean).to(dtype))


def _affine(channels, dtype, device="cpu"):
    return (torch.randn(channels, device=device).to(dtype), torch.randn(channels, device=device).to(dtype))


def _check_sums(out, sums, slices=None):
    """sums add up to group_sums_ref(out) over the slices (same shift K), to float32 rounding."""
    ref = group_sums_ref(out, GROUPS)
    assert sums.shape[:2] == (2, out.shape[0]) and sums.shape[3] == GROUPS and sums.dtype == torch.float32
    if slices is not None:
        assert sums.shape[2] == slices
    err = (sums.double().sum(2) - ref.double().sum(2)).abs().max().item()
    scale = ref.abs().max().item()
    print(f"sums: {sums.shape[2]} slices, max abs err {err:.3e} of {scale:.3e}")
    assert err <= 1e-5 * scale + 1e-4


def _check_norm(out, sums, activation="silu"):
    """The norm from the producer's sums against the norm that computes its own statistics (same kernels
    otherwise) and against the reference."""
    weight, bias = _affine(out.shape[1], out.dtype)
    summed = group_norm(out, GROUPS, weight, bias, 1e-5, activation, sums=sums)
    own = group_norm(out, GROUPS, weight, bias, 1e-5, activation)
    ref = group_norm_ref(out.double(), GROUPS, weight.double(), bias.double(), 1e-5, activation)
    assert summed.is_contiguous(memory_format=torch.channels_last)
    err = (summed.double() - own.double()).abs().max().item()
    ref_err = (summed.double() - ref).abs().max().item()
    print(f"norm from sums vs own statistics: {err:.3e}; vs float64 reference {ref_err:.3e}")
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[out.dtype]
    assert err <= tol and ref_err <= 2 * tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["x+y+bias", "x+x_bias+y+bias", "y+bias", "shared x"])
def test_residual_add_sums_writes_the_residual_add_and_its_group_sums(variant, dtype):
    y = _map((2, 96, 7, 9), dtype)
    x = None if variant == "y+bias" else _map((1 if variant == "shared x" else 2, 96, 7, 9), dtype, mean=5.0)
    bias = torch.randn(96).to(dtype)
    x_bias = torch.randn(96).to(dtype) if variant == "x+x_bias+y+bias" else None
    out, sums = residual_add_sums(x, y, bias, x_bias, GROUPS)
    plain = residual_add(x, y, bias, x_bias=x_bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, plain)  # the same float32 sum, rounded once
    _check_sums(out, sums)
    _check_norm(out, sums)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skip_samples", [2, 1], ids=["skip", "shared skip"])
def test_channel_cat_sums_writes_the_concatenation_and_its_group_sums(skip_samples, dtype):
    x = _map((2, 64, 7, 9), dtype, mean=-3.0)
    skip = _map((skip_samples, 32, 7, 9), dtype, mean=4.0)  # its groups start mid-tile: channel 64 of 96
    out, sums = channel_cat_sums(x, skip, GROUPS)
    assert torch.equal(out, channel_cat(x, skip))
    _check_sums(out, sums)
    _check_norm(out, sums, activation=None)


@pytest.mark.parametrize("op", ["residual_add", "channel_cat"])
def test_sums_over_several_slices_serve_a_norm_cut_differently(op, monkeypatch):
    """4 slices of 16 pixels (2 per loop step) in the producer; the norm then runs on 2 slices of its own and
    must still add all 4 of the producer's."""
    monkeypatch.setattr(gn_module, "CL_TILE", 256)  # 256 // next_power_of_2(96) = 2 pixels per step
    monkeypatch.setattr(gs_module, "PRODUCER_CONFIGS", ((None, (1, 256, 4)),))  # the same for the producer
    monkeypatch.setattr(_triton, "sm_count", lambda device: 8)  # 8 // 2 samples = 4 slices
    y = _map((2, 96, 7, 9), torch.float32, mean=3.0)
    if op == "residual_add":
        out, sums = residual_add_sums(_map((2, 96, 7, 9), torch.float32), y, torch.randn(96), None, GROUPS)
    else:
        out, sums = channel_cat_sums(_cl(y[:, :48]), _cl(y[:, 48:]), GROUPS)
    _check_sums(out, sums, slices=4)
    monkeypatch.setattr(_triton, "sm_count", lambda device: 4)
    assert gn_module.channels_last_plan(out, GROUPS, gn_module._summed_config(out)).slices == 2
    _check_norm(out, sums)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_sums_ref_shifts_by_each_groups_first_element_and_serves_both_layouts(channels_last):
    x = (torch.randn(2, 96, 7, 9) * 3 + 50).to(torch.float16)
    x = _cl(x) if channels_last else x
    sums = group_sums_ref(x, GROUPS)
    groups = x.float().reshape(2, GROUPS, -1)
    d = groups - x.float()[:, ::3, 0, 0, None]  # group g starts at channel 3g, pixel 0
    assert sums.shape == (2, 2, 1, GROUPS)
    torch.testing.assert_close(sums[:, :, 0], torch.stack([d.sum(-1), (d * d).sum(-1)]))
    weight, bias = _affine(96, x.dtype)
    out = group_norm(x, GROUPS, weight, bias, 1e-5, "silu", sums=sums)
    torch.testing.assert_close(out, group_norm(x, GROUPS, weight, bias, 1e-5, "silu"), atol=2e-3, rtol=2e-3)


def test_sums_refuse_bad_inputs():
    y = _map((2, 96, 7, 9), torch.float32)
    with pytest.raises(ValueError, match="num_groups must divide the 96 channels, got 36"):
        residual_add_sums(None, y, torch.randn(96), None, 36)
    with pytest.raises(ValueError, match="channels_last"):
        residual_add_sums(None, y.contiguous(), torch.randn(96), None, GROUPS)
    with pytest.raises(ValueError, match="num_groups must divide the 100 channels"):
        channel_cat_sums(y, _map((2, 4, 7, 9), torch.float32), GROUPS)
    sums = group_sums_ref(y, GROUPS)
    with pytest.raises(ValueError, match="without an offset"):
        group_norm(y, GROUPS, offset=torch.zeros(2, 96), sums=sums)
    with pytest.raises(ValueError, match=r"sums has shape \(2, 2, 1, 16\), expected \(2, 2, slices, 32\)"):
        group_norm(y, GROUPS, sums=group_sums_ref(y, 16))
    with pytest.raises(ValueError, match="sums must be contiguous float32"):
        group_norm(y, GROUPS, sums=sums.double())
    with pytest.raises(ValueError, match="sums has shape"):
        group_norm_ref(y, GROUPS, sums=sums[:, :1])


def test_ops_seam_runs_the_sums_on_the_reference_on_cpu_and_the_kernel_when_forced(monkeypatch):
    x, y = _map((2, 96, 7, 9), torch.float32), _map((2, 96, 7, 9), torch.float32)
    bias = torch.randn(96)
    out, sums = ops.residual_add_sums(x, y, bias, None, GROUPS)
    assert sums.shape == (2, 2, 1, GROUPS)  # the reference: one slice
    ref_out, ref_sums = residual_add_sums_ref(x, y, bias, None, GROUPS)
    assert torch.equal(out, ref_out) and torch.equal(sums, ref_sums)
    with ops.use_backend("triton", op="channel_cat_sums"):
        out, sums = ops.channel_cat_sums(x, y, GROUPS // 2)
    torch.testing.assert_close(out, channel_cat_sums_ref(x, y, GROUPS // 2)[0])
    assert sums.shape[3] == GROUPS // 2


# SD1.5's UNet at CFG batch 2: the residual adds and the skip concatenations (x's and skip's channels).
GPU_ADDS = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (1, 320, 64, 64)]
GPU_CATS = [(2, 640, 320, 64, 64), (2, 320, 320, 64, 64), (2, 1280, 640, 32, 32), (2, 640, 320, 32, 32),
            (2, 1280, 1280, 16, 16), (2, 1280, 1280, 8, 8)]


def _gpu_error_vs_torch(out, sums, activation):
    """Error of the norm from the sums and of torch's eager silu(group_norm) in out's dtype, both against the
    float32 norm of the same values."""
    weight, bias = _affine(out.shape[1], out.dtype, "cuda")
    ref = F.group_norm(out.float(), GROUPS, weight.float(), bias.float(), 1e-5)
    torch_out = F.group_norm(out, GROUPS, weight, bias, 1e-5)
    if activation == "silu":
        ref, torch_out = F.silu(ref), F.silu(torch_out)
    ours = group_norm(out, GROUPS, weight, bias, 1e-5, activation, sums=sums)
    err = (ours.float() - ref).abs().max().item()
    torch_err = (torch_out.float() - ref).abs().max().item()
    print(f"{tuple(out.shape)} {out.dtype}: max abs err {err:.3e}, torch's {torch_err:.3e}")
    assert err <= 2 * torch_err + 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_ADDS, ids=lambda s: "x".join(map(str, s)))
def test_gpu_residual_add_sums_on_sd_shapes(shape, dtype):
    x, y = _map(shape, dtype, 2.0, "cuda"), _map(shape, dtype, 0.0, "cuda")
    bias = torch.randn(shape[1], device="cuda").to(dtype)
    out, sums = residual_add_sums(x, y, bias, None, GROUPS)
    assert torch.equal(out, residual_add(x, y, bias))
    _gpu_error_vs_torch(out, sums, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c1, c2, h, w", GPU_CATS, ids=lambda v: str(v))
def test_gpu_channel_cat_sums_on_sd_shapes(n, c1, c2, h, w, dtype):
    x, skip = _map((n, c1, h, w), dtype, -1.0, "cuda"), _map((1, c2, h, w), dtype, 3.0, "cuda")
    out, sums = channel_cat_sums(x, skip, GROUPS)
    assert torch.equal(out, channel_cat(x, skip))
    _gpu_error_vs_torch(out, sums, "silu")


@pytest.mark.gpu
def test_gpu_sums_and_norm_replay_in_a_cuda_graph():
    x, y = _map((2, 640, 32, 32), torch.float16, 0.0, "cuda"), _map((2, 640, 32, 32), torch.float16, 0.0, "cuda")
    bias, (weight, nbias) = torch.randn(640, device="cuda").half(), _affine(640, torch.float16, "cuda")

    def step():
        out, sums = residual_add_sums(x, y, bias, None, GROUPS)
        return group_norm(out, GROUPS, weight, nbias, 1e-5, "silu", sums=sums)

    graph, static = capture(step)
    x.copy_(_map(x.shape, x.dtype, 4.0, "cuda"))  # new values, so stale statistics would show
    graph.replay()
    expected = group_norm(residual_add(x, y, bias), GROUPS, weight, nbias, 1e-5, "silu")
    torch.testing.assert_close(static, expected, atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("size, summed", [(64, True), (32, True), (16, False), (8, False)])
def test_gpu_ops_sum_under_auto_only_where_it_pays(size, summed):
    """Under auto the ops seam sums only maps of at least MIN_PIXELS pixels; smaller ones get the plain op and
    no sums (their GroupNorm computes its own, which was faster there)."""
    x, y = (_map((2, 320, size, size), torch.float16, 0.0, "cuda") for _ in range(2))
    bias = torch.randn(320, device="cuda").half()
    out, sums = ops.residual_add_sums(x, y, bias, None, GROUPS)
    assert (sums is not None) == summed
    assert torch.equal(out, residual_add(x, y, bias))
    out, sums = ops.channel_cat_sums(x, y, GROUPS)
    assert (sums is not None) == summed
    assert torch.equal(out, channel_cat(x, y))
