"""The Triton GroupNorm(+SiLU) kernels against group_norm_ref.

CPU: the kernels run under TRITON_INTERPRET=1 on C = 96 channels in 32 groups (3 channels each), 7x9
pixels, both memory layouts; smaller tiles are forced to exercise the loops and the partial-sum merges.
GPU (`-m gpu`): every dtype on the SD UNet and VAE shapes, judged against torch's own error.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff.kernels.group_norm import group_norm, group_norm_ref

gn_module = importlib.import_module("fastdiff.kernels.group_norm")  # the package re-exports the function

# Against a float64 reference: dtype, atol, rtol. Low precision: one rounding of an O(1..5) output.
CPU_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 5e-3, 2e-3),
    (torch.bfloat16, 4e-2, 1e-2),
]


def _inputs(shape, dtype, channels_last, affine=True, device="cpu"):
    # An offset mean (5) and spread (3) check that the statistics do not cancel catastrophically.
    x = (torch.randn(shape, device=device) * 3 + 5).to(dtype)
    if channels_last:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    weight = torch.randn(shape[1], device=device).to(dtype) if affine else None
    bias = torch.randn(shape[1], device=device).to(dtype) if affine else None
    return x, weight, bias


def _ref64(x, groups, weight, bias, eps, activation):
    up = (lambda t: None if t is None else t.double())
    return group_norm_ref(x.double(), groups, up(weight), up(bias), eps, activation)


def _report(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_matches_reference_on_odd_shapes(activation, channels_last, dtype, atol, rtol):
    x, weight, bias = _inputs((2, 96, 7, 9), dtype, channels_last)
    out = group_norm(x, 32, weight, bias, 1e-5, activation)
    ref = _ref64(x, 32, weight, bias, 1e-5, activation)
    _report(f"{dtype} {'channels_last' if channels_last else 'contiguous'} {activation}", out, ref)
    assert out.dtype == dtype and out.stride() == x.stride()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("programs_per_sm", [1, 64], ids=["long-slices", "many-slices"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_norm_loops_over_tiles_and_adds_many_partials(monkeypatch, channels_last, programs_per_sm):
    # Tiny tiles make each program loop over several of them (one program per group or sample), or give each
    # group many slices whose partial sums the apply kernel adds up two slices at a time.
    monkeypatch.setattr(gn_module, "TILE", 64)
    monkeypatch.setattr(gn_module, "PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(gn_module, "CL_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(gn_module, "PARTIAL_TILE", 8)  # 8 // next_power_of_2(4 groups) = 2 slices per step
    x, weight, bias = _inputs((2, 12, 7, 9), torch.float32, channels_last)
    out = group_norm(x, 4, weight, bias, 1e-6, "silu")
    ref = _ref64(x, 4, weight, bias, 1e-6, "silu")
    _report("many tiles", out, ref)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, groups", [((3, 12), 4), ((2, 24, 11), 6), ((1, 8, 3, 4, 5), 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_norm_any_spatial_rank_without_affine(shape, groups, channels_last):
    x, _, _ = _inputs(shape, torch.float32, channels_last, affine=False)
    out = group_norm(x, groups)
    ref = _ref64(x, groups, None, None, 1e-5, None)
    _report(f"{shape}", out, ref)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_group_norm_makes_other_strides_contiguous():
    x = torch.randn(2, 9, 7, 96).permute(0, 3, 2, 1)  # (N, C, W, H) view: neither layout
    out = group_norm(x, 32)
    ref = _ref64(x, 32, None, None, 1e-5, None)
    _report("other strides", out, ref)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: group_norm(x, 5), "num_groups must divide the 96 channels, got 5"),
    (lambda x, w: group_norm(x, 32, w[:10]), r"weight has shape \(10,\), expected \(96,\)"),
    (lambda x, w: group_norm(x, 32, None, w.half()), "bias has dtype torch.float16, expected x's dtype"),
    (lambda x, w: group_norm(x, 32, activation="gelu"), "activation must be one of"),
    (lambda x, w: group_norm(x[0, 0, 0], 1), "x must be"),
    (lambda x, w: group_norm(x.double(), 32), "x has dtype torch.float64"),
    (lambda x, w: group_norm(x, 32, eps=-1.0), "eps must be >= 0"),
])
def test_group_norm_rejects_invalid_inputs(call, message):
    x, weight, _ = _inputs((2, 96, 7, 9), torch.float32, False)
    with pytest.raises(ValueError, match=message):
        call(x, weight)


def test_group_norm_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fastdiff.kernels._triton"), "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        group_norm(torch.randn(2, 96, 7, 9), 32)


def test_group_norm_op_traces_without_graph_breaks():
    x, weight, bias = _inputs((2, 96, 7, 9), torch.float32, True)
    compiled = torch.compile(group_norm, backend="aot_eager", fullgraph=True)
    expected = group_norm(x, 32, weight, bias, 1e-5, "silu")
    torch.testing.assert_close(compiled(x, 32, weight, bias, 1e-5, "silu"), expected)


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 UNet levels at batch 2, and the VAE decoder's largest GroupNorms at 512 px.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 128, 512, 512), (1, 512, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_error_on_gpu_at_most_twice_torch_error(shape, channels_last, dtype):
    x, weight, bias = _inputs(shape, dtype, channels_last, device="cuda")
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    up = (lambda t: t.to(ref_dtype))
    ref = F.silu(F.group_norm(up(x), 32, up(weight), up(bias), 1e-6))
    out = group_norm(x, 32, weight, bias, 1e-6, "silu")
    ref_torch = F.silu(F.group_norm(x, 32, weight, bias, 1e-6))
    err = _report(f"fastdiff {dtype} {shape}", out, ref)
    err_torch = _report(f"torch    {dtype} {shape}", ref_torch, ref)
    assert out.stride() == x.stride()
    assert torch.isfinite(out).all()
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
def test_group_norm_survives_cuda_graph_capture():
    x, weight, bias = _inputs((2, 320, 64, 64), torch.float16, True, device="cuda")
    group_norm(x, 32, weight, bias, 1e-5, "silu")  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = group_norm(x, 32, weight, bias, 1e-5, "silu")
    x.copy_(torch.randn_like(x))
    graph.replay()
    fresh = group_norm_ref(x, 32, weight, bias, 1e-5, "silu")
    _report("graph replay", out, fresh)
    torch.testing.assert_close(out, fresh, atol=5e-3, rtol=2e-3)
