"""Residual add with per-channel biases in one pass: x + x_bias + y + bias (biases broadcast over [None, :, None, ...]).

The UNet's ResNet blocks end in `skip + conv2(h)`. PyTorch's cuDNN convolution adds the conv's bias in a
pass of its own over the output (a broadcast add, not vectorized), so eagerly the block's tail reads and
writes the conv output twice: the bias add, then the residual add. Called on the conv's output without its
bias, `residual_add(skip, h, conv2.bias)` reads skip and h once and writes the sum once. A block whose skip
path is a 1x1 conv run as a matmul without its bias passes that bias too (`x_bias`): cuBLAS's GEMM with a bias
epilogue is up to 1.55x slower than without one at SD1.5's widths on an H200 (benchmarks/RESULTS.md).

x may hold fewer samples than y, a divisor of y's: it then repeats over y's samples ([x; x; ...] along dim 0),
as a UNet's shared sample does under classifier-free guidance, where the rows of one latent part into an
unconditional and a conditional half inside the first transformer and its input is added back to both: the
kernel reads sample n % N_x of x, so the repeated copy is never written.

The sum is computed in float32 as (y + bias) + (x + x_bias), the order of the eager ops, and rounded once to the
dtype; eager torch rounds twice (after the bias add and after the residual add), so the two differ by up to
an ulp in float16 and bfloat16 and agree exactly in float32.

One kernel over the flattened elements, sample by sample: offsets inside a sample are int32 (the channel
index `i // HW`, or `i % C` with channels innermost, is then a 32-bit division), the sample's start is
int64. No autotuning: BLOCK and the warps are pinned (benchmarks/bench_residual_add.py times the
alternatives), so a cold start compiles one variant per (dtype, layout, bias or not) and integer
specialization (C, HW and C * HW divisible by 16, or equal to 1).
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
# Elements per program: 8 per thread at NUM_WARPS, one 16-byte access per tensor in float16, two in float32.
# SD1.5's smallest level (2x1280x8x8, CFG batch 2) still gets 160 programs, more than an H100's or H200's SMs.
BLOCK = 1024
NUM_WARPS = 4
MAX_SAMPLE_NUMEL = 2**30  # C * HW per sample: int32 offsets inside a sample, with room for the last block


def check_residual_add_shapes(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
                              x_bias: Optional[Tensor] = None) -> None:
    """Validation shared by every backend: x (N_x, C, *spatial), y (N, C, *spatial) with N_x dividing N (x
    repeats over y's samples), bias and x_bias (C,) or None, out y's shape, dtype and strides or None. x None
    (no residual: y + bias alone) needs the bias and no x_bias."""
    if x is None:
        if y.dim() < 2:
            raise ValueError(f"y must be (N, C, *spatial), got shape {tuple(y.shape)}")
        if bias is None or x_bias is not None:
            raise ValueError("without x (no residual) the pass adds y's bias alone: give bias, and no x_bias")
        x = y  # the checks below then compare y with itself
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    # Broadcasting would otherwise add a smaller y to every sample without complaint; a smaller x repeats.
    if y.shape[1:] != x.shape[1:] or (y.shape[0] % x.shape[0] if x.shape[0] else y.shape[0]):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected x's shape {tuple(x.shape)} or x's with a multiple "
                         f"of its {x.shape[0]} samples")
    for name, b in (("bias", bias), ("x_bias", x_bias)):
        if b is not None and tuple(b.shape) != (x.shape[1],):
            raise ValueError(f"{name} has shape {tuple(b.shape)}, expected ({x.shape[1]},)")
    if out is not None and (out.shape != y.shape or out.stride() != y.stride() or out.dtype != x.dtype):
        raise ValueError(f"out must match y (shape {tuple(y.shape)}, strides {y.stride()}, {x.dtype}), got shape "
                         f"{tuple(out.shape)}, strides {out.stride()}, {out.dtype}")


def residual_add_ref(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
                     x_bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin: the conv's bias added to its output y first, then the residual x, each in the
    dtype, exactly as the UNet computes `skip + conv(h)` with a biased conv today (cuDNN adds the bias to the
    conv's output, then the block adds the skip); x_bias is first added to x, as a biased skip conv would.
    x: (N_x, C, *spatial), repeated over y's samples when N_x < N; y: (N, C, *spatial); bias, x_bias: (C,) or
    None. Returns (N, C, *spatial) in x's layout (both contiguous or both channels_last), in `out` when given.
    x None: y + bias alone (a conv's bias added in a pass of its own)."""
    check_residual_add_shapes(x, y, bias, out, x_bias)
    if x is None:
        y = y + bias.view(1, -1, *([1] * (y.dim() - 2)))
        return y if out is None else out.copy_(y)
    x = _triton.repeat_samples(x, y.shape[0])
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * (y.dim() - 2)))
    if x_bias is not None:
        x = x + x_bias.view(1, -1, *([1] * (x.dim() - 2)))
    return x + y if out is None else out.copy_(x + y)  # copy_: autograd records it (training the VAE)


if triton is not None:

    # Not specialized: x_samples (1, a shared batch-1 sample, or the batch) and HW (it only finds a contiguous
    # element's channel; sample_numel's divisibility gives the alignment): a new batch or size must not compile
    # a variant of its own.
    @triton.jit(do_not_specialize=["x_samples", "HW"])
    def _residual_add_kernel(
        X,  # pointer to x, (N, C, *spatial), contiguous or channels innermost, or None (y + bias alone)
        Y,  # pointer to y, x's shape and layout
        Bias,  # pointer to y's bias (C,), or None
        XBias,  # pointer to x's bias (C,), or None
        Out,  # pointer to the output, y's shape and layout
        x_samples,  # samples in x: output sample n adds x's sample n % x_samples
        sample_numel,  # C * HW: elements per sample
        C,  # channels
        HW,  # spatial elements per channel (1 for an (N, C) tensor)
        CHANNELS_LAST: tl.constexpr,  # channels innermost: channel = i % C; else i // HW (i: offset in a sample)
        BLOCK: tl.constexpr,  # elements per program
    ):
        # Programs walk the samples one after the other: the batch is outermost in both layouts, so a
        # sample is a contiguous run of C * HW elements.
        blocks = tl.cdiv(sample_numel, BLOCK)
        n = tl.program_id(0) // blocks
        offs = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < sample_numel
        start = n.to(tl.int64) * sample_numel
        channel = offs % C if CHANNELS_LAST else offs // HW  # dead code without a bias
        out = tl.load(Y + start + offs, mask=mask).to(tl.float32)
        if Bias is not None:
            out += tl.load(Bias + channel, mask=mask).to(tl.float32)
        if X is not None:
            x = tl.load(X + (n % x_samples).to(tl.int64) * sample_numel + offs, mask=mask).to(tl.float32)
            if XBias is not None:
                x += tl.load(XBias + channel, mask=mask).to(tl.float32)
            out += x  # (y + bias) + (x + x_bias): the eager order
        tl.store(Out + start + offs, out.to(Out.dtype.element_ty), mask=mask)

    _residual_add_launcher = _triton.Launcher(_residual_add_kernel)  # repeat launches skip Triton's Python


def _layout(t: Tensor) -> Optional[str]:
    """The memory layout the kernel walks t in: "contiguous", "channels_last" (dense with channels innermost,
    any number of spatial dims), or None for other strides. A tensor that is both (one channel, or one
    pixel) counts as contiguous: its memory order is the same."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() >= 3 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return "channels_last"
    return None


def _residual_add_run(kernel, x: Optional[Tensor], y: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
                      x_bias: Optional[Tensor] = None) -> Tensor:
    """Launch `kernel` (the Launcher, or the kernel wrapped by wrap_triton while torch.compile traces)."""
    out = torch.empty_like(y) if out is None else out  # y has x's layout
    batch, channels = y.shape[:2]
    sample_numel = y.numel() // batch
    grid = (batch * _triton.cdiv(sample_numel, BLOCK),)
    kernel[grid](x, y, bias, x_bias, out, batch if x is None else x.shape[0], sample_numel, channels,
                 sample_numel // channels, CHANNELS_LAST=not y.is_contiguous(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def _launched_x_bias(x: Optional[Tensor], y: Tensor, x_bias: Optional[Tensor]) -> Optional[Tensor]:
    """What an eager launch passes as x_bias: -0.0 per channel (`_triton.constant_row`) for a residual without
    one, which changes no value, so that sums with and without x's bias launch one compiled variant."""
    if x is not None and x_bias is None:
        return _triton.constant_row(-0.0, y.shape[1], y)
    return x_bias


def _residual_add_launch(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor],
                         x_bias: Optional[Tensor] = None) -> Tensor:
    return _residual_add_run(_residual_add_launcher, x, y, bias, x_bias=_launched_x_bias(x, y, x_bias))


def _residual_add_traced(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor],
                         x_bias: Optional[Tensor] = None) -> Tensor:
    return _residual_add_run(wrap_triton(_residual_add_kernel), x, y, bias, x_bias=x_bias)


# The op torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_residual_add_op = _triton.CompileOp("fastdiff::triton_residual_add", _residual_add_launch, _residual_add_traced,
                                     fake=lambda x, y, bias, x_bias=None: torch.empty_like(y))


def check_residual_add_inputs(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
                              x_bias: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot compute this sum."""
    check_residual_add_shapes(x, y, bias, out, x_bias)
    if x is None:
        x = y  # y + bias alone: y takes x's place in the checks
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    _triton.check_like(x, y=y, bias=bias, x_bias=x_bias, out=out)
    x_layout, y_layout = _layout(x), _layout(y)
    if x_layout is None:
        raise ValueError(f"x must be contiguous or channels_last, got shape {tuple(x.shape)} with strides "
                         f"{x.stride()}")
    if y_layout != x_layout:
        raise ValueError(f"y must have x's layout ({x_layout}), got shape {tuple(y.shape)} with strides {y.stride()}")
    sample_numel = x[:1].numel()
    if sample_numel > MAX_SAMPLE_NUMEL:
        raise ValueError(f"x has {sample_numel} elements per sample, over the kernel's limit {MAX_SAMPLE_NUMEL}")
    check_triton_device(x)


def residual_add(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
                 x_bias: Optional[Tensor] = None) -> Tensor:
    """x + x_bias + y + bias (biases [None, :, None, ...]) with the Triton kernel: one read of x and y, one write.

    x, y: (N, C, *spatial), same shape and dtype (float16, bfloat16 or float32), both contiguous or both
    channels_last (dense with channels innermost: channels_last for 4-D, channels_last_3d for 5-D); x may
    instead hold a divisor N_x of y's N samples, repeated over them (sample n adds x[n % N_x]);
    bias, x_bias: (C,) in x's dtype, or None. y is the conv output whose bias was left out, x the residual
    (x_bias: the bias its skip conv left out): the sum is (y + bias) + (x + x_bias) in float32, rounded once to
    the dtype (eager torch, `residual_add_ref`, rounds after each add). Returns (N, C, *spatial) in x's dtype
    and layout: a new tensor, or `out` (y's shape, dtype and strides; it may be x or y, each element is read
    before it is written), which saves a live activation where memory peaks (the VAE decoder at 512 px). Runs
    on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.

    x None: no residual, y + bias alone (bias required, no x_bias), for a conv whose bias PyTorch would add in
    a broadcast pass that is not vectorized: SD1.5's conv_in at batch 1 took 10.3 us with its bias on an H200
    and 5.4 without.
    """
    check_residual_add_inputs(x, y, bias, out, x_bias)
    bias = None if bias is None else bias.contiguous()
    x_bias = None if x_bias is None else x_bias.contiguous()
    if y.numel() == 0:
        return torch.empty_like(y) if out is None else out
    if torch.compiler.is_compiling():  # the compiled op returns a new tensor
        result = _residual_add_op(x, y, bias, x_bias)
        return result if out is None else out.copy_(result)
    return _residual_add_run(_residual_add_launcher, x, y, bias, out, _launched_x_bias(x, y, x_bias))
