"""The Triton GroupNorm(+SiLU) kernels against group_norm_ref.

CPU: the kernels run under TRITON_INTERPRET=1 on C = 96 channels in 32 groups (3 channels each), 7x9
pixels, both memory layouts, through both strategies (single launch, split statistics/apply: each test that
takes a `path` forces one through SINGLE_LAUNCH_MAX and checks it ran); smaller tiles are forced to exercise
the loops and the partial-sum merges. The `offset` tests add a per-(sample, channel) offset to x inside the
norm (the UNet ResNet block's time embedding) and compare with the norm of the sum.
GPU (`-m gpu`): every dtype on the SD UNet and VAE shapes (with an offset: the UNet's), both strategies, judged
against torch's own error.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff.kernels._triton import jit_function, prepare_compile
from fastdiff.kernels.group_norm import group_norm, group_norm_ref
from cuda_graphs import capture

gn_module = importlib.import_module("fastdiff.kernels.group_norm")  # the package re-exports the function

# Against a float64 reference: dtype, atol, rtol. Low precision: one rounding of an O(1..5) output.
CPU_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 5e-3, 2e-3),
    (torch.bfloat16, 4e-2, 1e-2),
]


PATHS = ("single", "split")


def _force_path(monkeypatch, path):
    """Make group_norm take `path` ("single" or "split") whatever the group size; returns the list of the
    strategies it then launches, one entry per call, for the test to check."""
    monkeypatch.setattr(gn_module, "SINGLE_LAUNCH_MAX", 2**62 if path == "single" else 0)
    return _record_paths(monkeypatch)


def _record_paths(monkeypatch):
    launched = []
    for path in PATHS:
        launch = getattr(gn_module, f"_launch_{path}")
        monkeypatch.setattr(gn_module, f"_launch_{path}",
                            lambda *args, path=path, launch=launch: (launched.append(path), launch(*args))[1])
    return launched


def _inputs(shape, dtype, channels_last, affine=True, device="cpu"):
    # An offset mean (5) and spread (3) check that the statistics do not cancel catastrophically.
    x = (torch.randn(shape, device=device) * 3 + 5).to(dtype)
    if channels_last:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    weight = torch.randn(shape[1], device=device).to(dtype) if affine else None
    bias = torch.randn(shape[1], device=device).to(dtype) if affine else None
    return x, weight, bias


def _offset(x):
    """An (N, C) offset for x in x's dtype: far from zero, so the sums would cancel if the shift K did not
    follow it, and different per channel (and sample), so a misplaced channel shows."""
    return (torch.randn(x.shape[:2], device=x.device) * 2 + 100).to(x.dtype)


def _ref64(x, groups, weight, bias, eps, activation, offset=None):
    up = (lambda t: None if t is None else t.double())
    return group_norm_ref(x.double(), groups, up(weight), up(bias), eps, activation, up(offset))


def _report(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("path, affine", [("single", True), ("single", False), ("split", True)],
                         ids=["single-affine", "single-no-affine", "split-affine"])  # split, no affine: below
def test_group_norm_matches_reference_on_odd_shapes(monkeypatch, path, affine, activation, channels_last, dtype,
                                                    atol, rtol):
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 96, 7, 9), dtype, channels_last, affine)
    out = group_norm(x, 32, weight, bias, 1e-5, activation)
    ref = _ref64(x, 32, weight, bias, 1e-5, activation)
    _report(f"{path} {dtype} {'channels_last' if channels_last else 'contiguous'} {activation}", out, ref)
    assert launched == [path]
    assert out.dtype == dtype and out.stride() == x.stride()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("affine, activation", [(True, "silu"), (False, None)], ids=["affine-silu", "plain"])
def test_group_norm_with_offset_equals_group_norm_of_the_sum(monkeypatch, affine, activation, path, channels_last):
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 96, 7, 9), torch.float32, channels_last, affine)
    offset = _offset(x)
    out = group_norm(x, 32, weight, bias, 1e-5, activation, offset)
    ref = _ref64(x, 32, weight, bias, 1e-5, activation, offset)
    _report(f"offset {path} {'channels_last' if channels_last else 'contiguous'} {affine} {activation}", out, ref)
    assert launched == [path]
    assert out.stride() == x.stride()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", ["expanded", "slice"])
def test_group_norm_reads_offset_rows_at_their_stride(monkeypatch, rows, path, channels_last):
    # "expanded": one (1, C) row for every sample (row stride 0); "slice": columns of a wider matrix (row
    # stride > C), as a UNet's batched time projections hand each block its part.
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 96, 7, 9), torch.float32, channels_last)
    wide = _offset(torch.cat([x, x], dim=1))  # (2, 192)
    offset = wide[:1, 96:].expand(2, 96) if rows == "expanded" else wide[:, 96:]
    out = group_norm(x, 32, weight, bias, 1e-5, "silu", offset)
    ref = _ref64(x, 32, weight, bias, 1e-5, "silu", offset.contiguous())
    _report(f"offset rows {rows} (strides {offset.stride()}), {path}", out, ref)
    assert launched == [path] and offset.stride(0) == (0 if rows == "expanded" else 192)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES[1:])
@pytest.mark.parametrize("path, channels_last", [("single", True), ("split", False)],
                         ids=["single-channels_last", "split-contiguous"])  # the others: in float32 above
def test_group_norm_with_offset_in_low_precision_rounds_only_the_output(monkeypatch, path, channels_last, dtype,
                                                                        atol, rtol):
    # The kernels add the offset in float32: against the exact sum, only the output's rounding is left.
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 96, 7, 9), dtype, channels_last)
    offset = _offset(x)
    out = group_norm(x, 32, weight, bias, 1e-5, "silu", offset)
    ref = _ref64(x, 32, weight, bias, 1e-5, "silu", offset)
    _report(f"offset {path} {dtype} {'channels_last' if channels_last else 'contiguous'}", out, ref)
    assert launched == [path]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_calls_without_offset_pass_zeros_and_change_no_bit(monkeypatch, path):
    """Eager channels_last calls without an offset launch the offset variants with zeros, so a shape normalized
    with and without an offset compiles once; the output is bitwise the offset-free variant's. Contiguous calls
    pass none (their kernels would gather it per element)."""
    _force_path(monkeypatch, path)
    offsets, run = [], gn_module._group_norm_run
    monkeypatch.setattr(gn_module, "_group_norm_run", lambda *a: (offsets.append(a[7]), run(*a))[1])  # its offset
    x, weight, bias = _inputs((2, 40, 5, 7), torch.float32, True)
    out = group_norm(x, 8, weight, bias, 1e-5, "silu")
    assert offsets[-1] is not None and offsets[-1].shape == (2, 40) and not offsets[-1].any()
    group_norm(x.contiguous(), 8, weight, bias, 1e-5, "silu")
    assert offsets[-1] is None
    monkeypatch.setattr(gn_module, "_zero_offset", lambda x: None)
    plain = group_norm(x, 8, weight, bias, 1e-5, "silu")
    assert offsets[-1] is None and torch.equal(out, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_group_norm_ref_adds_the_offset_in_x_dtype_as_the_unfused_model(dtype):
    x, weight, bias = _inputs((2, 96, 7, 9), dtype, True)
    offset = _offset(x)
    out = group_norm_ref(x, 32, weight, bias, 1e-5, "silu", offset)
    unfused = group_norm_ref(x + offset[:, :, None, None], 32, weight, bias, 1e-5, "silu")
    _report(f"ref with offset vs unfused, {dtype}", out, unfused)
    assert torch.equal(out, unfused)


@pytest.mark.parametrize("limit, path", [(3 * 7 * 9, "single"), (3 * 7 * 9 - 1, "split")])
def test_group_norm_takes_single_launch_up_to_the_limit(monkeypatch, limit, path):
    monkeypatch.setattr(gn_module, "SINGLE_LAUNCH_MAX", limit)
    launched = _record_paths(monkeypatch)
    group_norm(torch.randn(2, 96, 7, 9), 32)  # groups of 3 channels x 63 pixels
    assert launched == [path]


@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("path, programs_per_sm", [("single", 1), ("split", 1), ("split", 64)],
                         ids=["single", "split-long-slices", "split-many-slices"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_norm_loops_over_tiles_and_adds_many_partials(monkeypatch, channels_last, path, programs_per_sm,
                                                            with_offset):
    # Tiny tiles make each program loop over several of them (one program per group or sample), or give each
    # group many slices whose partial sums the apply kernel adds up two slices at a time. Contiguous tiles of
    # 64 elements straddle the 63-pixel channels: each element must gather its own channel's offset.
    launched = _force_path(monkeypatch, path)
    monkeypatch.setattr(gn_module, "TILE", 64)
    monkeypatch.setattr(gn_module, "CL_MANY_TILE", 64)
    monkeypatch.setattr(gn_module, "PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(gn_module, "CL_MANY_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(gn_module, "CL_ONE_PER_SM", 0)  # always CL_MANY_PROGRAMS_PER_SM
    monkeypatch.setattr(gn_module, "PARTIAL_TILE", 8)  # 8 // next_power_of_2(4 groups) = 2 slices per step
    x, weight, bias = _inputs((2, 12, 7, 9), torch.float32, channels_last)
    offset = _offset(x) if with_offset else None
    out = group_norm(x, 4, weight, bias, 1e-6, "silu", offset)
    ref = _ref64(x, 4, weight, bias, 1e-6, "silu", offset)
    _report(f"many tiles, {path}, offset {with_offset}", out, ref)
    assert launched == [path]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, groups, with_offset", [((3, 12), 4, False), ((2, 24, 11), 6, False),
                                                       ((1, 8, 3, 4, 5), 2, False), ((3, 12), 4, True),
                                                       ((1, 8, 3, 4, 5), 2, True)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_any_spatial_rank_without_affine(monkeypatch, path, shape, groups, with_offset, channels_last):
    launched = _force_path(monkeypatch, path)
    x, _, _ = _inputs(shape, torch.float32, channels_last, affine=False)
    offset = _offset(x) if with_offset else None
    out = group_norm(x, groups, offset=offset)
    ref = _ref64(x, groups, None, None, 1e-5, None, offset)
    _report(f"{path} {shape} offset {with_offset}", out, ref)
    assert launched == [path]
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
    (lambda x, w: group_norm(x, 32, offset=w), r"offset has shape \(96,\), expected \(N, C\) = \(2, 96\)"),
    (lambda x, w: group_norm(x, 32, offset=x[:1, :, 0, 0]), r"offset has shape \(1, 96\), expected"),
    (lambda x, w: group_norm(x, 32, offset=x[:, :, 0, 0].half()), "offset has dtype torch.float16, expected x's"),
    (lambda x, w: group_norm(x, 32, offset=x[:, :, 0, 0].to("meta")), "offset is on meta, expected x's device cpu"),
    (lambda x, w: group_norm(x, 32, offset=x[:, :, 0, 0]),
     r"offset's channels must be adjacent \(stride 1\), got strides \(6048, 63\)"),
    (lambda x, w: group_norm_ref(x, 32, offset=w), r"offset has shape \(96,\), expected \(N, C\) = \(2, 96\)"),
])
def test_group_norm_rejects_invalid_inputs(call, message):
    x, weight, _ = _inputs((2, 96, 7, 9), torch.float32, False)
    with pytest.raises(ValueError, match=message):
        call(x, weight)


def test_group_norm_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fastdiff.kernels._triton"), "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        group_norm(torch.randn(2, 96, 7, 9), 32)


@pytest.mark.parametrize("path, with_offset", [("single", False), ("split", False), ("single", True)],
                         ids=["single", "split", "single-offset"])
def test_group_norm_op_traces_without_graph_breaks(monkeypatch, path, with_offset):
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 96, 7, 9), torch.float32, True)
    offset = _offset(x) if with_offset else None
    compiled = torch.compile(group_norm, backend="aot_eager", fullgraph=True)
    expected = _ref64(x, 32, weight, bias, 1e-5, "silu", offset)
    out = compiled(x, 32, weight, bias, 1e-5, "silu", offset)
    _report(f"compiled, {path}, offset {with_offset}", out, expected)
    assert set(launched) == {path}  # the custom op's launch took the forced path
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 UNet levels at batch 2, and the VAE decoder at 512 px: its mid block (groups of 16 x 4096) and its
# largest GroupNorms.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 64, 64), (1, 128, 512, 512),
             (1, 512, 128, 128)]


def _assert_within_twice_torch_error(out, x, err, err_torch, dtype):
    """out keeps x's layout, is finite, and its max and mean errors are at most twice torch's."""
    assert out.stride() == x.stride()
    assert torch.isfinite(out).all()
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_error_on_gpu_at_most_twice_torch_error(monkeypatch, path, shape, channels_last, dtype):
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs(shape, dtype, channels_last, device="cuda")
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    up = (lambda t: t.to(ref_dtype))
    ref = F.silu(F.group_norm(up(x), 32, up(weight), up(bias), 1e-6))
    out = group_norm(x, 32, weight, bias, 1e-6, "silu")
    ref_torch = F.silu(F.group_norm(x, 32, weight, bias, 1e-6))
    err = _report(f"fastdiff {path} {dtype} {shape}", out, ref)
    err_torch = _report(f"torch    {dtype} {shape}", ref_torch, ref)
    assert launched == [path]
    _assert_within_twice_torch_error(out, x, err, err_torch, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SD_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))  # the UNet's
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_with_offset_error_on_gpu_at_most_twice_torch_error(monkeypatch, path, shape, channels_last,
                                                                       dtype):
    # torch's error is that of the unfused pair the offset replaces: x + offset rounded to the dtype, then the norm.
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs(shape, dtype, channels_last, device="cuda")
    offset = torch.randn(shape[:2], device="cuda").to(dtype)  # a time embedding's scale
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    up = (lambda t: t.to(ref_dtype))
    ref = F.silu(F.group_norm(up(x) + up(offset)[:, :, None, None], 32, up(weight), up(bias), 1e-6))
    out = group_norm(x, 32, weight, bias, 1e-6, "silu", offset)
    ref_torch = F.silu(F.group_norm(x + offset[:, :, None, None], 32, weight, bias, 1e-6))
    err = _report(f"fastdiff {path} {dtype} {shape} offset", out, ref)
    err_torch = _report(f"torch    {dtype} {shape} x + offset", ref_torch, ref)
    assert launched == [path]
    _assert_within_twice_torch_error(out, x, err, err_torch, dtype)


@pytest.mark.gpu
def test_group_norm_captured_without_a_zero_buffer_allocates_none(monkeypatch):
    """A capture that finds no zero buffer for `_zero_offset` launches the offset-free variant instead of
    allocating one inside the graph's memory pool."""
    x, weight, bias = _inputs((2, 320, 64, 64), torch.float16, True, device="cuda")
    zero_offset = gn_module._zero_offset
    monkeypatch.setattr(gn_module, "_zero_offset", lambda x: None)
    group_norm(x, 32, weight, bias, 1e-5, "silu")  # compiles the offset-free variant outside the capture
    monkeypatch.setattr(gn_module, "_zero_offset", zero_offset)
    monkeypatch.setattr(gn_module._triton, "_CONSTANT_ROWS", {})
    graph, out = capture(lambda: group_norm(x, 32, weight, bias, 1e-5, "silu"), warm=False)
    assert gn_module._triton._CONSTANT_ROWS == {}
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, group_norm_ref(x, 32, weight, bias, 1e-5, "silu"), atol=5e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_survives_cuda_graph_capture(monkeypatch, path, with_offset):
    launched = _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 320, 64, 64), torch.float16, True, device="cuda")
    offset = torch.randn(2, 320, device="cuda", dtype=torch.float16) if with_offset else None
    graph, out = capture(lambda: group_norm(x, 32, weight, bias, 1e-5, "silu", offset))
    x.copy_(torch.randn_like(x))
    if with_offset:
        offset.copy_(torch.randn_like(offset))
    graph.replay()
    fresh = group_norm_ref(x, 32, weight, bias, 1e-5, "silu", offset)
    _report(f"graph replay, {path}, offset {with_offset}", out, fresh)
    assert set(launched) == {path}
    torch.testing.assert_close(out, fresh, atol=5e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_silu_and_none_share_one_compiled_kernel(monkeypatch, path, channels_last):
    # SiLU is a runtime argument kept out of Triton's specialization: one compile serves both activations.
    _force_path(monkeypatch, path)
    name = {"split": "_group_norm_apply_kernel", "single": "_group_norm_single_kernel"}[path]
    name = "_group_norm_single_cl_kernel" if channels_last and path == "single" else name
    cache = jit_function(getattr(gn_module, name)).device_caches[torch.cuda.current_device()][0]
    x, weight, bias = _inputs((2, 40, 5, 7), torch.float16, channels_last, device="cuda")  # a shape no other test uses
    compiled_before = len(cache)
    outs = {activation: group_norm(x, 8, weight, bias, 1e-5, activation) for activation in ("silu", None)}
    assert len(cache) == compiled_before + 1
    for activation, out in outs.items():
        ref = group_norm_ref(x, 8, weight, bias, 1e-5, activation)
        _report(f"{path} {activation}", out, ref)
        torch.testing.assert_close(out, ref, atol=5e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_with_and_without_offset_under_inductor_matches_eager(monkeypatch, path):
    # Inductor launches the kernels itself (triton_op): with an offset pointer, and with None (a constant).
    _force_path(monkeypatch, path)
    x, weight, bias = _inputs((2, 320, 64, 64), torch.float16, True, device="cuda")
    offset = torch.randn(2, 320, device="cuda", dtype=torch.float16)

    def block(x, weight, bias, offset):
        return group_norm(x, 32, weight, bias, 1e-5, "silu", offset) * 2.0, group_norm(x, 32, weight, bias) + 1.0

    expected = block(x, weight, bias, offset)
    prepare_compile()
    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True)(x, weight, bias, offset)
    for name, a, b in zip(("offset", "no offset"), got, expected):
        _report(f"inductor vs eager, {path}, {name}", a, b)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
