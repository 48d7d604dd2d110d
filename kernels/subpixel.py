"""Nearest 2x upsampling followed by a 3x3 convolution, as a 2x2 convolution on the small image plus a shuffle.

SD's UNet and VAE upsample by repeating each pixel 2x2 and then convolve with 3x3 weights (padding 1). Every
output pixel of that convolution falls in one of four phases (a, e) = (row % 2, column % 2), and in each phase
its nine taps land on only 2x2 distinct input pixels: output row 2i reads input rows i-1 (tap 0) and i (taps 1
and 2), output row 2i+1 reads rows i (taps 0 and 1) and i+1 (tap 2), and the same for columns. So

    conv3x3(nearest2x(x)) [b, o, 2i + a, 2j + e] = conv2x2(x, W4, padding=1) [b, (2a + e) * C + o, i + a, j + e]

with W4 (4 * Cout, Cin, 2, 2) the 3x3 weights summed per phase (`subpixel_weight`), and `subpixel_shuffle`
moves each phase's pixels to their place (adding the bias). The convolution then does 16 taps per input
pixel instead of 36 (4/9 of the FLOPs, cuDNN runs it as one convolution) and the upsampled image is never
written. Measured on an H200 (fp16, channels_last, CUDA-graph replay, cuDNN; the convolution alone, without
the shuffle): nearest 2x + conv3x3 against the 2x2 convolution, 2x640x32x32 -> 64x64 141.8 vs 74.6 µs,
8x640x32x32 484.6 vs 190.6 µs, 8x1280x16x16 452.9 vs 260.8 µs. The result equals the direct form up to the
rounding of the summed weights and the different summation order (float32 accumulation either way).

The shuffle kernel: y (B, 4C, H + 1, W + 1) -> out (B, C, 2H, 2W), both channels_last. One program per tile
of (BLOCK_S output pixels of one output row) x (BLOCK_C channels); each output pixel's channels are a
contiguous run in y as in out, so loads and stores stay contiguous per pixel.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Output pixels x channels per program: 64 channels divide SD's upsampler widths (1280, 640, 512, 256), and a
# 32 x 64 tile is 2048 elements: 8 per thread of 4 warps (16-byte accesses in float16). Not tuned on a GPU.
BLOCK_S, BLOCK_C, NUM_WARPS = 32, 64, 4

# Row p of the 2x2 kernel of phase a takes these taps of the 3x3 kernel (phase 0: [tap 0], [taps 1, 2];
# phase 1: [taps 0, 1], [tap 2]); the same for columns.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, p, tap)


def subpixel_weight(weight: Tensor) -> Tensor:
    """3x3 conv weights (Cout, Cin, 3, 3) -> the 2x2 weights (4 * Cout, Cin, 2, 2) of all four phases, phase
    (a, e) in rows (2a + e) * Cout ...: see the module docstring. Summed in float32, rounded once to weight's
    dtype (float64 stays float64), in weight's memory format."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (Cout, Cin, 3, 3), got shape {tuple(weight.shape)}")
    compute = torch.promote_types(weight.dtype, torch.float32)
    taps = _PHASE_TAPS.to(weight.device, compute)
    w4 = torch.einsum("apk,eql,oikl->aeoipq", taps, taps, weight.to(compute))  # (2, 2, Cout, Cin, 2, 2)
    w4 = w4.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return w4.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def check_subpixel_shuffle_shapes(y: Tensor, bias: Optional[Tensor]) -> None:
    """Shared validation: y (B, 4C, H + 1, W + 1) with H, W >= 1; bias (C,) or None."""
    if y.dim() != 4 or y.shape[1] % 4 or y.shape[2] < 2 or y.shape[3] < 2:
        raise ValueError(f"y must be (B, 4 * C, H + 1, W + 1) with H, W >= 1 (a 2x2 convolution's output with "
                         f"padding 1), got shape {tuple(y.shape)}")
    if bias is not None and tuple(bias.shape) != (y.shape[1] // 4,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({y.shape[1] // 4},)")


def subpixel_shuffle_ref(y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin: out[b, c, 2i + a, 2j + e] = y[b, (2a + e) * C + c, i + a, j + e] + bias[c].
    y: (B, 4C, H + 1, W + 1) -> (B, C, 2H, 2W) in y's memory format and dtype."""
    check_subpixel_shuffle_shapes(y, bias)
    b, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    out = torch.empty((b, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    phases = y.view(b, 2, 2, c, h1, w1)
    for a in range(2):
        for e in range(2):
            out[:, :, a::2, e::2] = phases[:, a, e, :, a:a + h, e:e + w]
    return out if bias is None else out + bias.view(1, c, 1, 1)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


if triton is not None:

    # H and W unspecialized: one compiled variant for every image size (a cold start compiles it once; the
    # addresses are per pixel, so divisibility of H or W would buy no wider access).
    @triton.jit(do_not_specialize=["H", "W"])
    def _subpixel_shuffle_kernel(
        Y,  # pointer to y, (B, 4C, H + 1, W + 1) channels_last: (B, H + 1, W + 1, 4C) in memory
        Bias,  # pointer to the bias (C,), or None
        Out,  # pointer to the output, (B, C, 2H, 2W) channels_last: (B, 2H, 2W, C) in memory
        H,  # input rows (the upsampled image has 2H)
        W,  # input columns
        C,  # output channels
        BLOCK_S: tl.constexpr,  # output pixels per program (of one output row)
        BLOCK_C: tl.constexpr,  # channels per program
    ):
        row = tl.program_id(0)  # b * 2H + output row
        b = row // (2 * H)
        r = row % (2 * H)
        i, a = r // 2, r % 2
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # output columns
        ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        j, e = s // 2, s % 2
        mask = (s < 2 * W)[:, None] & (ch < C)[None, :]
        src_pixel = (b * (H + 1) + i + a).to(tl.int64) * (W + 1) + j + e  # (BLOCK_S,)
        src = src_pixel[:, None] * (4 * C) + ((2 * a + e) * C)[:, None] + ch[None, :]
        out = tl.load(Y + src, mask=mask).to(tl.float32)
        if Bias is not None:
            out += tl.load(Bias + ch, mask=ch < C).to(tl.float32)[None, :]
        dst = (row.to(tl.int64) * (2 * W) + s)[:, None] * C + ch[None, :]
        tl.store(Out + dst, out.to(Out.dtype.element_ty), mask=mask)

    _subpixel_shuffle_launcher = _triton.Launcher(_subpixel_shuffle_kernel)  # repeat launches skip Triton's Python


def _subpixel_shuffle_run(kernel, y: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Launch `kernel` (the Launcher, or the kernel wrapped by wrap_triton while torch.compile traces)."""
    b, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    out = torch.empty((b, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    grid = (b * 2 * h, _triton.cdiv(2 * w, BLOCK_S), _triton.cdiv(c, BLOCK_C))
    kernel[grid](y, bias, out, h, w, c, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out


def _subpixel_shuffle_launch(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _subpixel_shuffle_run(_subpixel_shuffle_launcher, y, bias)


def _subpixel_shuffle_traced(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _subpixel_shuffle_run(wrap_triton(_subpixel_shuffle_kernel), y, bias)


def _fake(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    b, c4, h1, w1 = y.shape
    return torch.empty((b, c4 // 4, 2 * (h1 - 1), 2 * (w1 - 1)), dtype=y.dtype, device=y.device,
                       memory_format=torch.channels_last)


# The op torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_subpixel_shuffle_op = _triton.CompileOp("fastdiff::triton_subpixel_shuffle", _subpixel_shuffle_launch,
                                         _subpixel_shuffle_traced, fake=_fake)


def check_subpixel_shuffle_inputs(y: Tensor, bias: Optional[Tensor]) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot shuffle y."""
    check_subpixel_shuffle_shapes(y, bias)
    if y.dtype not in DTYPES:
        raise ValueError(f"y has dtype {y.dtype}, expected one of {DTYPES}")
    _triton.check_like(y, bias=bias)
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"y must be channels_last, got shape {tuple(y.shape)} with strides {y.stride()}")
    check_triton_device(y)


def subpixel_shuffle(y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The four phases of `conv2d(x, subpixel_weight(w), padding=1)` put in place, plus the bias: equal to
    conv2d(nearest 2x upsample of x, w, bias, padding=1). y: (B, 4C, H + 1, W + 1) channels_last, float16,
    bfloat16 or float32; bias: (C,) in y's dtype, or None. Returns (B, C, 2H, 2W) channels_last; the bias is
    added in float32 and the sum rounded once. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1."""
    check_subpixel_shuffle_inputs(y, bias)
    if bias is not None:
        bias = bias.contiguous()
    if y.numel() == 0:
        return _fake(y, bias)
    if torch.compiler.is_compiling():
        return _subpixel_shuffle_op(y, bias)
    return _subpixel_shuffle_launch(y, bias)
