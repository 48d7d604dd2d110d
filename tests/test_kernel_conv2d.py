"""The split-K implicit-GEMM Triton convolution (fastdiff.kernels.conv2d) against conv2d_ref (F.conv2d).

CPU: under TRITON_INTERPRET=1 on small odd shapes (x 2x24x5x7 with a 17x24x3x3 weight: 70 output pixels, 17
output channels and 24 input channels, none a multiple of a block), stride 2, a 1x1 and a 2x3 kernel,
without padding; blocks shrunk so that the output spans several tiles and Cin several K blocks (the last one
part-filled, or not); forced split counts, even and uneven; the split policy; every dtype; one launch
without splits, two with; determinism; invalid inputs; the ops seam; tracing.
GPU (`-m gpu`): every dtype on SD1.5's 8x8-level shapes (and the stride-2 one from 16x16, batch 8, a 1x1),
forced split counts, CUDA-graph capture, inductor launching the kernels itself.

float32 (products in float32, no tf32) must agree with the exact convolution (float64) and, on the CPU, with
the float32 reference to 1e-5 relative (on CUDA, cuDNN's float32 rounds to tf32 by default: there the kernel
must simply not be worse). float16 and bfloat16 are judged against the exact convolution next to torch's own
error at that precision.
"""
import importlib

import pytest
import torch

from fastdiff import ops
from fastdiff.kernels import _triton
from fastdiff.kernels.conv2d import choose_splits, conv2d, conv2d_ref, k_blocks, prefers_split_k
from triton_trace import assert_traces
from cuda_graphs import capture

cv_module = importlib.import_module("fastdiff.kernels.conv2d")  # the package re-exports the functions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (name, x's shape, weight's shape, stride, padding)
ODD_CASES = [
    ("3x3-pad1", (2, 24, 5, 7), (17, 24, 3, 3), 1, 1),
    ("3x3-stride2", (2, 24, 5, 7), (17, 24, 3, 3), 2, 1),
    ("1x1", (2, 24, 5, 7), (17, 24, 1, 1), 1, 0),
    ("3x3-pad0-stride2", (1, 20, 6, 9), (9, 20, 3, 3), 2, 0),
    ("2x3-pad1", (2, 16, 4, 5), (5, 16, 2, 3), 1, 1),
]
# The interpreter casts float32 -> bfloat16 by truncation (triton 3.9's interpreter.cast_impl passes no
# rounding mode), where the GPU rounds to nearest: on the CPU a bfloat16 result is only held to one ulp.
INTERPRETED_BF16_RTOL = 2.0**-7
FP32_RTOL = 1e-5  # relative (norm) error against the float32 reference


def _inputs(x_shape, w_shape, dtype, device="cpu"):
    """x and weight, channels_last, with weights scaled like a trained conv's (var ~ 1 / fan_in)."""
    x = torch.randn(x_shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = (torch.randn(w_shape, device=device) / fan_in**0.5).to(dtype).to(memory_format=torch.channels_last)
    return x, w


def _errors(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


def _check(name, x, w, stride, padding, splits=None):
    """Kernel against the exact convolution and against torch's: channels_last output of the right shape,
    float32 within FP32_RTOL of the float32 reference, lower precisions at most twice torch's error
    (interpreted bfloat16: one ulp). Returns the kernel's output."""
    out = conv2d(x, w, stride, padding, splits)
    torch_out = conv2d_ref(x, w, stride, padding)
    exact = conv2d_ref(x.double(), w.double(), stride, padding)
    assert out.shape == torch_out.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = _errors(f"fastdiff {name}", out, exact)
    err_torch = _errors(f"torch    {name}", torch_out, exact)
    if x.dtype == torch.float32:
        rel = (out.double() - torch_out.double()).norm() / torch_out.double().norm()
        rel_exact = (out.double() - exact).norm() / exact.norm()
        print(f"fastdiff {name}: relative error {rel.item():.3e} vs torch, {rel_exact.item():.3e} vs exact")
        assert rel_exact <= FP32_RTOL
        if x.device.type == "cpu":
            assert rel <= FP32_RTOL
        else:  # cuDNN rounds float32 convolutions' inputs to tf32 by default (torch.backends.cudnn.allow_tf32)
            assert err.max() <= 2 * err_torch.max() and err.mean() <= 2 * err_torch.mean()
    elif x.dtype == torch.bfloat16 and x.device.type == "cpu":
        torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=INTERPRETED_BF16_RTOL)
    else:
        assert err.max() <= 2 * err_torch.max()
        assert err.mean() <= 2 * err_torch.mean()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, x_shape, w_shape, stride, padding", ODD_CASES, ids=[c[0] for c in ODD_CASES])
def test_conv2d_error_at_most_twice_torch_error(name, x_shape, w_shape, stride, padding, dtype):
    _check(f"{dtype} {name}", *_inputs(x_shape, w_shape, dtype), stride, padding)


@pytest.mark.parametrize("splits", [1, 2, 3, 4, 9])
def test_conv2d_forced_splits(splits):
    # 9 K blocks (one per tap, Cin 24 < BLOCK_K): 2 and 4 splits deal them unevenly (4 + 5; 2 + 2 + 2 + 3).
    x, w = _inputs((2, 24, 5, 7), (17, 24, 3, 3), torch.float32)
    assert k_blocks(w) == 9
    _check(f"splits {splits}", x, w, 1, 1, splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cin, splits", [(40, 1), (40, 5), (32, 7)], ids=["cin40-splits1", "cin40-splits5",
                                                                          "cin32-splits7"])
def test_conv2d_channel_blocks_and_tiles(monkeypatch, cin, splits, dtype):
    # 16-wide blocks: Cin 40 is 3 K blocks per tap, the last one half masked; Cin 32 two full ones (EVEN_K).
    # 70 output pixels and 17 channels are 5 x 2 output tiles, each part-filled at the edge. 5 and 7 splits
    # of 27 and 18 K blocks start and end inside taps.
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        monkeypatch.setattr(cv_module, name, 16)
    x, w = _inputs((2, cin, 5, 7), (17, cin, 3, 3), dtype)
    assert k_blocks(w) == 9 * (cin // 16 + (cin % 16 > 0))
    _check(f"{dtype} Cin {cin} splits {splits}", x, w, 1, 1, splits)


def test_conv2d_default_splits_follow_the_policy():
    # The CPU counts as one SM: PROGRAMS_PER_SM programs, here all splits of one output tile.
    x, w = _inputs((2, 64, 4, 4), (32, 64, 3, 3), torch.float32)
    assert choose_splits(1, k_blocks(w), _triton.sm_count(x.device)) == cv_module.PROGRAMS_PER_SM
    _check("default splits", x, w, 1, 1)


def test_choose_splits():
    # SD1.5 8x8 on an H200 (132 SMs): 20 output tiles, 180 K blocks (Cin 1280) or 360 (2560).
    assert choose_splits(20, 180, 132) == 13
    assert choose_splits(20, 360, 132) == 13
    assert 20 * choose_splits(20, 180, 132) <= cv_module.PROGRAMS_PER_SM * 132
    assert choose_splits(20, 20, 132) == 20 // cv_module.MIN_BLOCKS_PER_SPLIT  # a few K blocks per split at least
    assert choose_splits(20, 3, 132) == 1
    assert choose_splits(400, 180, 132) == 1  # output tiles alone fill the GPU


def test_conv2d_launches_the_sum_kernel_only_with_splits(monkeypatch):
    launches = []

    class Recorder:
        def __init__(self, launcher):
            self.launcher = launcher

        def __getitem__(self, grid):
            launches.append(grid)
            return self.launcher[grid]

    monkeypatch.setattr(cv_module, "_conv2d_sum_launcher", Recorder(cv_module._conv2d_sum_launcher))
    x, w = _inputs((2, 24, 5, 7), (17, 24, 3, 3), torch.float32)
    conv2d(x, w, 1, 1, splits=1)
    assert launches == []
    conv2d(x, w, 1, 1, splits=3)
    assert launches == [(_triton.cdiv(2 * 5 * 7 * 17, cv_module.SUM_BLOCK),)]


def test_conv2d_is_deterministic():
    x, w = _inputs((2, 24, 5, 7), (17, 24, 3, 3), torch.float16)
    assert torch.equal(conv2d(x, w, 1, 1, splits=4), conv2d(x, w, 1, 1, splits=4))


def test_conv2d_rounds_once_to_the_dtype():
    # 1 + 2**-11 + 2**-11 is 1 + 2**-10 exactly, a float16; adding in float16 would round 1 + 2**-11 (a tie)
    # back to 1 after each product.
    x = torch.tensor([1.0, 2.0**-11, 2.0**-11], dtype=torch.float16).view(1, 3, 1, 1)
    w = torch.ones(1, 3, 1, 1, dtype=torch.float16)
    out = conv2d(x.to(memory_format=torch.channels_last), w, splits=1)
    assert out.item() == 1 + 2.0**-10


def test_conv2d_returns_empty_output_for_an_empty_batch():
    x, w = _inputs((0, 24, 5, 7), (17, 24, 3, 3), torch.float32)
    out = conv2d(x, w, 1, 1)
    assert out.shape == conv2d_ref(x, w, 1, 1).shape == (0, 17, 5, 7)


def test_prefers_split_k_on_sd15_shapes():
    def prefers(x_shape, w_shape, stride=1, padding=1, dtype=torch.float16, layout=torch.channels_last):
        x = torch.empty(x_shape, device="meta", dtype=dtype).to(memory_format=layout)
        return prefers_split_k(x, torch.empty(w_shape, device="meta", dtype=dtype).to(memory_format=layout), stride,
                               padding)

    assert prefers((2, 1280, 8, 8), (1280, 1280, 3, 3))  # M = 128, K = 11520
    assert not prefers((2, 2560, 8, 8), (1280, 2560, 3, 3))  # K = 23040: cuDNN streams as fast
    assert prefers((2, 1280, 16, 16), (1280, 1280, 3, 3), stride=2)  # the downsampler into 8x8
    assert not prefers((2, 2560, 8, 8), (1280, 2560, 1, 1), padding=0)  # K = 2560: short
    assert not prefers((2, 1280, 16, 16), (1280, 1280, 3, 3))  # M = 512
    assert not prefers((8, 1280, 8, 8), (1280, 1280, 3, 3))  # M = 512: CFG batch 8
    assert not prefers((2, 1280, 8, 8), (1280, 1280, 1, 1), padding=0)  # K = 1280
    assert not prefers((2, 1280, 8, 8), (1280, 1280, 3, 3), layout=torch.contiguous_format)  # the kernel refuses
    assert not prefers((2, 1280, 8, 8), (1280, 1280, 3, 3), dtype=torch.float64)
    assert not prefers((2, 1280, 8, 8), (1280, 1280, 3, 3), stride=0)
    assert not prefers((2, 1280, 2, 2), (1280, 1280, 3, 3), padding=0)  # an empty output
    assert prefers((2, 320, 64, 64), (4, 320, 3, 3))  # the UNet's conv_out at CFG batch 2: a narrow output
    assert not prefers((16, 320, 64, 64), (4, 320, 3, 3))  # at CFG batch 16: as fast on cuDNN
    assert not prefers((2, 4, 64, 64), (320, 4, 3, 3))  # conv_in: wide output, K = 36
    assert not prefers((2, 8, 64, 64), (4, 8, 3, 3))  # narrow, but K = 72: short


_X = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
_W = torch.randn(4, 8, 3, 3).to(memory_format=torch.channels_last)
_META_W = torch.empty(4, 8, 3, 3, device="meta").to(memory_format=torch.channels_last)


@pytest.mark.parametrize("call, message", [
    (lambda: conv2d(torch.randn(8, 5, 5), _W), r"x must be 4-D \(N, Cin, H, W\), got shape \(8, 5, 5\)"),
    (lambda: conv2d(_X, torch.randn(4, 8, 3)), r"weight must be 4-D \(Cout, Cin, KH, KW\), got shape \(4, 8, 3\)"),
    (lambda: conv2d(_X, torch.randn(4, 4, 3, 3)),
     r"weight has 4 input channels \(shape \(4, 4, 3, 3\)\), expected x's 8 \(groups=1 only\)"),
    (lambda: conv2d(_X, torch.randn(0, 8, 3, 3)),
     r"weight must have at least one output channel, input channel and tap, got shape \(0, 8, 3, 3\)"),
    (lambda: conv2d(_X, _W, stride=0), "stride must be a positive int, got 0"),
    (lambda: conv2d(_X, _W, stride=(1, 1)), r"stride must be a positive int, got \(1, 1\)"),
    (lambda: conv2d(_X, _W, padding=-1), "padding must be a non-negative int, got -1"),
    (lambda: conv2d(_X, _W, padding=1.0), "padding must be a non-negative int, got 1.0"),
    (lambda: conv2d(_X, torch.randn(4, 8, 7, 3)),
     "output size -1x3 is empty: input 5x5, kernel 7x3, stride 1, padding 0"),
    (lambda: conv2d(_X.double(), _W.double()), "x has dtype torch.float64, expected one of"),
    (lambda: conv2d(_X, _W.half()), "weight has dtype torch.float16, expected x's dtype torch.float32"),
    (lambda: conv2d(_X, _META_W), "weight is on meta, expected x's device cpu"),
    (lambda: conv2d(_X.contiguous(), _W),
     r"x must be channels_last \(dense, channels innermost\), got shape \(2, 8, 5, 5\) with strides "
     r"\(200, 25, 5, 1\)"),
    (lambda: conv2d(_X, _W.contiguous()),
     r"weight must be channels_last \(dense, channels innermost\), got shape \(4, 8, 3, 3\) with strides "
     r"\(72, 9, 3, 1\)"),
    (lambda: conv2d(_X[:, :, :, 1:], _W), r"x must be channels_last .*, got shape \(2, 8, 5, 4\)"),
    (lambda: conv2d(_X, _W, splits=0), r"splits must be an int from 1 to 9 \(the K blocks of this weight\), got 0"),
    (lambda: conv2d(_X, _W, splits=10), "splits must be an int from 1 to 9 .*, got 10"),
    (lambda: conv2d(torch.empty(1, 2**15, 2**15 + 1, 1, device="meta").to(memory_format=torch.channels_last),
                    torch.empty(1, 2**15, 1, 1, device="meta")),
     "x has 1073774592 elements per sample, over the kernel's limit 1073741824"),
])
def test_conv2d_rejects_invalid_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_conv2d_ref_rejects_invalid_shapes():
    with pytest.raises(ValueError, match=r"weight has 4 input channels .*, expected x's 8"):
        conv2d_ref(_X, torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match="output size 0x0 is empty"):
        conv2d_ref(_X, torch.randn(4, 8, 6, 6))


def test_conv2d_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        conv2d(_X, _W)


def test_ops_seam_auto_picks_the_reference_on_cpu():
    assert ops.resolve("conv2d", "cpu") == "reference"


def test_ops_seam_forced_triton_runs_the_kernel():
    x, w = _inputs((2, 24, 5, 7), (17, 24, 3, 3), torch.float32)
    outputs = {}
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, op="conv2d"):
            outputs[backend] = ops.conv2d(x, w, 1, 1)
    _errors("triton vs reference", outputs["triton"], outputs["reference"])
    assert torch.equal(outputs["triton"], conv2d(x, w, 1, 1))
    assert outputs["triton"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs["triton"], outputs["reference"], atol=1e-5, rtol=1e-5)


def test_ops_seam_auto_runs_the_kernel_only_where_it_prefers_split_k(monkeypatch):
    """Under auto, where Triton is the backend (CUDA), a convolution outside `prefers_split_k` goes to the
    reference (cuDNN)."""
    monkeypatch.setattr(ops, "resolve", lambda op, device_type: "triton")
    used = []
    monkeypatch.setitem(ops._impl_cache, ("conv2d", "triton"), lambda *a: used.append("triton"))
    monkeypatch.setitem(ops._impl_cache, ("conv2d", "reference"), lambda *a: used.append("reference"))
    small = (torch.empty(2, 1280, 8, 8, device="meta").to(memory_format=torch.channels_last),
             torch.empty(1280, 1280, 3, 3, device="meta").to(memory_format=torch.channels_last))
    large = torch.empty(2, 1280, 16, 16, device="meta").to(memory_format=torch.channels_last), small[1]
    ops.conv2d(*small, 1, 1)
    ops.conv2d(*large, 1, 1)
    ops.conv2d(*large, 2, 1)
    with ops.use_backend("triton", op="conv2d"):  # forced: every shape
        ops.conv2d(*large, 1, 1)
    assert used == ["triton", "reference", "triton", "triton"]


def test_conv2d_traces_without_graph_breaks():
    x, w = _inputs((2, 24, 5, 7), (17, 24, 3, 3), torch.float32)

    def block(x, w):
        return conv2d(x * 2.0, w, 1, 1, 3) + 1.0

    got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w)
    expected = block(x, w)
    _errors("compiled vs eager", got, expected)
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# Compiled kernels only (not the interpreter's): on fake tensors, the op traces to the conv kernel's launch,
# then with splits the sum kernel's, with distinct buffers; inductor's analysis of each kernel's IR (which
# needs a target: an sm_90 one is handed to it, no GPU runs) finds exactly its output written. If it could
# not, inductor would assume every input written and copy each one around the call.
_TRACE = """
cv = importlib.import_module("fastdiff.kernels.conv2d")
assert len(get_triton_kernels_for_op("fastdiff::triton_conv2d")) == 2, "conv2d is not a triton_op"


for dtype in (torch.float16, torch.float32):
    for x_shape, w_shape, stride, padding, splits in (((2, 64, 8, 8), (64, 64, 3, 3), 1, 1, 1),
                                                      ((2, 64, 8, 8), (64, 64, 3, 3), 1, 1, 5),
                                                      ((2, 40, 16, 16), (32, 40, 3, 3), 2, 1, None),
                                                      ((2, 64, 8, 8), (48, 64, 1, 1), 1, 0, 3)):
        x = torch.empty(x_shape, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(w_shape, dtype=dtype).to(memory_format=torch.channels_last)
        graph = make_fx(lambda x, w: cv._conv2d_traced(x, w, stride, padding, splits), tracing_mode="fake")(x, w)
        (output,) = [n for n in graph.graph.nodes if n.op == "output"]
        assert output.args[0].meta["val"].is_contiguous(memory_format=torch.channels_last), "not channels_last"
        found = kernels_writes(graph)
        print(dtype, x_shape, w_shape, "splits", splits, "writes", found)
        assert found in ([{"Out"}], [{"Out"}, {"Out"}]), found
        assert (len(found) == 1) == (splits == 1), found
"""


def test_triton_op_traces_to_the_kernels_whose_writes_inductor_reads():
    assert_traces(_TRACE)


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px: (name, x's shape, weight's shape, stride, padding). The 8x8 level at CFG batch 2: a ResNet
# conv, the up path's conv over the concatenated skip (Cin 2560), the downsampler from 16x16, the shortcut's
# 1x1; the 8x8 level at CFG batch 8 (M = 512).
SD_SHAPES = [
    ("8x8-1280", (2, 1280, 8, 8), (1280, 1280, 3, 3), 1, 1),
    ("8x8-2560", (2, 2560, 8, 8), (1280, 2560, 3, 3), 1, 1),
    ("16x16-stride2", (2, 1280, 16, 16), (1280, 1280, 3, 3), 2, 1),
    ("8x8-1280-batch8", (8, 1280, 8, 8), (1280, 1280, 3, 3), 1, 1),
    ("8x8-1x1-2560", (2, 2560, 8, 8), (1280, 2560, 1, 1), 1, 0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, x_shape, w_shape, stride, padding", SD_SHAPES, ids=[c[0] for c in SD_SHAPES])
def test_conv2d_error_on_gpu_at_most_twice_torch_error(name, x_shape, w_shape, stride, padding, dtype):
    x, w = _inputs(x_shape, w_shape, dtype, device="cuda")
    out = _check(f"{dtype} {name}", x, w, stride, padding)
    assert torch.equal(out, conv2d(x, w, stride, padding))  # the same sum on every call


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 45, 180])
def test_conv2d_forced_splits_on_gpu(splits):
    x, w = _inputs(SD_SHAPES[0][1], SD_SHAPES[0][2], torch.float16, device="cuda")
    assert k_blocks(w) == 180
    _check(f"splits {splits}", x, w, 1, 1, splits)


@pytest.mark.gpu
def test_ops_seam_auto_picks_triton_on_cuda():
    assert ops.resolve("conv2d", "cuda") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1], ids=["split", "one-launch"])
def test_conv2d_survives_cuda_graph_capture(splits):
    x, w = _inputs(SD_SHAPES[0][1], SD_SHAPES[0][2], torch.float16, device="cuda")
    graph, out = capture(lambda: conv2d(x, w, 1, 1, splits))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = conv2d(x, w, 1, 1, splits)
    _errors("graph replay vs eager", out, expected)
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_inductor_launches_the_kernels_itself_and_matches_eager(caplog):
    """fullgraph compile of a conv at SD1.5's 8x8 level: inductor's code holds no opaque call of the op, it
    could read what each kernel writes (otherwise it assumes every input is written and copies them), the
    output is channels_last, and it equals eager."""
    from torch._inductor.utils import run_and_get_code

    _triton.prepare_compile()  # traceable triton_ops, not the opaque ones registered on import

    def block(x, w):
        return conv2d(x * 0.5, w, 1, 1) * 2.0

    x, w = _inputs(SD_SHAPES[0][1], SD_SHAPES[0][2], torch.float16, device="cuda")
    expected = block(x, w)
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="torch._higher_order_ops.triton_kernel_wrap"):
        got, code = run_and_get_code(torch.compile(block, fullgraph=True), x, w)
    code = "\n".join(code)
    unread = [rec.getMessage() for rec in caplog.records if "assuming every input is mutated" in rec.getMessage()]
    opaque = "fastdiff.triton_conv2d" in code
    print(f"kernels inductor could not analyse: {len(unread)}; opaque op call left in its code: {opaque}")
    _errors("compiled vs eager", got, expected)
    assert not opaque and not unread
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
