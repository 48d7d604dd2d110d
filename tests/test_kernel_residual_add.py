"""The Triton residual + bias add (x + y + bias[None, :, None, ...] in one pass) against residual_add_ref.

CPU: under TRITON_INTERPRET=1 on small odd shapes (2x96x7x9: samples of 6048 elements end in a part-filled
block; 3-D 2x40x13; 5-D; a 2-D (N, C)), contiguous and channels_last, with and without the bias, every
dtype; an x of fewer samples repeated over y's; blocks far smaller than a sample; the single rounding; invalid
inputs; the ops seam; tracing.
GPU (`-m gpu`): every dtype on SD1.5's ResNet shapes in both layouts, CUDA-graph capture, inductor
launching the kernel itself.

float32 must equal the eager twin exactly: both compute (y + bias) + x in float32. float16 and bfloat16
are judged against the exact sum (float64) next to eager torch's error at that precision, which rounds twice.
"""
import importlib

import pytest
import torch

from fastdiff import ops
from fastdiff.kernels import _triton
from fastdiff.kernels.residual_add import residual_add, residual_add_ref
from triton_trace import assert_traces
from cuda_graphs import capture

ra_module = importlib.import_module("fastdiff.kernels.residual_add")  # the package re-exports the functions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, layout): channels_last means channels innermost, whatever the number of spatial dims.
ODD_CASES = [((2, 96, 7, 9), "contiguous"), ((2, 96, 7, 9), "channels_last"), ((2, 40, 13), "contiguous"),
             ((2, 40, 13), "channels_last"), ((2, 6, 3, 4, 5), "contiguous"), ((2, 6, 3, 4, 5), "channels_last"),
             ((3, 5), "contiguous")]
# The interpreter casts float32 -> bfloat16 by truncation (triton 3.9's interpreter.cast_impl passes no
# rounding mode), where the GPU rounds to nearest: on the CPU a bfloat16 result is only held to one ulp.
INTERPRETED_BF16_RTOL = 2.0**-7


def _case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + "-" + layout


def _channels_last(t):
    """t with the same values, stored with channels innermost (the permutation works for any dim >= 3)."""
    perm = (0, *range(2, t.dim()), 1)
    inverse = sorted(range(t.dim()), key=perm.__getitem__)
    return t.permute(perm).contiguous().permute(inverse)


def _inputs(shape, layout, dtype, bias=True, device="cpu"):
    x, y = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    if layout == "channels_last":
        x, y = _channels_last(x), _channels_last(y)
    b = torch.randn(shape[1], device=device).to(dtype) if bias else None
    return x, y, b


def _errors(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


def _check(name, x, y, b, xb=None):
    """Kernel against the exact sum and against eager torch: layout kept, float32 equal to eager, lower
    precisions at most twice eager's error (interpreted bfloat16: one ulp). xb: x's bias, or None."""
    out = residual_add(x, y, b, x_bias=xb)
    torch_out = residual_add_ref(x, y, b, x_bias=xb)
    double = lambda t: None if t is None else t.double()
    exact = residual_add_ref(x.double(), y.double(), double(b), x_bias=double(xb))
    assert out.shape == y.shape and out.dtype == x.dtype and out.stride() == torch_out.stride() == y.stride()
    err = _errors(f"fastdiff {name}", out, exact)
    err_torch = _errors(f"torch    {name}", torch_out, exact)
    if x.dtype == torch.float32:
        rel = (out.double() - exact).norm() / exact.norm()
        print(f"fastdiff {name}: relative error {rel.item():.3e}")
        assert torch.equal(out, torch_out) and rel <= 1e-6
    elif x.dtype == torch.bfloat16 and x.device.type == "cpu":
        torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=INTERPRETED_BF16_RTOL)
    else:
        assert err.max() <= 2 * err_torch.max()
        assert err.mean() <= 2 * err_torch.mean()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", ["bias", "no-bias", "both-biases"])
@pytest.mark.parametrize("case", ODD_CASES, ids=_case_id)
def test_residual_add_error_at_most_twice_torch_error(case, bias, dtype):
    shape, layout = case
    x, y, b = _inputs(shape, layout, dtype, bias != "no-bias")
    xb = torch.randn(shape[1]).to(dtype) if bias == "both-biases" else None
    _check(f"{dtype} {_case_id(case)} {bias}", x, y, b, xb)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_samples", [1, 2])
@pytest.mark.parametrize("case", ODD_CASES[:2], ids=_case_id)
def test_residual_add_repeats_an_x_of_fewer_samples_over_y(case, x_samples, dtype):
    """A shared sample under classifier-free guidance: x's samples repeat over y's 4 ([x; x; ...])."""
    shape, layout = case
    x, _, b = _inputs((x_samples, *shape[1:]), layout, dtype)
    y = _inputs((4, *shape[1:]), layout, dtype)[1]
    _check(f"{dtype} x of {x_samples} over y of 4 {layout}", x, y, b, torch.randn(shape[1]).to(dtype))
    repeated = torch.cat([x] * (4 // x_samples))
    assert torch.equal(residual_add_ref(x, y, b), residual_add_ref(repeated, y, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_add_blocks_smaller_than_a_sample(monkeypatch, layout):
    # 3 samples of 520 elements in blocks of 64: each sample ends in a part-filled block, and channels (of
    # 13 elements, or interleaved) straddle the blocks.
    monkeypatch.setattr(ra_module, "BLOCK", 64)
    _check(f"BLOCK 64 {layout}", *_inputs((3, 40, 13), layout, torch.float32))


def test_residual_add_rounds_once():
    """float16 near 1000 has an ulp of 0.5: 1000 + 0.25 (bias) + 0.25 (x) is 1000.5 exactly, but eager torch
    rounds each tie of 1000.25 down to 1000."""
    y = torch.full((1, 2, 2, 2), 1000.0, dtype=torch.float16)
    x = torch.full_like(y, 0.25)
    b = torch.full((2,), 0.25, dtype=torch.float16)
    out = residual_add(x, y, b)
    print("fastdiff", out.flatten()[0].item(), "torch", residual_add_ref(x, y, b).flatten()[0].item())
    assert torch.equal(out, torch.full_like(y, 1000.5))
    assert torch.equal(residual_add_ref(x, y, b), y)


def _check_bias_alone(name, y, b):
    """x None: y + bias, one rounding like eager torch's y + bias, so equal to it (interpreted bfloat16: one ulp)."""
    out, torch_out = residual_add(None, y, b), residual_add_ref(None, y, b)
    exact = y.double() + b.double().view(1, -1, *([1] * (y.dim() - 2)))
    _errors(f"bias alone {name}", out, exact)
    assert out.shape == y.shape and out.dtype == y.dtype and out.stride() == torch_out.stride() == y.stride()
    if y.dtype == torch.bfloat16 and y.device.type == "cpu":
        torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=INTERPRETED_BF16_RTOL)
    else:
        assert torch.equal(out, torch_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ODD_CASES, ids=_case_id)
def test_bias_alone_without_a_residual(case, dtype):
    _, y, b = _inputs(*case, dtype)
    _check_bias_alone(f"{_case_id(case)} {dtype}", y, b)
    out = torch.empty_like(y)
    assert residual_add(None, y, b, out=out) is out and torch.equal(out, residual_add(None, y, b))


@pytest.mark.parametrize("into", ["x", "y", "new"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_add_writes_into_out_even_when_it_is_an_input(layout, into):
    x, y, b = _inputs((2, 96, 7, 9), layout, torch.float32)
    expected = residual_add_ref(x, y, b)
    out = {"x": x, "y": y, "new": torch.empty_like(x)}[into]
    got = residual_add(x, y, b, out=out)
    assert got is out
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    ref_out = {"x": x, "y": y, "new": torch.empty_like(x)}[into].clone()
    assert residual_add_ref(*(t.clone() for t in (x, y)), b, out=ref_out) is ref_out


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3), (2, 4, 0, 3)], ids=lambda s: "x".join(map(str, s)))
def test_residual_add_returns_empty_output_for_empty_input(shape):
    x = torch.randn(shape)
    out = residual_add(x, x.clone(), torch.randn(shape[1]))
    assert out.shape == shape


def _strided(shape):
    return torch.randn(shape).transpose(-1, -2)


_X = torch.randn(2, 4, 3, 3)
_META = torch.empty(2, 4, 3, 3, device="meta")


@pytest.mark.parametrize("call, message", [
    (lambda: residual_add(torch.randn(8), torch.randn(8)), r"x must be \(N, C, \*spatial\), got shape \(8,\)"),
    (lambda: residual_add(_X, torch.randn(2, 4, 3)), r"y has shape \(2, 4, 3\), expected x's shape \(2, 4, 3, 3\)"),
    (lambda: residual_add(_X, torch.randn(3, 4, 3, 3)),
     r"y has shape \(3, 4, 3, 3\), expected x's shape \(2, 4, 3, 3\) or x's with a multiple of its 2 samples"),
    (lambda: residual_add(torch.randn(4, 4, 3, 3), _X), r"y has shape \(2, 4, 3, 3\), expected x's shape \(4,"),
    (lambda: residual_add(_X, _X, torch.randn(5)), r"bias has shape \(5,\), expected \(4,\)"),
    (lambda: residual_add(None, _X), r"without x \(no residual\) the pass adds y's bias alone: give bias"),
    (lambda: residual_add(None, _X, torch.randn(4), x_bias=torch.randn(4)), "give bias, and no x_bias"),
    (lambda: residual_add(None, _X, torch.randn(3)), r"bias has shape \(3,\), expected \(4,\)"),
    (lambda: residual_add(None, torch.randn(8), torch.randn(8)), r"y must be \(N, C, \*spatial\), got shape"),
    (lambda: residual_add(_X, _X, torch.randn(4, 1)), r"bias has shape \(4, 1\), expected \(4,\)"),
    (lambda: residual_add(_X, _X, x_bias=torch.randn(3)), r"x_bias has shape \(3,\), expected \(4,\)"),
    (lambda: residual_add(_X, _X, x_bias=torch.randn(4).half()), "x_bias has dtype torch.float16, expected x's"),
    (lambda: residual_add(_X.double(), _X.double()), "x has dtype torch.float64, expected one of"),
    (lambda: residual_add(_X.int(), _X.int()), "x has dtype torch.int32, expected one of"),
    (lambda: residual_add(_X, _X.half()), "y has dtype torch.float16, expected x's dtype torch.float32"),
    (lambda: residual_add(_X, _X, torch.randn(4).half()), "bias has dtype torch.float16, expected x's dtype"),
    (lambda: residual_add(_X, _META), "y is on meta, expected x's device cpu"),
    (lambda: residual_add(_X, _X, torch.empty(4, device="meta")), "bias is on meta, expected x's device cpu"),
    (lambda: residual_add(_X, _channels_last(_X)),
     r"y must have x's layout \(contiguous\), got shape \(2, 4, 3, 3\) with strides \(36, 1, 12, 4\)"),
    (lambda: residual_add(_channels_last(_X), _X.clone()),
     r"y must have x's layout \(channels_last\), got shape \(2, 4, 3, 3\) with strides \(36, 9, 3, 1\)"),
    (lambda: residual_add(_strided((2, 4, 3, 5)), _strided((2, 4, 3, 5))),
     r"x must be contiguous or channels_last, got shape \(2, 4, 5, 3\) with strides \(60, 15, 1, 5\)"),
    (lambda: residual_add(_X, _X, out=_channels_last(_X.clone())),
     r"out must match y \(shape \(2, 4, 3, 3\), strides \(36, 9, 3, 1\), torch.float32\), got shape"),
    (lambda: residual_add(_X, _X, out=_X.half()), r"out must match y .*, got shape \(2, 4, 3, 3\), strides"),
    (lambda: residual_add(_X[:1], _X, out=_X[:1].clone()), r"out must match y \(shape \(2, 4, 3, 3\)"),
    (lambda: residual_add(*(torch.empty(1, 2**15, 2**15 + 1, device="meta") for _ in range(2))),
     "x has 1073774592 elements per sample, over the kernel's limit 1073741824"),
])
def test_residual_add_rejects_invalid_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_residual_add_ref_rejects_mismatched_shapes():
    # Broadcasting would otherwise add a (3,) y to every row without complaint.
    with pytest.raises(ValueError, match=r"y has shape \(3,\), expected x's shape \(2, 4, 3, 3\)"):
        residual_add_ref(_X, torch.randn(3))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        residual_add_ref(_X, _X, torch.randn(3))


def test_residual_add_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        residual_add(_X, _X)


def test_ops_seam_auto_picks_the_reference_on_cpu():
    assert ops.resolve("residual_add", "cpu") == "reference"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_ops_seam_backends_agree(bias):
    x, y, b = _inputs((2, 96, 7, 9), "channels_last", torch.float32, bias)
    outputs = {}
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, op="residual_add"):
            outputs[backend] = ops.residual_add(x, y, b)
    _errors("triton vs reference", outputs["triton"], outputs["reference"])
    assert torch.equal(outputs["triton"], outputs["reference"])
    assert outputs["triton"].stride() == x.stride()


def test_residual_add_traces_without_graph_breaks():
    x, y, b = _inputs((2, 96, 7, 9), "channels_last", torch.float32)

    def block(x, y, b):
        return residual_add(x, y * 2.0, b) + 1.0

    got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, y, b)
    expected = block(x, y, b)
    _errors("compiled vs eager", got, expected)
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# Compiled kernels only (not the interpreter's): on fake tensors, the op traces to one launch of the kernel
# with distinct buffers, and inductor's analysis of the kernel's IR (which needs a target: an sm_90 one is
# handed to it, no GPU runs) finds exactly the output written. If it could not, inductor would assume every
# input written and copy each one around the call.
_TRACE = """
ra = importlib.import_module("fastdiff.kernels.residual_add")
assert len(get_triton_kernels_for_op("fastdiff::triton_residual_add")) == 1, "residual_add is not a triton_op"
for layout in (torch.contiguous_format, torch.channels_last):
    bias = torch.empty(320, dtype=torch.float16)
    for biases in ((bias, None), (None, None), (bias, bias.clone())):  # y's and x's
        x = torch.empty(2, 320, 16, 16, dtype=torch.float16).to(memory_format=layout)
        graph = make_fx(ra._residual_add_traced, tracing_mode="fake")(x, x.clone(), *biases)
        (output,) = [n for n in graph.graph.nodes if n.op == "output"]
        assert output.args[0].meta["val"].stride() == x.stride(), "the output does not keep x's layout"
        found = kernel_writes(graph)
        print(layout, sum(b is not None for b in biases), "biases, writes", sorted(found))
        assert found == {"Out"}, found
"""


def test_triton_op_traces_to_one_kernel_whose_writes_inductor_reads():
    assert_traces(_TRACE)


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px, CFG batch 2: the ResNet blocks' outputs at each level.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_add_error_on_gpu_at_most_twice_torch_error(shape, layout, dtype):
    _check(f"{dtype} {shape} {layout}", *_inputs(shape, layout, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_add_without_bias_on_gpu(layout):
    _check(f"no bias {layout}", *_inputs(SD_SHAPES[1], layout, torch.float16, bias=False, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_add_with_both_biases_on_gpu(layout, dtype):
    """The ResNet tail with a 1x1 skip conv run without its bias: x_bias joins the same pass."""
    x, y, b = _inputs(SD_SHAPES[1], layout, dtype, device="cuda")
    _check(f"both biases {dtype} {layout}", x, y, b, torch.randn(b.shape[0], device="cuda").to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_add_repeats_a_shared_sample_on_gpu(dtype):
    """The shared sample's transformer output at SD1.5's 64x64 level: x of 1 and of 2 samples over CFG's rows."""
    for x_samples, samples in ((1, 2), (8, 16)):
        x, _, b = _inputs((x_samples, 320, 64, 64), "channels_last", dtype, device="cuda")
        y = _inputs((samples, 320, 64, 64), "channels_last", dtype, device="cuda")[1]
        _check(f"shared sample {x_samples} over {samples} {dtype}", x, y, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 320, 64, 64), (8, 320, 64, 64), (2, 640, 16, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_alone_on_gpu(shape, dtype):
    """SD1.5's conv_in output at batch 1 and 8, and a downsampler's at CFG batch 2, channels_last."""
    _, y, b = _inputs(shape, "channels_last", dtype, device="cuda")
    _check_bias_alone(f"{shape} {dtype}", y, b)


@pytest.mark.gpu
def test_ops_seam_auto_picks_triton_on_cuda():
    assert ops.resolve("residual_add", "cuda") == "triton"


@pytest.mark.gpu
def test_residual_add_survives_cuda_graph_capture():
    x, y, b = _inputs(SD_SHAPES[0], "channels_last", torch.float16, device="cuda")
    graph, out = capture(lambda: residual_add(x, y, b))
    x.copy_(torch.randn_like(x))
    y.copy_(torch.randn_like(y))
    graph.replay()
    exact = residual_add_ref(x.double(), y.double(), b.double())
    _errors("graph replay", out, exact)
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inductor_launches_the_kernel_itself_and_matches_eager(caplog, layout):
    """fullgraph compile of a ResNet block's tail at SD1.5's 64x64 level: inductor's code holds no opaque
    call of the op, it could read what the kernel writes (otherwise it assumes every input is written and
    copies them), the output keeps x's layout, and it equals eager."""
    from torch._inductor.utils import run_and_get_code

    _triton.prepare_compile()  # traceable triton_ops, not the opaque ones registered on import

    def block(x, y, b):
        return residual_add(x, y * 0.5, b) * 2.0

    x, y, b = _inputs(SD_SHAPES[0], layout, torch.float16, device="cuda")
    expected = block(x, y, b)
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="torch._higher_order_ops.triton_kernel_wrap"):
        got, code = run_and_get_code(torch.compile(block, fullgraph=True), x, y, b)
    code = "\n".join(code)
    unread = [rec.getMessage() for rec in caplog.records if "assuming every input is mutated" in rec.getMessage()]
    opaque = "fastdiff.triton_residual_add" in code
    print(f"kernels inductor could not analyse: {len(unread)}; opaque op call left in its code: {opaque}")
    _errors("compiled vs eager", got, expected)
    assert not opaque and not unread
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
