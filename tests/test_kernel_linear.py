"""The Triton linear with its epilogue (bias, GEGLU gate, residual add) against linear_ref.

CPU: under TRITON_INTERPRET=1 on small odd shapes (97 and 5 rows, K = 40, widths that end mid-tile).
GPU (`-m gpu`): every dtype on the shapes of SD1.5's transformer linears at 512 px, CFG batch 2, and a
CUDA-graph capture. Every dtype is judged against torch's own error at that precision (linear_ref in the
tensors' dtype), both measured from a higher-precision reference.
"""
import importlib

import pytest
import torch

from fastdiff import ops
from fastdiff.kernels import _triton
from fastdiff.kernels.linear import faster_than_cublas, linear, linear_ref
from cuda_graphs import capture

# (x's shape, weight rows N', geglu, bias, residual)
ODD_CASES = [((2, 97, 40), 320, True, True, False), ((5, 40), 48, False, True, True),
             ((97, 40), 24, False, False, True), ((3, 7, 64), 136, False, True, False)]
# The interpreter casts float32 -> bfloat16 by truncation (see test_kernel_geglu): one bfloat16 ulp there.
INTERPRETED_BF16_RTOL = 2.0**-7


def _inputs(shape, rows, geglu, has_bias, has_residual, dtype, device="cpu"):
    k = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    weight = (torch.randn(rows, k, device=device) / k**0.5).to(dtype)
    bias = (torch.randn(rows, device=device) * 0.5).to(dtype) if has_bias else None
    out_shape = (*shape[:-1], rows // 2 if geglu else rows)
    residual = torch.randn(out_shape, device=device).to(dtype) if has_residual else None
    return x, weight, bias, residual


def _errors(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


def _wide(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}"
                         f"{'-geglu' if c[2] else ''}{'-bias' if c[3] else ''}{'-residual' if c[4] else ''}")
def test_linear_error_at_most_twice_torch_error(case, dtype):
    shape, rows, geglu, has_bias, has_residual = case
    x, weight, bias, residual = _inputs(shape, rows, geglu, has_bias, has_residual, dtype)
    wide = torch.float64
    ref = linear_ref(x.to(wide), weight.to(wide), _wide(bias, wide), _wide(residual, wide), geglu)
    out = linear(x, weight, bias, residual, geglu)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    err = _errors(f"fastdiff {dtype}", out, ref)
    err_torch = _errors(f"torch    {dtype}", linear_ref(x, weight, bias, residual, geglu), ref)
    if dtype == torch.bfloat16 and _triton.INTERPRET:
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=INTERPRETED_BF16_RTOL)
        return
    floor = 1e-6 if dtype == torch.float32 else 0.0  # float32: both errors are rounding noise near 1e-7
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


def test_geglu_gelu_matches_the_exact_erf_gelu_across_the_range():
    """The epilogue's GELU (Abramowitz & Stegun 7.1.26 through Phi, see fastdiff.kernels.linear) on float32 gates
    from -10 to 10 (value 1, gate g: the products are exact): within 1e-6 of the exact erf GELU (float64), and
    within 0.5% of it relative in the negative tail, where 1 + erf(g / sqrt 2) would cancel."""
    g = torch.linspace(-10, 10, 4001)
    x = torch.zeros(g.numel(), 8)
    x[:, 0], x[:, 1] = g, 1.0
    weight = torch.zeros(16, 8)
    weight[:8, 1] = weight[8:, 0] = 1.0  # value rows read the 1, gate rows read g
    out = linear(x, weight, geglu=True).double()
    exact = torch.nn.functional.gelu(g.double())[:, None]
    err = (out - exact).abs()
    tail = ((g > -6) & (g < -0.5))
    rel = err[tail] / exact[tail].abs()
    print(f"GELU max abs err {err.max().item():.2e}, negative tail max rel err {rel.max().item():.2e}")
    assert err.max() <= 1e-6 and rel.max() <= 5e-3


def test_linear_float32_matches_reference_to_1e_5():
    x, weight, bias, residual = _inputs((97, 40), 48, False, True, True, torch.float32)
    out, ref = linear(x, weight, bias, residual), linear_ref(x, weight, bias, residual)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_linear_returns_empty_output_for_empty_input():
    out = linear(torch.randn(0, 7, 40), torch.randn(16, 40), geglu=True)
    assert out.shape == (0, 7, 8)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3, 40), torch.randn(8, 32)), r"weight has shape \(8, 32\), expected \(N, 40\)"),
    ((torch.randn(3, 40), torch.randn(8, 40), torch.randn(7)), r"bias has shape \(7,\), expected \(8,\)"),
    ((torch.randn(3, 40), torch.randn(8, 40), None, torch.randn(3, 7)),
     r"residual has shape \(3, 7\), expected the output's \(3, 8\)"),
    ((torch.randn(3, 40), torch.randn(9, 40), None, None, True), "geglu needs an even number of weight rows"),
    ((torch.randn(3, 40), torch.randn(8, 40), None, torch.randn(3, 4), True), "cannot be combined"),
    ((torch.randn(3, 40, dtype=torch.float64), torch.randn(8, 40, dtype=torch.float64)),
     "x has dtype torch.float64, expected one of"),
    ((torch.randn(3, 40), torch.randn(8, 40, dtype=torch.float16)), "weight has dtype torch.float16, expected"),
    ((torch.randn(40, 3).t(), torch.randn(8, 40)), r"x must be contiguous, got shape \(3, 40\)"),
    ((torch.randn(3, 42), torch.randn(8, 42)), "x's last dim K = 42 must be a multiple of 4 for torch.float32"),
    ((torch.randn(3, 40).half(), torch.randn(12, 40).half()), "output width N = 12 must be a multiple of 8"),
    ((torch.randn(41)[1:].view(1, 40), torch.randn(8, 40)), "x must start 16-byte aligned"),
])
def test_linear_rejects_invalid_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        linear(*args)


def test_linear_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        linear(torch.randn(2, 8), torch.randn(8, 8))


def test_linear_op_traces_without_graph_breaks():
    x, weight, bias, residual = _inputs((5, 40), 48, False, True, True, torch.float32)
    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias, residual), linear(x, weight, bias, residual))


def test_auto_runs_the_kernel_only_where_it_beat_cublas(monkeypatch):
    """ops.linear under auto on CUDA: the Triton kernel from 512 rows at K <= 1280, else F.linear and the
    epilogue on its own (GEGLU through ops.geglu); the result is the same either way."""
    assert faster_than_cublas(512, 1280) and not faster_than_cublas(511, 320) and not faster_than_cublas(8192, 2560)
    calls = []
    kernel = importlib.import_module("fastdiff.kernels.linear")  # the module; the package exports the function
    monkeypatch.setattr(kernel, "linear", lambda *a: calls.append("triton") or linear_ref(*a))
    monkeypatch.setattr(ops, "_impl_cache", {})
    monkeypatch.setattr(ops, "resolve", lambda op, device: "triton" if op == "linear" else "reference")
    x, weight, bias, _ = _inputs((4, 128, 40), 48, False, True, False, torch.float32)
    for rows, expected in ((4, ["triton"]), (3, [])):  # 512 and 384 rows
        calls.clear()
        out = ops.linear(x[:rows], weight, bias, geglu=True)
        assert calls == expected
        torch.testing.assert_close(out, linear_ref(x[:rows], weight, bias, geglu=True))


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px, CFG batch 2, the 64x64 and 16x16 levels: the GEGLU projection, the MLP's output Linear with
# the residual, proj_out with the residual.
SD_CASES = [((2, 4096, 320), 2560, True, True, False), ((2, 4096, 1280), 320, False, True, True),
            ((2, 4096, 320), 320, False, True, True), ((2, 256, 1280), 10240, True, True, False),
            ((2, 256, 1280), 1280, False, True, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", SD_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}"
                         f"{'-geglu' if c[2] else ''}{'-residual' if c[4] else ''}")
def test_linear_error_on_gpu_at_most_twice_torch_error(case, dtype):
    shape, rows, geglu, has_bias, has_residual = case
    x, weight, bias, residual = _inputs(shape, rows, geglu, has_bias, has_residual, dtype, "cuda")
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    ref = linear_ref(x.to(wide), weight.to(wide), _wide(bias, wide), _wide(residual, wide), geglu)
    torch_out = linear_ref(x, weight, bias, residual, geglu)  # float32 without TF32: torch's default
    err = _errors(f"fastdiff {dtype}", linear(x, weight, bias, residual, geglu), ref)
    err_torch = _errors(f"torch    {dtype}", torch_out, ref)
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
def test_linear_survives_cuda_graph_capture():
    x, weight, bias, residual = _inputs((2, 4096, 1280), 320, False, True, True, torch.float16, "cuda")
    graph, out = capture(lambda: linear(x, weight, bias, residual))
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    graph.replay()
    ref = linear_ref(x.float(), weight.float(), bias.float(), residual.float())
    _errors("graph replay", out, ref)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-3)


def test_auto_takes_the_tuning_tables_choice_over_the_built_in_rule(monkeypatch):
    """Where the device's tuning table has linear rows (`fastdiff.tuning.linear_choice`), its measured choice
    decides, both ways; a call the table sends to cuBLAS hands the kernel the compile of what other sizes take."""
    calls, later = [], []
    kernel = importlib.import_module("fastdiff.kernels.linear")
    monkeypatch.setattr(kernel, "linear", lambda *a: calls.append("triton") or linear_ref(*a))
    monkeypatch.setattr(ops, "_impl_cache", {})
    monkeypatch.setattr(ops, "resolve", lambda op, device: "triton" if op == "linear" else "reference")
    monkeypatch.setattr(ops, "_compile_later", lambda fn, *args: later.append(args[0].shape))
    x, weight, bias, residual = _inputs((4, 128, 40), 48, False, True, True, torch.float32)
    for table, rows, expected in (("cublas", 4, []), ("triton", 3, ["triton"]), (None, 4, ["triton"])):
        monkeypatch.setattr(ops.tuning, "linear_choice",
                            lambda x, w, epilogue, table=table: epilogue == "residual" and table or None)
        calls.clear()
        out = ops.linear(x[:rows], weight, bias, residual=residual[:rows])
        assert calls == expected, (table, rows)
        torch.testing.assert_close(out, linear_ref(x[:rows], weight, bias, residual=residual[:rows]))
    assert later == [x.shape]  # only the call the table sent to cuBLAS
