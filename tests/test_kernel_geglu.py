"""The Triton GEGLU gate (value * GELU(gate) in one pass) against geglu_ref.

CPU: under TRITON_INTERPRET=1 on small odd shapes (half-widths 40, 77, 33: column tiles end mid-row).
GPU (`-m gpu`): every dtype on the shapes of SD1.5's transformer MLPs at 512 px, CFG batch 2.
Every dtype is judged against torch's own error at that precision (the same arithmetic written eagerly in
the tensors' dtype, i.e. geglu_ref), both measured from a higher-precision reference.
"""
import pytest
import torch

from fastdiff.kernels import _triton
from fastdiff.kernels.geglu import geglu, geglu_ref
from cuda_graphs import capture

ODD_SHAPES = [(2, 97, 2 * 40), (3, 5, 2 * 77), (13, 2 * 33)]
# The interpreter casts float32 -> bfloat16 by truncation (triton 3.9's interpreter.cast_impl passes no
# rounding mode), where the GPU rounds to nearest: on the CPU a bfloat16 result is only held to one ulp.
INTERPRETED_BF16_RTOL = 2.0**-7


def _errors(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu_error_at_most_twice_torch_error(shape, dtype):
    h = (torch.randn(shape) * 2).to(dtype)
    ref = geglu_ref(h.double())
    out = geglu(h)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype and out.is_contiguous()
    err = _errors(f"fastdiff {dtype} {shape}", out, ref)
    err_torch = _errors(f"torch    {dtype} {shape}", geglu_ref(h), ref)
    if dtype == torch.bfloat16 and _triton.INTERPRET:
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=INTERPRETED_BF16_RTOL)
        return
    assert err.max() <= 2 * err_torch.max()
    assert err.mean() <= 2 * err_torch.mean()


def test_geglu_returns_empty_output_for_empty_input():
    out = geglu(torch.randn(0, 7, 2 * 40))
    assert out.shape == (0, 7, 40)


@pytest.mark.parametrize("h, message", [
    (torch.randn(2, 3, 7), "last dim must be even .*got 7"),
    (torch.tensor(1.0), "got a 0-d tensor"),
    (torch.randn(2, 8, dtype=torch.float64), "h has dtype torch.float64, expected one of"),
    (torch.randn(8, 4).t(), r"h must be contiguous, got shape \(4, 8\) with strides \(1, 4\)"),
])
def test_geglu_rejects_invalid_inputs(h, message):
    with pytest.raises(ValueError, match=message):
        geglu(h)


def test_geglu_ref_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="last dim must be even .*got 5"):
        geglu_ref(torch.randn(3, 5))


def test_geglu_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        geglu(torch.randn(2, 8))


def test_geglu_op_traces_without_graph_breaks():
    h = torch.randn(3, 5, 2 * 77)
    compiled = torch.compile(geglu, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h), geglu(h))


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px, CFG batch 2: the MLP of each resolution level, (B, H*W, 2 * 4 * channels).
SD_SHAPES = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu_error_on_gpu_at_most_twice_torch_error(shape, dtype):
    h = (torch.randn(shape, device="cuda") * 2).to(dtype)
    ref = geglu_ref(h.to(torch.float64 if dtype == torch.float32 else torch.float32))
    err = _errors(f"fastdiff {dtype} {shape}", geglu(h), ref)
    err_torch = _errors(f"torch    {dtype} {shape}", geglu_ref(h), ref)
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
def test_geglu_survives_cuda_graph_capture():
    h = torch.randn(SD_SHAPES[0], device="cuda", dtype=torch.float16)
    graph, out = capture(lambda: geglu(h))
    h.copy_(torch.randn_like(h))
    graph.replay()
    ref = geglu_ref(h.float())
    _errors("graph replay", out, ref)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=2e-3)
