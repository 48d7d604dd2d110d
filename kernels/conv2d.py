"""2-D convolution as a split-K implicit GEMM, for convolutions with few output pixels and a long reduction.

Why: SD1.5's UNet at 512 px runs its 8x8 level at CFG batch 2 as 15 convolutions with M = N * OH * OW =
2 * 8 * 8 = 128 output pixels and 1280 output channels (3x3, Cin 1280 or 2560; one of them stride 2 from
16x16). cuDNN takes 23 us for each with 64x64 output tiles: 2 x 20 = 40 CTAs on a 132-SM H200, while the
weights alone (1280 * 1280 * 9 * 2 B = 29.5 MB) would stream from HBM in ~8 us. Output tiles cannot fill
the GPU at M = 128, so this kernel also splits the reduction K = KH * KW * Cin across programs: the whole
GPU streams the weights, each program into a float32 partial tile, and a second small kernel adds the
partials up. The aim was ~10 us per convolution; measured on an H200 (fp16, CUDA-graph replay) it takes 20.1
us against cuDNN's 23.6 at 2x1280x8x8 (1.18x) and runs at 1500 GB/s, short of streaming speed. Not profiled
further: the float32 partials (8.5 MB at 13 splits) and x re-read by each of the 20 column tiles are the
suspects. In the UNet it took the step from 5.577 to 5.534 ms at CFG batch 2 (torch 2.11, triton 3.6; the kernel's
own figures: benchmarks/RESULTS.md).

Implicit GEMM: out (M, Cout) = A (M, K) @ B (K, Cout), with rows m = (n, oh, ow) the output pixels, k =
(kh * KW + kw) * Cin + ci, A[m, k] = x[n, ci, oh * stride + kh - padding, ow * stride + kw - padding] (zero
outside the image) and B[k, co] = weight[co, ci, kh, kw]. Both tensors are channels_last, so x is (N, H, W,
Cin) in memory and the weight (Cout, KH, KW, Cin): the weight is B transposed, each output channel's K
values contiguous, and A is never materialized.

conv kernel  grid (cdiv(M, BLOCK_M), cdiv(Cout, BLOCK_N), splits). The K_BLOCKS = KH * KW * cdiv(Cin, BLOCK_K)
             blocks of the reduction are dealt to the splits in contiguous runs as equal as integers allow
             (split s gets blocks [s * K_BLOCKS // splits, (s + 1) * K_BLOCKS // splits)). A K block lies
             inside one (kh, kw) tap, so its A tile is BLOCK_M shifted pixels times a contiguous run of
             BLOCK_K input channels (masked to zero outside the image): coalesced loads, as are the weight
             tile's (BLOCK_K contiguous values per output channel, loaded transposed by pointer arithmetic).
             tl.dot accumulates in float32. With one split the program writes the output in x's dtype
             (one launch); with more it writes its float32 partial tile to a workspace (splits, M, Cout).
             The m tiles are the fastest grid axis, so the programs that share a weight tile run together
             (with M <= BLOCK_M there is one m tile and every weight byte is read once).
sum kernel   adds the splits' partials in split order and writes the output in x's dtype: deterministic,
             no float atomics.

Split policy (`splits=None`): PROGRAMS_PER_SM programs per SM in all, as far as the K blocks allow with at
least MIN_BLOCKS_PER_SPLIT of them per split. SD1.5 8x8, Cin 1280, H200: 1 x 20 output tiles of 128 x 64,
180 K blocks of 64 -> 13 splits of 13-14 blocks, 260 programs; the partials (13 x 128 x 1280 float32, 8.5 MB)
stay in L2. The block sizes and the policy are pinned constants (no autotuning: a cold start compiles one
variant per dtype and integer specialization); benchmarks/bench_conv2d.py times the alternatives.

`prefers_split_k` says where the kernel is used: few output pixels (M <= SPLIT_K_MAX_PIXELS) and a reduction
from SPLIT_K_MIN_K to SPLIT_K_MAX_K, where it measured faster than cuDNN. Larger outputs fill the GPU with output
tiles alone, and a longer reduction (Cin 2560) or a short one (1x1) ran slower than cuDNN's tuned kernels.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Output tile and reduction block. BLOCK_M covers M = 128 (SD1.5's 8x8 level at CFG batch 2) in one tile, so
# the weights stream once; smaller M gets next_power_of_2(M) rows (at least MIN_BLOCK, tl.dot's smallest
# tile), a Cout or Cin below the block its next power of two. A 64-channel K block is 128 bytes of each row
# of A and B in float16.
BLOCK_M = 128
BLOCK_N = 64
BLOCK_K = 64
MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16
# Warps and software-pipelining depth of the K loop (K blocks in flight per program). Compiled for sm_90 at
# the full tiles, float16 takes 96 KB of shared memory and 128 registers per thread (147 writing the output
# in float16), so two programs fit an SM. float32 (products in float32 on the FMA units, not tensor cores)
# spills at 4 warps (255 registers); at 8 warps and 2 stages it takes 206 registers and 48 KB, no spills.
NUM_WARPS = 4
STAGES = 4
NUM_WARPS_FP32 = 8
STAGES_FP32 = 2
# Split policy: about PROGRAMS_PER_SM programs per SM over all splits (two resident per SM hide each other's
# load latency), never fewer than MIN_BLOCKS_PER_SPLIT K blocks per split (the partial tile a split writes
# and the sum kernel reads back costs about as much as streaming a few weight blocks).
PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 4
SUM_BLOCK = 1024  # output elements per program of the sum kernel
SUM_STAGES = 4  # splits whose partials the sum kernel loads ahead (the loop is latency-bound otherwise)
# prefers_split_k: the kernel pays where output tiles alone cannot fill the GPU and the reduction is long, but
# not so long that cuDNN streams the weights as fast. Measured on an H200 (fp16, CUDA-graph replay, µs, against
# cuDNN): 2x1280x8x8 3x3 (K 11520) 20.1 vs 23.6; stride 2 from 16x16 19.9 vs 23.8; Cin 2560 3x3 (K 23040) 30.4
# vs 29.2; 1x1 from 2560 (K 2560) 11.5 vs 7.2; 8x1280x8x8 (M 512) 51.9 vs 32.8.
# A narrow output: SD1.5's UNet conv_out (320 -> 4 channels, 3x3) at CFG batch 2, 8192 output pixels, took
# 16.5 us here against cuDNN's 21.8 (with the channel padding it adds), each with the UNet's float32 output pass,
# on an H200; at CFG batch 16 64.3 against 65.1.
NARROW_MAX_COUT = 16
NARROW_MAX_PIXELS = 8192
NARROW_MIN_K = 1024
SPLIT_K_MAX_PIXELS = 256  # N * OH * OW
SPLIT_K_MIN_K = 4096  # KH * KW * Cin, at least
SPLIT_K_MAX_K = 16384  # and at most
MAX_NUMEL = 2**30  # x per sample and the weight: int32 offsets, with room for a masked tile beyond the end
MAX_GRID_YZ = 65535  # CUDA's limit on the grid's second and third axes (output channel tiles, splits)


def _output_size(x: Tensor, weight: Tensor, stride: int, padding: int) -> tuple[int, int]:
    return ((x.shape[2] + 2 * padding - weight.shape[2]) // stride + 1,
            (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1)


def check_conv2d_shapes(x: Tensor, weight: Tensor, stride: int, padding: int) -> None:
    """Validation shared by every backend: x (N, Cin, H, W), weight (Cout, Cin, KH, KW) (groups 1) with no empty
    dim, stride a positive int, padding a non-negative int, an output of at least one pixel (N may be 0)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, Cin, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (Cout, Cin, KH, KW), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels (shape {tuple(weight.shape)}), expected x's "
                         f"{x.shape[1]} (groups=1 only)")
    if type(stride) is not int or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if type(padding) is not int or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if 0 in weight.shape:
        raise ValueError(f"weight must have at least one output channel, input channel and tap, got shape "
                         f"{tuple(weight.shape)}")
    out_h, out_w = _output_size(x, weight, stride, padding)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size {out_h}x{out_w} is empty: input {x.shape[2]}x{x.shape[3]}, kernel "
                         f"{weight.shape[2]}x{weight.shape[3]}, stride {stride}, padding {padding}")


def conv2d_ref(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Plain-PyTorch twin: F.conv2d(x, weight, None, stride, padding) (cuDNN on CUDA tensors), no bias.
    x: (N, Cin, H, W); weight: (Cout, Cin, KH, KW) -> (N, Cout, OH, OW), channels_last for channels_last x."""
    check_conv2d_shapes(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding)


def prefers_split_k(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> bool:
    """Whether this kernel is the one to use for conv2d(x, weight, stride, padding): at most
    SPLIT_K_MAX_PIXELS output pixels (N * OH * OW) and a reduction K = KH * KW * Cin from SPLIT_K_MIN_K to
    SPLIT_K_MAX_K, on tensors the kernel takes (4-D, channels_last, a dtype of DTYPES; stride >= 1). SD1.5 at
    512 px: the 8x8 level's 3x3 convolutions of 1280 channels at CFG batch 2 (M = 128, K = 11520), not those of
    the concatenated 2560 (K = 23040), the 1x1 shortcuts (K = 2560) or the 16x16 level (M = 512). Also a narrow
    output: at most NARROW_MAX_COUT channels over at most NARROW_MAX_PIXELS pixels, K >= NARROW_MIN_K (the UNet's
    conv_out at CFG batch 2). It validates nothing else: a call it accepts may still be refused."""
    if (x.dim() != 4 or weight.dim() != 4 or type(stride) is not int or stride < 1 or x.dtype not in DTYPES
            or not _is_channels_last(x) or not _is_channels_last(weight)):
        return False
    out_h, out_w = _output_size(x, weight, stride, padding)
    pixels = x.shape[0] * max(out_h, 0) * max(out_w, 0)
    k = weight.shape[1] * weight.shape[2] * weight.shape[3]
    narrow = weight.shape[0] <= NARROW_MAX_COUT and pixels <= NARROW_MAX_PIXELS and k >= NARROW_MIN_K
    return 0 < pixels and (narrow or (pixels <= SPLIT_K_MAX_PIXELS and SPLIT_K_MIN_K <= k <= SPLIT_K_MAX_K))


def _is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


if triton is not None:

    @triton.jit
    def _conv2d_kernel(
        X,  # pointer to x, (N, H, W, Cin) in memory (channels_last)
        Wt,  # pointer to the weight, (Cout, KH, KW, Cin) in memory (channels_last): (Cout, K), K contiguous
        Out,  # pointer to (M, Cout): the output in x's dtype (one split), or float32 partials (splits, M, Cout)
        H,  # input height
        W,  # input width
        Cin,  # input channels
        OW,  # output width
        OHW,  # output pixels per sample, OH * OW
        M,  # output pixels in all, N * OH * OW
        Cout,  # output channels
        stride,  # the convolution's stride (both dims)
        padding,  # its zero padding (both dims)
        c_blocks,  # K blocks per tap, cdiv(Cin, BLOCK_K)
        KH: tl.constexpr,  # kernel height
        KW: tl.constexpr,  # kernel width
        EVEN_K: tl.constexpr,  # Cin % BLOCK_K == 0: no channel mask
        DOT_FP32: tl.constexpr,  # multiply in float32 without tf32 rounding (see _dot_fp32)
        BLOCK_M: tl.constexpr,  # output pixels per program
        BLOCK_N: tl.constexpr,  # output channels per program
        BLOCK_K: tl.constexpr,  # input channels per K block
        STAGES: tl.constexpr,  # software-pipelining depth of the K loop
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        splits = tl.num_programs(2)
        k_blocks = KH * KW * c_blocks
        # This split's run of K blocks: [k_blocks * s // splits, k_blocks * (s + 1) // splits), never empty
        # while splits <= k_blocks, and at most one block longer than another split's.
        k_begin = k_blocks * pid_k // splits
        k_end = k_blocks * (pid_k + 1) // splits

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        sample = offs_m // OHW
        pixel = offs_m % OHW
        ih0 = (pixel // OW) * stride - padding  # input row of tap kh = 0
        iw0 = (pixel % OW) * stride - padding
        x_rows = X + sample.to(tl.int64) * (H * W * Cin)  # each row's sample (int64: N * H * W * Cin may not fit)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Cout
        offs_k = tl.arange(0, BLOCK_K)
        # The weight tile loaded transposed, (BLOCK_K, BLOCK_N): column n is output channel n's run of K.
        w_cols = Wt + offs_n[None, :] * (KH * KW * Cin) + offs_k[:, None]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in tl.range(k_begin, k_end, num_stages=STAGES):
            tap = kb // c_blocks
            c0 = (kb - tap * c_blocks) * BLOCK_K  # first input channel of the block
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh
            iw = iw0 + kw
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows[:, None] + ((ih * W + iw) * Cin + c0)[:, None] + offs_k[None, :]
            b_ptrs = w_cols + tap * Cin + c0
            if EVEN_K:
                a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            else:
                mask_c = (c0 + offs_k) < Cin
                a = tl.load(a_ptrs, mask=inside[:, None] & mask_c[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)

        # One split: Out is the output. More: Out is the workspace and this split writes its own (M, Cout).
        out_ptrs = (Out + pid_k.to(tl.int64) * M * Cout + offs_m.to(tl.int64)[:, None] * Cout + offs_n[None, :])
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _conv2d_sum_kernel(
        Partials,  # pointer to the float32 partials, (splits, M, Cout)
        Out,  # pointer to the output, (M, Cout) in x's dtype
        numel,  # M * Cout
        splits,  # partial sums per output element
        BLOCK: tl.constexpr,  # output elements per program
        STAGES: tl.constexpr,  # software-pipelining depth of the loop over the splits
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        ptrs = Partials + offs
        acc = tl.load(ptrs, mask=mask, other=0.0)
        for _ in tl.range(1, splits, num_stages=STAGES):  # split order: the same sum on every call
            ptrs += numel
            acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)

    _conv2d_launcher = _triton.Launcher(_conv2d_kernel)  # repeat launches skip Triton's Python
    _conv2d_sum_launcher = _triton.Launcher(_conv2d_sum_kernel)


def _block(block: int, size: int) -> int:
    """A module block shrunk to next_power_of_2(size) for a smaller dimension, never below MIN_BLOCK."""
    return max(MIN_BLOCK, min(block, _triton.next_power_of_2(size)))


def _blocks(weight: Tensor, pixels: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a call with `pixels` output pixels: the module's blocks, shrunk to a
    smaller M, Cout or Cin."""
    return _block(BLOCK_M, pixels), _block(BLOCK_N, weight.shape[0]), _block(BLOCK_K, weight.shape[1])


def k_blocks(weight: Tensor) -> int:
    """The reduction blocks of a convolution with this weight, KH * KW * cdiv(Cin, BLOCK_K) (BLOCK_K shrunk to
    a smaller Cin): forced `splits` may be at most this."""
    _, cin, kh, kw = weight.shape
    return kh * kw * _triton.cdiv(cin, _block(BLOCK_K, cin))


def choose_splits(tiles: int, blocks: int, sms: int) -> int:
    """The split count for `tiles` output tiles and `blocks` K blocks on a GPU of `sms` SMs: as many splits as
    keep the programs within PROGRAMS_PER_SM per SM, at most one per MIN_BLOCKS_PER_SPLIT K blocks, at least 1."""
    return max(1, min((PROGRAMS_PER_SM * sms) // tiles, blocks // MIN_BLOCKS_PER_SPLIT, MAX_GRID_YZ))


def _dot_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies in float32 (the "ieee" precision, no tf32 rounding): for float32 inputs,
    and for bfloat16 under the interpreter, which multiplies bfloat16 tl.dot operands as raw uint16 bits
    (triton 3.9). bfloat16 to float32 is exact: the same products, accumulated in float32 as on the GPU."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _triton.INTERPRET)


def _empty_output(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """The output buffer, (N, Cout, OH, OW) channels_last in x's dtype: (N, OH, OW, Cout) in memory."""
    out_h, out_w = _output_size(x, weight, stride, padding)
    return x.new_empty((x.shape[0], out_h, out_w, weight.shape[0])).permute(0, 3, 1, 2)


def _conv2d_run(conv_kernel, sum_kernel, x: Tensor, weight: Tensor, stride: int, padding: int,
                splits: Optional[int]) -> Tensor:
    """Launch the kernels (the Launchers, or the kernels wrapped by wrap_triton while torch.compile traces)."""
    batch, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape
    out = _empty_output(x, weight, stride, padding)
    out_h, out_w = out.shape[2:]
    pixels = batch * out_h * out_w
    block_m, block_n, block_k = _blocks(weight, pixels)
    c_blocks = _triton.cdiv(cin, block_k)
    m_tiles, n_tiles = _triton.cdiv(pixels, block_m), _triton.cdiv(cout, block_n)
    if splits is None:
        splits = choose_splits(m_tiles * n_tiles, kh * kw * c_blocks, _triton.sm_count(x.device))
    # One split writes the output; more write float32 partials that the sum kernel adds into it.
    conv_out = out if splits == 1 else torch.empty((splits, pixels, cout), device=x.device, dtype=torch.float32)
    fp32 = x.dtype == torch.float32
    conv_kernel[(m_tiles, n_tiles, splits)](
        x, weight, conv_out, height, width, cin, out_w, out_h * out_w, pixels, cout, stride, padding, c_blocks,
        KH=kh, KW=kw, EVEN_K=cin % block_k == 0, DOT_FP32=_dot_fp32(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=STAGES_FP32 if fp32 else STAGES, num_warps=NUM_WARPS_FP32 if fp32 else NUM_WARPS)
    if splits > 1:
        numel = pixels * cout
        sum_kernel[(_triton.cdiv(numel, SUM_BLOCK),)](conv_out, out, numel, splits, BLOCK=SUM_BLOCK, STAGES=SUM_STAGES,
                                                      num_warps=4)
    return out


def _conv2d_launch(x: Tensor, weight: Tensor, stride: int, padding: int, splits: Optional[int]) -> Tensor:
    return _conv2d_run(_conv2d_launcher, _conv2d_sum_launcher, x, weight, stride, padding, splits)


def _conv2d_traced(x: Tensor, weight: Tensor, stride: int, padding: int, splits: Optional[int]) -> Tensor:
    return _conv2d_run(wrap_triton(_conv2d_kernel), wrap_triton(_conv2d_sum_kernel), x, weight, stride, padding,
                       splits)


# The op torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_conv2d_op = _triton.CompileOp("fastdiff::triton_conv2d", _conv2d_launch, _conv2d_traced,
                               fake=lambda x, weight, stride, padding, splits:
                               _empty_output(x, weight, stride, padding))


def check_conv2d_inputs(x: Tensor, weight: Tensor, stride: int, padding: int, splits: Optional[int] = None) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot compute this convolution."""
    check_conv2d_shapes(x, weight, stride, padding)
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    _triton.check_like(x, weight=weight)
    for name, t in (("x", x), ("weight", weight)):
        if not _is_channels_last(t):
            raise ValueError(f"{name} must be channels_last (dense, channels innermost), got shape {tuple(t.shape)} "
                             f"with strides {t.stride()}")
    for name, numel in (("x", x[:1].numel()), ("weight", weight.numel())):
        if numel > MAX_NUMEL:
            raise ValueError(f"{name} has {numel} elements{' per sample' if name == 'x' else ''}, over the kernel's "
                             f"limit {MAX_NUMEL}")
    if weight.shape[0] > MAX_GRID_YZ * BLOCK_N:
        raise ValueError(f"weight has {weight.shape[0]} output channels, over the kernel's limit "
                         f"{MAX_GRID_YZ * BLOCK_N}")
    if splits is not None:
        most = min(k_blocks(weight), MAX_GRID_YZ)
        if type(splits) is not int or not 1 <= splits <= most:
            raise ValueError(f"splits must be an int from 1 to {most} (the K blocks of this weight), got {splits!r}")
    check_triton_device(x)


def conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, splits: Optional[int] = None) -> Tensor:
    """F.conv2d(x, weight, None, stride, padding) with the split-K Triton kernel, meant for few output pixels
    and a long reduction (see `prefers_split_k`).

    x: (N, Cin, H, W), channels_last, float16, bfloat16 or float32; weight: (Cout, Cin, KH, KW), channels_last,
    in x's dtype (no bias, groups 1, dilation 1); stride: a positive int, padding: a non-negative int, both
    for height and width. The products accumulate in float32 (float32 inputs without tf32 rounding) and are
    rounded once to x's dtype. splits: how many programs share each output tile's reduction (1 to
    `k_blocks(weight)`; None: enough to fill the GPU, see `choose_splits`); the partials are added in a fixed
    order, so the result does not change from call to call. Returns (N, Cout, OH, OW), channels_last, in x's
    dtype. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_conv2d_inputs(x, weight, stride, padding, splits)
    if x.shape[0] == 0:
        return _empty_output(x, weight, stride, padding)
    if torch.compiler.is_compiling():  # the compiled op: what torch.compile puts in its graph
        return _conv2d_op(x, weight, stride, padding, splits)
    return _conv2d_run(_conv2d_launcher, _conv2d_sum_launcher, x, weight, stride, padding, splits)
