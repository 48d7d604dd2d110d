"""ops.matmul (x @ weight^T, written to or added onto `out`): the reference twin's contract and errors on the
CPU; on the GPU, fastdiff._C's cuBLAS call without a workspace against a float32 product, its dispatch, and
a captured CUDA graph of it holding no memset node (the reason it exists)."""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext, ops
from fastdiff.kernels.matmul import matmul_ref


def test_reference_is_linear_without_bias_and_accumulates_onto_out():
    x, w = torch.randn(3, 5, 7), torch.randn(4, 7)
    torch.testing.assert_close(matmul_ref(x, w), F.linear(x, w))
    out = torch.randn(3, 5, 4)
    start = out.clone()
    assert matmul_ref(x, w, out=out) is out
    torch.testing.assert_close(out, F.linear(x, w))
    out.copy_(start)
    assert matmul_ref(x, w, out=out, accumulate=True) is out
    torch.testing.assert_close(out, start + F.linear(x, w))


@pytest.mark.parametrize("args, message", [
    (lambda: (torch.randn(3, 7), torch.randn(4, 6), None, False), r"weight has shape \(4, 6\), expected \(N, 7\)"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7, 1), None, False), "weight \\(N, K\\)"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7), torch.empty(3, 5), False),
     r"out has shape \(3, 5\), expected \(3, 4\)"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7), None, True), "accumulate=True adds onto `out`, but out is None"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7).double(), None, False), "weight is torch.float64"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7), torch.empty(3, 4).half(), False), "out is torch.float16"),
    (lambda: (torch.randn(3, 7), torch.randn(4, 7), torch.empty(4, 3).t(), False), "out must be contiguous"),
], ids=["k_mismatch", "weight_not_2d", "out_shape", "accumulate_without_out", "weight_dtype", "out_dtype",
        "strided_out"])
def test_bad_inputs_raise_naming_the_value(args, message):
    x, w, out, accumulate = args()
    with pytest.raises(ValueError, match=message):
        ops.matmul(x, w, out=out, accumulate=accumulate)


def test_cpu_tensors_take_the_reference_and_the_extension_says_why_not():
    assert ops.resolve("matmul", "cpu") == "reference"
    ok, why = _ext.availability("cpu", "matmul")
    assert not ok and why


# ---- GPU: fastdiff._C's GEMM ----

def _cuda_ready():
    ok, why = _ext.availability("cuda", "matmul")
    assert ok, f"fastdiff._C's matmul cannot run: {why}"


# (M, K, N): SD1.5's projections at CFG batch 2 and 16 (q/k/v, to_out, proj_in, the MLP output), and odd sizes.
SHAPES = [(8192, 320, 960), (65536, 320, 320), (16384, 2560, 640), (2048, 640, 640), (77, 768, 1280), (97, 40, 24)]


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, k, n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_extension_matches_float32_within_twice_torchs_error(m, k, n, dtype, accumulate):
    _cuda_ready()
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    start = torch.randn(m, n, device="cuda").to(dtype)
    exact = F.linear(x.float(), w.float()) + (start.float() if accumulate else 0)
    out = start.clone()
    assert _ext.matmul(x, w, out=out, accumulate=accumulate) is out
    theirs = start.clone().addmm_(x, w.t()) if accumulate else F.linear(x, w)
    ours_err = (out.float() - exact).norm() / exact.norm()
    torch_err = (theirs.float() - exact).norm() / exact.norm()
    print(f"rel error: ours {ours_err:.3e}, torch {torch_err:.3e}")
    assert torch.isfinite(out).all()
    assert ours_err <= 2 * torch_err + 1e-6


@pytest.mark.gpu
def test_auto_runs_half_precision_on_the_extension_and_float32_on_torch():
    _cuda_ready()
    assert ops.resolve("matmul", "cuda") == "cuda"
    x, w = torch.randn(64, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    calls = []
    real = _ext._C.matmul_nt
    _ext._C.matmul_nt = lambda *a: calls.append(a[0].dtype) or real(*a)
    try:
        ops.matmul(x, w)
        ops.matmul(x.half(), w.half())
    finally:
        _ext._C.matmul_nt = real
    assert calls == [torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("make, message", [
    (lambda x, w: (x, w, torch.empty(64, 16, device="cuda", dtype=torch.float16).t()), "out must be contiguous"),
    (lambda x, w: (x.float(), w.float(), None), "x must be float16 or bfloat16"),
], ids=["strided_out", "float32"])
def test_extension_rejects_what_it_cannot_compute(make, message):
    _cuda_ready()
    x, w = torch.randn(16, 32, device="cuda").half(), torch.randn(64, 32, device="cuda").half()
    x, w, out = make(x, w)
    with pytest.raises(ValueError, match=message):
        _ext.matmul(x, w, out=out)


@pytest.mark.gpu
def test_captured_graph_has_no_memset_where_torch_has_one():
    """At 65536 x 320 x 320 (SD1.5's 64x64 level at CFG batch 16) torch's cuBLAS GEMM clears its workspace
    first on an H200; fastdiff's must not. Counted over one replay of each captured graph."""
    from torch.profiler import ProfilerActivity, profile

    from cuda_graphs import capture

    _cuda_ready()
    x = torch.randn(65536, 320, device="cuda").half()
    w = torch.randn(320, 320, device="cuda").half()

    def memsets(fn):
        graph, _ = capture(fn)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        return sum("memset" in e.name.lower() for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)

    theirs = memsets(lambda: F.linear(x, w))
    ours = memsets(lambda: _ext.matmul(x, w))
    print(f"memsets per replay: torch {theirs}, fastdiff {ours}")
    assert ours == 0
