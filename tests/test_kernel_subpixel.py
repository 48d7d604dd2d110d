"""Nearest 2x upsampling + conv3x3 as a 2x2 convolution and a phase shuffle (fastdiff.kernels.subpixel).

CPU: the algebra in float64 (the 2x2 form equals the direct one on odd, 1x1 and non-square images); the Triton
shuffle under TRITON_INTERPRET=1 against subpixel_shuffle_ref (channels that fill no whole tile, with and without
the bias, every dtype); invalid inputs. GPU (`-m gpu`): every dtype on the SD1.5 UNet's and VAE's upsamplers
against a float64 reference next to the direct form's own error, and CUDA-graph capture. The engine's upsampler
that uses them (`FastUpsample`) is tested in test_engine_unet.py.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels.subpixel import subpixel_shuffle, subpixel_shuffle_ref, subpixel_weight
from cuda_graphs import capture

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _direct(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, 1, 1)


def _subpixel(x, weight, bias, shuffle=subpixel_shuffle_ref):
    return shuffle(F.conv2d(x, subpixel_weight(weight), None, 1, 1), bias)


@pytest.mark.parametrize("b, cin, cout, h, w", [(2, 8, 9, 5, 7), (1, 3, 4, 1, 1), (2, 16, 16, 4, 6), (1, 5, 2, 3, 1)])
def test_two_by_two_form_equals_upsample_then_conv3x3(b, cin, cout, h, w):
    torch.manual_seed(0)
    x = _cl(torch.randn(b, cin, h, w, dtype=torch.float64))
    weight = _cl(torch.randn(cout, cin, 3, 3, dtype=torch.float64))
    bias = torch.randn(cout, dtype=torch.float64)
    expected, out = _direct(x, weight, bias), _subpixel(x, weight, bias)
    err = (out - expected).abs().max().item()
    print(f"{b}x{cin}x{h}x{w} -> {cout}: max abs err {err:.2e}")
    assert out.shape == (b, cout, 2 * h, 2 * w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert err <= 1e-12


def test_subpixel_weight_shape_and_layout():
    weight = _cl(torch.randn(6, 5, 3, 3))
    w4 = subpixel_weight(weight)
    assert w4.shape == (24, 5, 2, 2) and w4.dtype == weight.dtype
    assert w4.is_contiguous(memory_format=torch.channels_last)
    assert subpixel_weight(weight.contiguous()).is_contiguous()
    with pytest.raises(ValueError, match=r"\(Cout, Cin, 3, 3\).*\(6, 5, 1, 1\)"):
        subpixel_weight(torch.randn(6, 5, 1, 1))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_shuffle_matches_ref(dtype, with_bias):
    # 4 * 70 channels: two channel tiles of 64, the second part-filled; 2W = 14 columns: one part-filled tile
    torch.manual_seed(1)
    y = _cl(torch.randn(2, 4 * 70, 6, 8).to(dtype))
    bias = torch.randn(70).to(dtype) if with_bias else None
    out = subpixel_shuffle(y, bias)
    ref = subpixel_shuffle_ref(y.double(), None if bias is None else bias.double())
    assert out.shape == (2, 70, 10, 14) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    if not with_bias:  # a pure move
        assert torch.equal(out, ref.to(dtype))
    else:  # the bias added in float32, rounded once (the interpreter casts bfloat16 by truncation: one ulp)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), ref, rtol=2 * eps, atol=2 * eps)


def test_shuffle_rejects_bad_inputs():
    y = _cl(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, 4 \* C, H \+ 1, W \+ 1\).*\(1, 6, 3, 3\)"):
        subpixel_shuffle(_cl(torch.randn(1, 6, 3, 3)))
    with pytest.raises(ValueError, match=r"H \+ 1.*\(1, 8, 1, 3\)"):
        subpixel_shuffle(_cl(torch.randn(1, 8, 1, 3)))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(2,\)"):
        subpixel_shuffle(y, torch.randn(3))
    with pytest.raises(ValueError, match="channels_last"):
        subpixel_shuffle(y.contiguous())
    with pytest.raises(ValueError, match="bias has dtype torch.float16"):
        subpixel_shuffle(y, torch.randn(2).half())
    with pytest.raises(ValueError, match="dtype torch.int32"):
        subpixel_shuffle(y.int())


def test_ops_seam_runs_the_triton_shuffle():
    y, bias = _cl(torch.randn(1, 8, 3, 4)), torch.randn(2)
    with ops.use_backend("triton", op="subpixel_shuffle"):
        out = ops.subpixel_shuffle(y, bias)
    torch.testing.assert_close(out, subpixel_shuffle_ref(y, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, c, h", [(2, 1280, 8), (2, 1280, 16), (2, 640, 32), (8, 640, 32), (1, 512, 64),
                                     (1, 256, 256)])
def test_gpu_subpixel_error_at_most_twice_the_direct_forms(b, c, h, dtype):
    torch.manual_seed(3)
    x = _cl(torch.randn(b, c, h, h, device="cuda"))
    weight = _cl(torch.randn(c, c, 3, 3, device="cuda") * (c * 9) ** -0.5)
    bias = torch.randn(c, device="cuda")
    exact = _direct(x.double(), weight.double(), bias.double())
    args = (x.to(dtype), weight.to(dtype), bias.to(dtype))
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ours, theirs = _subpixel(*args, shuffle=subpixel_shuffle), _direct(*args)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    err, err_torch = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    print(f"{b}x{c}x{h}x{h} {dtype}: max {err.max():.2e} (direct {err_torch.max():.2e}), mean {err.mean():.2e} "
          f"(direct {err_torch.mean():.2e})")
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert err.max() <= 2 * err_torch.max() + 1e-6 and err.mean() <= 2 * err_torch.mean() + 1e-7


@pytest.mark.gpu
def test_gpu_shuffle_in_a_cuda_graph():
    y = _cl(torch.randn(2, 4 * 640, 33, 33, device="cuda", dtype=torch.float16))
    bias = torch.randn(640, device="cuda", dtype=torch.float16)
    expected = subpixel_shuffle(y, bias)  # compiles outside the capture
    graph, out = capture(lambda: subpixel_shuffle(y, bias), warm=False)
    y.copy_(torch.randn_like(y))
    graph.replay()
    assert torch.equal(out, subpixel_shuffle(y, bias)) and not torch.equal(out, expected)
