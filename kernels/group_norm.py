"""GroupNorm with an optional fused SiLU, of x plus an optional per-(sample, channel) offset.

x: (N, C, *spatial), contiguous or channels_last; statistics in float32; output in x's dtype and layout.
offset: (N, C) or None, its rows at any stride (0: one row for all samples, as an expand() gives; more than
C: a slice of a wider matrix). The kernels normalize x + offset[:, :, None, ...] in float32 as they read x,
so a broadcast add before the norm (the UNet ResNet block's time embedding) costs no pass over memory.

Two strategies, picked per call by the group's size Cg * HW (elements per (sample, group)):

single launch (Cg * HW <= SINGLE_LAUNCH_MAX: the SD UNet's 32x32 and 16x16 levels at 512 px)
  One program per (sample, group) reads its group twice: first the shifted sums (below) give mean and rstd,
  then it normalizes, scales, shifts, applies SiLU and writes; the second read hits L2. Splitting such a
  group buys little on the GPU, and one launch instead of two saves host time in an eager call.

split (larger groups: the UNet's 64x64 level, 10 x 4096; the VAE's 1x128x512x512, 4 x 262144)
  The reduction is split so the whole GPU is busy even when N * num_groups is small (32 groups for the
  VAE): one program per group would stream far too much. Two launches:
  stats   a few programs per SM; each streams its slice of x and accumulates the shifted sums element-wise
          in registers; one reduction per slice at the end;
  apply   the same slices, in reverse order (the slices read last are still in L2): each program first adds
          up its groups' partial sums into mean and rstd (a few hundred floats, from L2), then normalizes,
          scales, shifts, applies SiLU and writes.

Shifted sums: float32 sums of (x - K) and (x - K)^2, where the shift K is one element of the group (offset
included), so the variance does not cancel catastrophically when the mean is large.
Layouts: in contiguous x a group is one run of Cg * HW elements. In channels_last x ((N, HW, C) in memory)
a group is Cg contiguous channels at each pixel. The single-launch kernel tiles it (ROWS pixels, Cg
channels), with Cg a constexpr so that each pixel's run is known aligned and its loads vectorize and
pipeline (one compiled variant per Cg: 10, 20, 40 for the SD UNet). A split slice is a run of pixels with
all C channels, tiled (ROWS, C) so loads stay contiguous and vectorized; its per-channel values pass through
a small global scratch (write, CTA barrier, gather) to become per-group and back, which is cheaper than a
(G, C) membership mask when a slice holds few pixels.
SiLU is a runtime flag of the kernels, not a constexpr, so calls with and without it share one compiled
kernel (half the apply and single-launch variants a cold start compiles; the cost is one branch per tile of
a memory-bound loop).
Offset: a pointer that Triton compiles as a constant when it is None (as weight and bias): calls with it
compile a variant of each kernel of their own. Since x - (c - offset) equals (x + offset) - c, the kernels
subtract each channel's offset from the values they centre x on (K in the sums, the mean to normalize) rather
than add it to x: channels_last tiles do that once per channel, at no cost per element; contiguous ones once
per element, gathering the offset as they gather weight and bias. So eager channels_last calls without an
offset pass zeros (`_zero_offset`, from `_triton.constant_row`) and launch the offset variants too:
a model that normalizes the same shape with and without an offset (a ResNet block's norm1 and norm2) compiles
it once. Subtracting a zero changes no bit. On an H200 the VAE's conv1 bias as norm2's offset had added 6
compiled variants and 1.0-1.5 s to the first image in a fresh process (torch 2.11, triton 3.6).
"""
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

ACTIVATIONS = (None, "silu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE = 4096  # elements per loop step of a kernel's program: enough loads in flight, no spills
MAX_CHANNELS = TILE  # channels_last: a tile holds at least one pixel's next_power_of_2(C) channels
PROGRAMS_PER_SM = 4  # contiguous: stats/apply programs per SM; each loops over its slice
# channels_last split path: programs (slices) per SM, tile (elements per loop step: tile // next_power_of_2(C)
# pixels) and warps. Each apply program adds up every slice's sums of its sample, so fewer, longer slices pay until
# a slice is long: one program per SM while x has at most CL_ONE_PER_SM elements per SM (CL_TILE, NUM_WARPS), else
# CL_MANY_PROGRAMS_PER_SM (CL_MANY_TILE, CL_MANY_WARPS). Measured on an H200 (fp16 + SiLU, CUDA-graph replay, us):
# - one per SM / two per SM, both with an 8192 tile and 8 warps: 2x320x64x64 (20K elements per SM) 15.7 / 20.9;
#   1x512x128x128 (64K) 22.7 / 27.2; 1x256x256x256 (127K) 56.3 / 47.7; 1x128x512x512 (254K) 85.6 / 69.1. The
#   4096-element tile measured 17.5 / 20.9, 23.5 / 26.6, 49.8 / 44.8 and 88.2 / 71.7 on the same shapes.
# - many per SM, (programs per SM, tile, warps) (2, 8192, 8) / (4, 4096, 4): 16x320x64x64 59.0 / 53.0;
#   16x640x64x64 136.0 / 94.2; 16x960x64x64 146.9 / 110.6; 16x1280x32x32 54.0 / 58.1; 16x1920x32x32 62.5 / 64.9;
#   8x960x64x64 64.5 / 60.5; 1x128x512x512 72.1 / 76.3; 8x128x512x512 432.9 / 429.5; 13 shapes 1521.5 / 1436.7
#   in all (torch 2.11, triton 3.6).
CL_ONE_PER_SM = 96 * 1024
CL_TILE = 8192
CL_MANY_PROGRAMS_PER_SM = 4
CL_MANY_TILE = 4096
CL_MANY_WARPS = 4
# The normalizing pass alone (sums from x's producer, kernels/group_sums.py), channels_last: one program per SM
# (CL_TILE, NUM_WARPS) while x has at most SUMMED_ONE_PER_SM elements per SM, else two. Measured on an H200
# (fp16 + SiLU, graph replay, us), one / two per SM / four per SM with 4096-element tiles and 4 warps:
# 2x640x32x32 (10K per SM) 5.5 / 6.9 / 6.4; 2x320x64x64 (20K) 7.5 / 7.7 / 7.3; 2x640x64x64 (40K) 11.5 / 11.3 /
# 12.0; 2x960x64x64 (60K) 12.2 / 12.0 / 12.0; 16x640x32x32 (80K) 37.6 / 17.5 / 19.1; 16x320x64x64 (160K) 54.0 /
# 32.7 / 32.0 (torch 2.11, triton 3.6).
SUMMED_ONE_PER_SM = 64 * 1024
PARTIAL_TILE = 4096  # partial sums an apply program adds per step
STAGES = 3  # software-pipelining depth of the stats/apply/single-launch loops
NUM_WARPS = 8  # every kernel's warps, but the channels_last split path's on large x (CL_MANY_WARPS)
CL_CONFIGS = ((1, CL_TILE, NUM_WARPS), (CL_MANY_PROGRAMS_PER_SM, CL_MANY_TILE, CL_MANY_WARPS))  # small x, large x
# Largest group (Cg * HW elements) normalized by the single-launch kernel; larger ones take the split path.
# Measured on an H200 (fp16, CUDA-graph replay, benchmarks/RESULTS.md), single vs split µs: 2x1280x16x16
# (10K per group) 6.1 vs 6.5 contiguous, 6.9 vs 10.9 channels_last; 2x640x32x32 (20K) 8.5 vs 7.8, 12.9 vs
# 15.9; 2x320x64x64 (40K) 14.3 vs 10.7, 31.0 vs 23.0; 1x512x64x64 (64K) 20.7 vs 9.7. One program per group
# leaves SMs idle once groups are large; up to 32K the single launch also saves a launch's host time.
# A module constant, so benchmarks and tests can force either path (0: always split; huge: always single).
SINGLE_LAUNCH_MAX = 32 * 1024


class _Kernels(NamedTuple):
    """The four kernels as one call site launches them: their Launchers for eager calls, or the kernels
    wrapped by wrap_triton while torch.compile traces."""
    stats: Any
    apply: Any
    single: Any
    single_cl: Any


def check_num_groups(channels: int, num_groups: int) -> None:
    """ValueError unless num_groups is a positive divisor of the channels (shared by the GroupNorm's and the
    producers' checks)."""
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must divide the {channels} channels, got {num_groups}")


def group_sums_ref(x: Tensor, num_groups: int) -> Tensor:
    """The statistics a kernel that writes x can hand to the GroupNorm that reads it (`group_norm(sums=)`):
    float32 (2, N, P, G), the sums of (x - K) and of (x - K)^2 over slice p of group g of sample n, where the
    shift K is the group's first element x[n, g * C // G, 0, ...]. The slices partition each group's elements in
    any way (the producers of kernels/group_sums.py: a slice of pixels each); here P = 1."""
    batch, channels = x.shape[:2]
    check_num_groups(channels, num_groups)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.reshape(batch, num_groups, -1).to(acc)
    d = d - d[:, :, :1]
    return torch.stack([d.sum(-1), (d * d).sum(-1)])[:, :, None, :].float()


def _check_sums(x: Tensor, num_groups: int, sums: Tensor, offset: Optional[Tensor]) -> None:
    if offset is not None:
        raise ValueError("sums are of x alone: pass them without an offset")
    batch = x.shape[0]
    if sums.dim() != 4 or sums.shape[0] != 2 or sums.shape[1] != batch or sums.shape[2] < 1 \
            or sums.shape[3] != num_groups:
        raise ValueError(f"sums has shape {tuple(sums.shape)}, expected (2, {batch}, slices, {num_groups})")
    if sums.dtype != torch.float32 or sums.device != x.device or not sums.is_contiguous():
        raise ValueError(f"sums must be contiguous float32 on x's device {x.device}, got {sums.dtype} on "
                         f"{sums.device}{'' if sums.is_contiguous() else ', not contiguous'}")


def group_norm_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: Optional[str] = None, offset: Optional[Tensor] = None,
                   sums: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin: x + offset[:, :, None, ...] in x's dtype (the unfused model's add), then
    F.group_norm in float32 (float64 stays float64), then the activation. `sums` (x's own statistics from its
    producer, see `group_sums_ref`) are checked and not needed: the reference computes from x."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if sums is not None:
        _check_sums(x, num_groups, sums, offset)
    if offset is not None:
        _check_offset_shape(x, offset)
        x = x + offset.reshape(*offset.shape, *(1,) * (x.dim() - 2))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.group_norm(x.to(acc), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _mean_rstd(sum1, sum2, count, shift, eps):
        """Mean and 1/sqrt(var + eps) from the sums of (x - shift) and (x - shift)^2 over count elements (the
        shift keeps the variance from cancelling when the mean is large)."""
        mean_shifted = sum1 / count
        var = tl.maximum(sum2 / count - mean_shifted * mean_shifted, 0.0)
        return shift + mean_shifted, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _group_offsets(Offset, offset_stride, ng, G, CG):
        """Pointer to the offset of contiguous group ng's first channel: g * CG in offset row n (ng = n * G + g)."""
        return Offset + (ng // G).to(tl.int64) * offset_stride + (ng % G) * CG

    @triton.jit
    def _center_contiguous(center, Offset, offset_stride, ng, G, CG, HW, offs, mask):
        """center - the offset of each element offs of contiguous group ng (= n * G + g), or center when Offset
        is None: x - (center - offset) is (x + offset) - center, so the kernels subtract the offset from the
        value they centre x on (K, the mean) instead of adding it to x (channels_last: once per channel)."""
        if Offset is not None:  # element offs belongs to the group's channel offs // HW
            offsets = _group_offsets(Offset, offset_stride, ng, G, CG)
            center = center - tl.load(offsets + offs // HW, mask=mask, other=0.0).to(tl.float32)  # L1 hits
        return center

    @triton.jit
    def _group_shift(X, Offset, offset_stride, ng, G, CG):
        """K of contiguous group ng: its first element of x + offset, X pointing at the group."""
        shift = tl.load(X).to(tl.float32)
        if Offset is not None:
            shift += tl.load(_group_offsets(Offset, offset_stride, ng, G, CG)).to(tl.float32)
        return shift

    @triton.jit
    def _normalize_contiguous(X, Offset, offset_stride, Y, W, B, begin, end, ng, G, CG, HW, mean, rstd, silu,
                              BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """y = (x + offset - mean) * rstd * weight + bias, then SiLU when silu != 0, for elements begin..end of
        contiguous group ng (= n * G + g) at X (output at Y); element i belongs to channel g * CG + i // HW."""
        for start in tl.range(begin, end, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < end
            channel = (ng % G) * CG + offs // HW  # neighbours share a channel: these gathers hit L1
            scale = tl.full([BLOCK], 1.0, tl.float32) * rstd
            if W is not None:
                scale *= tl.load(W + channel, mask=mask, other=0.0).to(tl.float32)
            shift = -_center_contiguous(mean, Offset, offset_stride, ng, G, CG, HW, offs, mask) * scale
            if B is not None:
                shift += tl.load(B + channel, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * scale + shift
            if silu != 0:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _normalize_channels_last(X, Y, begin, end, C, cols, mask_c, scale, shift, silu, ROWS: tl.constexpr,
                                 STAGES: tl.constexpr):
        """y = x * scale + shift per channel, then SiLU when silu != 0, for pixels begin..end of channels_last
        x at X (one sample; output at Y), channels `cols` (mask_c: the valid ones); scale and shift fold the
        mean, rstd, weight, bias and offset in."""
        for start in tl.range(begin, end, ROWS, num_stages=STAGES):
            rows = start + tl.arange(0, ROWS)
            mask = (rows < end)[:, None] & mask_c[None, :]
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
            if silu != 0:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def store_group_sums(sum1, sum2, cols, mask_c, Scratch, Partials, n, p, N, P, C, G, CG, BLOCK_G: tl.constexpr,
                         BLOCK_CG: tl.constexpr):
        """Write slice p of sample n's per-channel shifted sums sum1, sum2 ((BLOCK_C,) over channels `cols`,
        mask_c: the valid ones) to Partials (2, N, P, G) as per-group sums. Channels -> groups: the sums are
        parked in Scratch ((N, P, 2, C) float32) and read back as (G, CG), which is cheaper than a (G, C)
        membership mask. Shared by the stats kernel and the producers that sum their output
        (kernels/group_sums.py)."""
        scratch = Scratch + (n * P + p) * 2 * C
        tl.store(scratch + cols, sum1, mask=mask_c)
        tl.store(scratch + C + cols, sum2, mask=mask_c)
        tl.debug_barrier()  # the CTA's stores above are visible to all its threads below
        g = tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_CG)
        member = (g < G)[:, None] & (j < CG)[None, :]
        by_group = g[:, None] * CG + j[None, :]  # (BLOCK_G, BLOCK_CG) channel indices
        s1 = tl.sum(tl.load(scratch + by_group, mask=member, other=0.0), 1)
        s2 = tl.sum(tl.load(scratch + C + by_group, mask=member, other=0.0), 1)
        out = Partials + (n * P + p) * G + g
        tl.store(out, s1, mask=g < G)
        tl.store(out + N * P * G, s2, mask=g < G)

    # Not specialized: P and PER_SLICE (the slicing follows the SM count and the shape, and would compile a variant
    # per size; the contiguous path states its slices' alignment with tl.multiple_of instead).
    @triton.jit(do_not_specialize=["P", "PER_SLICE"])
    def _group_norm_stats_kernel(
        X,  # pointer to x, (N, C, HW) contiguous or (N, HW, C) channels_last
        Offset,  # pointer to the offsets (N, C) added to x, or None
        offset_stride,  # elements between the offsets' rows (0: one row for every sample)
        Partials,  # pointer to float32 (2, N, P, G): sums of (x - K) and (x - K)^2 per slice and group
        Scratch,  # channels_last: pointer to float32 (N, P, 2, C), per-channel sums on their way to groups
        HW,  # pixels per channel
        C,  # channels
        G,  # groups
        CG,  # channels per group
        P,  # slices per group (contiguous) or per sample (channels_last)
        PER_SLICE,  # elements (contiguous) or pixels (channels_last) per slice, a multiple of the tile
        CHANNELS_LAST: tl.constexpr,  # x's layout
        BLOCK: tl.constexpr,  # contiguous: elements per loop step
        ROWS: tl.constexpr,  # channels_last: pixels per loop step
        BLOCK_C: tl.constexpr,  # channels_last: next_power_of_2(C)
        BLOCK_G: tl.constexpr,  # channels_last: next_power_of_2(G)
        BLOCK_CG: tl.constexpr,  # channels_last: next_power_of_2(CG)
        STAGES: tl.constexpr,  # loads in flight per loop: copies into shared memory run STAGES - 1 steps ahead
    ):
        p = tl.program_id(0)
        if CHANNELS_LAST:
            n = tl.program_id(1)
            cols = tl.arange(0, BLOCK_C)
            mask_c = cols < C
            base = X + n.to(tl.int64) * HW * C
            shift = tl.load(base + cols // CG * CG, mask=mask_c, other=0.0).to(tl.float32)  # K of each group
            center = shift  # (BLOCK_C,): x - center == x + offset - K (see _center_contiguous)
            if Offset is not None:
                offsets = Offset + n.to(tl.int64) * offset_stride
                shift += tl.load(offsets + cols // CG * CG, mask=mask_c, other=0.0).to(tl.float32)
                center = shift - tl.load(offsets + cols, mask=mask_c, other=0.0).to(tl.float32)
            acc1 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            acc2 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            end = tl.minimum((p + 1) * PER_SLICE, HW)
            for start in tl.range(p * PER_SLICE, end, ROWS, num_stages=STAGES):
                rows = start + tl.arange(0, ROWS)
                mask = (rows < end)[:, None] & mask_c[None, :]
                x = tl.load(base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
                d = tl.where(mask, x.to(tl.float32) - center[None, :], 0.0)
                acc1 += d
                acc2 += d * d
            store_group_sums(tl.sum(acc1, 0), tl.sum(acc2, 0), cols, mask_c, Scratch, Partials, n, p,
                             tl.num_programs(1), P, C, G, CG, BLOCK_G, BLOCK_CG)
        else:
            ng = tl.program_id(1)  # n * G + g
            group_size = CG * HW
            base = X + ng.to(tl.int64) * group_size
            shift = _group_shift(base, Offset, offset_stride, ng, G, CG)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            end = tl.minimum((p + 1) * PER_SLICE, group_size)
            for start in tl.range(tl.multiple_of(p * PER_SLICE, BLOCK), end, BLOCK, num_stages=STAGES):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < end
                x = tl.load(base + offs, mask=mask, other=0.0)
                d = tl.where(mask, x.to(tl.float32) - _center_contiguous(shift, Offset, offset_stride, ng, G, CG, HW,
                                                                        offs, mask), 0.0)
                acc1 += d
                acc2 += d * d
            out = Partials + ((ng // G) * P + p) * G + ng % G
            tl.store(out, tl.sum(acc1, 0))
            tl.store(out + tl.num_programs(1) // G * P * G, tl.sum(acc2, 0))

    # Not specialized: silu (Triton would compile silu == 1 as a constant), N, P and PER_SLICE (as the stats
    # kernel's: the batch and the slicing would compile a variant per size).
    @triton.jit(do_not_specialize=["N", "P", "PER_SLICE", "silu"])
    def _group_norm_apply_kernel(
        X,  # pointer to x, (N, C, HW) contiguous or (N, HW, C) channels_last
        Offset,  # pointer to the offsets (N, C) added to x, or None
        offset_stride,  # elements between the offsets' rows (0: one row for every sample)
        Y,  # pointer to the output, same shape and layout as x
        Partials,  # pointer to float32 (2, N, P, G) from the stats kernel
        Stats,  # channels_last: pointer to float32 (N, 2, G), each group's mean and rstd
        W,  # pointer to weight (C,), or None
        B,  # pointer to bias (C,), or None
        N,  # samples
        HW,  # pixels per channel
        C,  # channels
        G,  # groups
        CG,  # channels per group
        P,  # slices, as in the stats kernel
        PER_SLICE,  # elements (contiguous) or pixels (channels_last) per slice, as in the stats kernel
        eps,  # added to the variance
        silu,  # 1: SiLU after the affine, 0: none (runtime: both share one compiled kernel)
        CHANNELS_LAST: tl.constexpr,  # x's layout
        BLOCK: tl.constexpr,  # contiguous: elements per loop step
        ROWS: tl.constexpr,  # channels_last: pixels per loop step
        BLOCK_C: tl.constexpr,  # channels_last: next_power_of_2(C)
        BLOCK_G: tl.constexpr,  # channels_last: next_power_of_2(G)
        BLOCK_CG: tl.constexpr,  # channels_last: next_power_of_2(CG)
        BLOCK_P: tl.constexpr,  # partial sums added per step
        STAGES: tl.constexpr,  # loads in flight per loop
    ):
        # Reverse of the stats kernel's order: the slices it read last are still in L2.
        p = tl.num_programs(0) - 1 - tl.program_id(0)
        row = tl.num_programs(1) - 1 - tl.program_id(1)
        count = tl.cast(CG * HW, tl.float32)
        eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as float64: keep the statistics float32
        if CHANNELS_LAST:
            n = row
            g = tl.arange(0, BLOCK_G)
            s1 = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)
            s2 = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)
            for start in range(0, P, BLOCK_P):  # every group's partial sums: this slice covers all groups
                slices = start + tl.arange(0, BLOCK_P)
                mask = (slices < P)[:, None] & (g < G)[None, :]
                offs = (n * P + slices)[:, None] * G + g[None, :]
                s1 += tl.load(Partials + offs, mask=mask, other=0.0)
                s2 += tl.load(Partials + N * P * G + offs, mask=mask, other=0.0)
            base = n.to(tl.int64) * HW * C
            first = tl.load(X + base + g * CG, mask=g < G, other=0.0).to(tl.float32)  # K of each group
            if Offset is not None:  # the stats kernel's K exactly
                offsets = Offset + n.to(tl.int64) * offset_stride
                first += tl.load(offsets + g * CG, mask=g < G, other=0.0).to(tl.float32)
            mean, rstd = _mean_rstd(tl.sum(s1, 0), tl.sum(s2, 0), count, first, eps)  # (BLOCK_G,)
            # Groups -> channels: every program of sample n writes the same (mean, rstd) to Stats, so the
            # overlapping writes agree, then gathers them back per channel.
            tl.store(Stats + n * 2 * G + g, mean, mask=g < G)
            tl.store(Stats + n * 2 * G + G + g, rstd, mask=g < G)
            tl.debug_barrier()  # the CTA's stores above are visible to all its threads below
            cols = tl.arange(0, BLOCK_C)
            mask_c = cols < C
            group = n * 2 * G + cols // CG
            scale = tl.load(Stats + G + group, mask=mask_c, other=0.0)  # (BLOCK_C,): each channel's rstd
            if W is not None:
                scale *= tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
            mean = tl.load(Stats + group, mask=mask_c, other=0.0)  # (BLOCK_C,)
            if Offset is not None:  # x + offset - mean == x - (mean - offset): nothing more per element
                mean -= tl.load(offsets + cols, mask=mask_c, other=0.0).to(tl.float32)
            shift = -mean * scale
            if B is not None:
                shift += tl.load(B + cols, mask=mask_c, other=0.0).to(tl.float32)
            _normalize_channels_last(X + base, Y + base, p * PER_SLICE, tl.minimum((p + 1) * PER_SLICE, HW), C,
                                     cols, mask_c, scale, shift, silu, ROWS, STAGES)
        else:
            ng = row
            n = ng // G
            s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
            s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
            for start in range(0, P, BLOCK_P):
                slices = start + tl.arange(0, BLOCK_P)
                offs = (n * P + slices) * G + ng % G
                s1 += tl.load(Partials + offs, mask=slices < P, other=0.0)
                s2 += tl.load(Partials + N * P * G + offs, mask=slices < P, other=0.0)
            group_size = CG * HW
            base = ng.to(tl.int64) * group_size
            shift = _group_shift(X + base, Offset, offset_stride, ng, G, CG)
            mean, rstd = _mean_rstd(tl.sum(s1, 0), tl.sum(s2, 0), count, shift, eps)
            end = tl.minimum((p + 1) * PER_SLICE, group_size)
            _normalize_contiguous(X + base, Offset, offset_stride, Y + base, W, B, tl.multiple_of(p * PER_SLICE, BLOCK),
                                  end, ng, G, CG, HW, mean, rstd, silu, BLOCK, STAGES)

    # Not specialized: silu (Triton would compile silu == 1 as a constant) and CG (its divisibility by 16
    # changes nothing here, as HW's gives the alignment): one compiled variant per dtype and tile.
    @triton.jit(do_not_specialize=["CG", "silu"])
    def _group_norm_single_kernel(
        X,  # pointer to x, (N, C, HW) contiguous
        Offset,  # pointer to the offsets (N, C) added to x, or None
        offset_stride,  # elements between the offsets' rows (0: one row for every sample)
        Y,  # pointer to the output, same shape and layout as x
        W,  # pointer to weight (C,), or None
        B,  # pointer to bias (C,), or None
        HW,  # pixels per channel
        G,  # groups
        CG,  # channels per group
        eps,  # added to the variance
        silu,  # 1: SiLU after the affine, 0: none (runtime: both share one compiled kernel)
        BLOCK: tl.constexpr,  # elements per loop step
        STAGES: tl.constexpr,  # loads in flight per loop
    ):
        ng = tl.program_id(0)  # n * G + g: one program normalizes one group of one sample
        group_size = CG * HW
        base = ng.to(tl.int64) * group_size
        shift = _group_shift(X + base, Offset, offset_stride, ng, G, CG)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in tl.range(0, group_size, BLOCK, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < group_size
            x = tl.load(X + base + offs, mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - _center_contiguous(shift, Offset, offset_stride, ng, G, CG, HW, offs,
                                                                    mask), 0.0)
            acc1 += d
            acc2 += d * d
        eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as float64: keep the statistics float32
        mean, rstd = _mean_rstd(tl.sum(acc1, 0), tl.sum(acc2, 0), tl.cast(group_size, tl.float32), shift, eps)
        # the second pass reads the group again, from L2
        _normalize_contiguous(X + base, Offset, offset_stride, Y + base, W, B, 0, group_size, ng, G, CG, HW, mean,
                              rstd, silu, BLOCK, STAGES)

    # Not specialized: silu, and HW (rows start aligned as C is, whatever the pixel count).
    @triton.jit(do_not_specialize=["HW", "silu"])
    def _group_norm_single_cl_kernel(
        X,  # pointer to x, (N, HW, C) in memory (channels_last)
        Offset,  # pointer to the offsets (N, C) added to x, or None
        offset_stride,  # elements between the offsets' rows (0: one row for every sample)
        Y,  # pointer to the output, same shape and layout as x
        W,  # pointer to weight (C,), or None
        B,  # pointer to bias (C,), or None
        HW,  # pixels per channel
        C,  # channels
        G,  # groups
        eps,  # added to the variance
        silu,  # 1: SiLU after the affine, 0: none (runtime: both share one compiled kernel)
        CG: tl.constexpr,  # channels per group: a constant, so that the compiler knows each pixel's run of CG
                           # channels is aligned to CG elements and vectorizes and pipelines its loads
        BLOCK_CG: tl.constexpr,  # next_power_of_2(CG)
        ROWS: tl.constexpr,  # pixels per loop step
        STAGES: tl.constexpr,  # loads in flight per loop
    ):
        ng = tl.program_id(0)  # n * G + g: one program normalizes one group of one sample
        j = tl.arange(0, BLOCK_CG)
        mask_c = j < CG
        cols = (ng % G) * CG + j  # the group's channels
        n = ng // G
        base = n.to(tl.int64) * HW * C
        first = tl.load(X + base + (ng % G) * CG).to(tl.float32)  # K: the group's first element
        center = tl.zeros([BLOCK_CG], dtype=tl.float32) + first  # x - center == x + offset - K
        if Offset is not None:
            offsets = Offset + n.to(tl.int64) * offset_stride
            offset = tl.load(offsets + cols, mask=mask_c, other=0.0).to(tl.float32)  # (BLOCK_CG,)
            first += tl.load(offsets + (ng % G) * CG).to(tl.float32)
            center = first - offset
        acc1 = tl.zeros([ROWS, BLOCK_CG], dtype=tl.float32)
        acc2 = tl.zeros([ROWS, BLOCK_CG], dtype=tl.float32)
        for start in tl.range(0, HW, ROWS, num_stages=STAGES):
            rows = start + tl.arange(0, ROWS)
            mask = (rows < HW)[:, None] & mask_c[None, :]
            x = tl.load(X + base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - center[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as float64: keep the statistics float32
        mean, rstd = _mean_rstd(tl.sum(acc1), tl.sum(acc2), tl.cast(HW * CG, tl.float32), first, eps)
        scale = tl.full([BLOCK_CG], 1.0, tl.float32) * rstd  # (BLOCK_CG,): per channel
        if W is not None:
            scale *= tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
        if Offset is not None:  # x + offset - mean == x - (mean - offset): nothing more per element
            mean = mean - offset  # (BLOCK_CG,)
        shift = -mean * scale
        if B is not None:
            shift += tl.load(B + cols, mask=mask_c, other=0.0).to(tl.float32)
        # again, from L2
        _normalize_channels_last(X + base, Y + base, 0, HW, C, cols, mask_c, scale, shift, silu, ROWS, STAGES)

    _LAUNCHERS = _Kernels(*map(_triton.Launcher, (_group_norm_stats_kernel, _group_norm_apply_kernel,
                                                  _group_norm_single_kernel, _group_norm_single_cl_kernel)))


def channels_last_perm(dim: int) -> tuple[int, ...]:
    """The permutation that makes a channels_last (N, C, *spatial) tensor contiguous: (0, 2, ..., 1)."""
    return (0, *range(2, dim), 1)


def _check_offset_shape(x: Tensor, offset: Tensor) -> None:
    if tuple(offset.shape) != tuple(x.shape[:2]):
        raise ValueError(f"offset has shape {tuple(offset.shape)}, expected (N, C) = {tuple(x.shape[:2])}")


def check_group_norm_inputs(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, activation: Optional[str], offset: Optional[Tensor] = None,
                            sums: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the bad value when the Triton kernels cannot compute this GroupNorm."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    channels = x.shape[1]
    check_num_groups(channels, num_groups)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({channels},)")
    if offset is not None:
        _check_offset_shape(x, offset)
        if offset.shape[1] > 1 and offset.stride(1) != 1:
            raise ValueError(f"offset's channels must be adjacent (stride 1), got strides {offset.stride()}")
    _triton.check_like(x, weight=weight, bias=bias, offset=offset)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if channels > MAX_CHANNELS and _is_channels_last(x):
        raise ValueError(f"channels_last x has {channels} channels, over the kernel's limit {MAX_CHANNELS}")
    if sums is not None:
        _check_sums(x, num_groups, sums, offset)
    check_triton_device(x)


def _is_channels_last(x: Tensor) -> bool:
    """True when x is dense with channels innermost (and not also plainly contiguous)."""
    return not x.is_contiguous() and x.permute(channels_last_perm(x.dim())).is_contiguous()


def _group_norm_run(kernels: _Kernels, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, activation: Optional[str], offset: Optional[Tensor],
                    sums: Optional[Tensor] = None) -> Tensor:
    batch, channels = x.shape[:2]
    hw = x.numel() // (batch * channels)
    y = torch.empty_like(x)  # same layout as x
    channels_last = _is_channels_last(x)
    args = (kernels, x, offset, y, num_groups, weight, bias, eps, int(activation == "silu"), batch, channels, hw,
            channels_last)
    if sums is not None:
        _launch_split(*args, sums=sums)
    elif channels // num_groups * hw <= SINGLE_LAUNCH_MAX:
        _launch_single(*args)
    else:
        _launch_split(*args)
    if _triton.compiling() and channels_last and sums is None:  # what other sizes of this call launch, for later
        with _triton.compiling_later():
            _launch_single(*args)
            for config in CL_CONFIGS:
                _launch_split(*args, config=config)
    return y


def _launch_single(kernels: _Kernels, x: Tensor, offset: Optional[Tensor], y: Tensor, num_groups: int,
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float, silu: int, batch: int, channels: int,
                   hw: int, channels_last: bool) -> None:
    """One program per (sample, group): statistics, then the normalized output, in one launch."""
    cg = channels // num_groups
    offset_stride = offset.stride(0) if offset is not None else 0
    grid = (batch * num_groups,)
    if channels_last:
        block_cg = _triton.next_power_of_2(cg)
        kernels.single_cl[grid](x, offset, offset_stride, y, weight, bias, hw, channels, num_groups, eps, silu, CG=cg,
                                BLOCK_CG=block_cg, ROWS=max(1, TILE // block_cg), STAGES=STAGES, num_warps=NUM_WARPS)
    else:
        kernels.single[grid](x, offset, offset_stride, y, weight, bias, hw, num_groups, cg, eps, silu,
                             BLOCK=min(TILE, _triton.next_power_of_2(cg * hw)), STAGES=STAGES, num_warps=NUM_WARPS)


class ChannelsLastPlan(NamedTuple):
    """How the channels_last split kernels (and the producers of kernels/group_sums.py) cut a sample's pixels:
    `slices` programs per sample of `per_slice` pixels each, `rows` pixels x `block_c` channels per loop step."""
    slices: int
    per_slice: int
    rows: int
    warps: int
    block_c: int  # next_power_of_2(C)
    block_g: int  # next_power_of_2(G)
    block_cg: int  # next_power_of_2(C // G)


def channels_last_plan(x: Tensor, num_groups: int, config: Optional[tuple[int, int, int]] = None) -> ChannelsLastPlan:
    """The slices of channels_last x (N, C, *spatial) for `config`, (programs per SM, tile elements, warps). By
    default the split kernels' rule: one per SM in all while x is small, else CL_MANY_PROGRAMS_PER_SM per SM
    with smaller tiles (the measurements are at CL_ONE_PER_SM)."""
    batch, channels = x.shape[:2]
    hw = x.numel() // max(1, batch * channels)
    block_c, block_g, block_cg = (_triton.next_power_of_2(n) for n in (channels, num_groups, channels // num_groups))
    sms = _triton.sm_count(x.device)
    if config is None:
        config = CL_CONFIGS[0] if x.numel() <= CL_ONE_PER_SM * sms else CL_CONFIGS[1]
    per_sm, tile, warps = config
    rows = max(1, tile // block_c)
    slices = max(1, min(_triton.cdiv(per_sm * sms, batch), _triton.cdiv(hw, rows)))
    per_slice = _triton.cdiv(_triton.cdiv(hw, slices), rows) * rows
    return ChannelsLastPlan(_triton.cdiv(hw, per_slice), per_slice, rows, warps, block_c, block_g, block_cg)


def _summed_config(x: Tensor) -> tuple[int, int, int]:
    """The normalizing pass's (programs per SM, tile, warps) when a producer summed x: see SUMMED_ONE_PER_SM."""
    return (1 if x.numel() <= SUMMED_ONE_PER_SM * _triton.sm_count(x.device) else 2), CL_TILE, NUM_WARPS


def _partials_block(block_g: int) -> int:
    """Slices' partial sums a channels_last apply program adds per step (a (BLOCK_P, BLOCK_G) tile): a full tile
    whatever the number of slices (masked past it), so that a new size or batch compiles no variant of its own."""
    return max(1, PARTIAL_TILE // block_g)


def _launch_split(kernels: _Kernels, x: Tensor, offset: Optional[Tensor], y: Tensor, num_groups: int,
                  weight: Optional[Tensor], bias: Optional[Tensor], eps: float, silu: int, batch: int, channels: int,
                  hw: int, channels_last: bool, sums: Optional[Tensor] = None,
                  config: Optional[tuple[int, int, int]] = None) -> None:
    """Statistics over slices of each group (or sample), then the output: two launches that fill the GPU. With
    `sums` (the partial sums x's producer made, see `group_sums_ref`) only the second. config: channels_last's
    plan config (one of CL_CONFIGS), by default the one for x's size."""
    cg = channels // num_groups
    offset_stride = offset.stride(0) if offset is not None else 0
    if channels_last:
        plan = channels_last_plan(x, num_groups, config if sums is None else _summed_config(x))
        slices, per_slice, rows, warps, block_c, block_g, block_cg = plan
        block = 1
        grid_rows = batch  # a slice covers every group of its pixels
    else:
        group_size = cg * hw
        block_c = block_g = block_cg = 1  # unused by the contiguous branches: one compiled variant per tile
        rows, block = 1, min(TILE, _triton.next_power_of_2(group_size))
        target, warps = PROGRAMS_PER_SM * _triton.sm_count(x.device), NUM_WARPS
        slices = max(1, min(_triton.cdiv(target, batch * num_groups), _triton.cdiv(group_size, block)))
        per_slice = _triton.cdiv(_triton.cdiv(group_size, slices), block) * block
        slices = _triton.cdiv(group_size, per_slice)
        grid_rows = batch * num_groups
    meta = dict(CHANNELS_LAST=channels_last, BLOCK=block, ROWS=rows, BLOCK_C=block_c, BLOCK_G=block_g,
                BLOCK_CG=block_cg, STAGES=STAGES, num_warps=warps)
    if sums is None:
        partials = torch.empty((2, batch, slices, num_groups), device=x.device, dtype=torch.float32)
        scratch = torch.empty((batch, slices, 2, channels) if channels_last else (1,), device=x.device,
                              dtype=torch.float32)
        kernels.stats[(slices, grid_rows)](x, offset, offset_stride, partials, scratch, hw, channels, num_groups, cg,
                                           slices, per_slice, **meta)
    else:
        partials = sums  # its own number of slices: the apply kernel adds them all, whatever its grid
    partial_slices = partials.shape[2]
    block_p = (_partials_block(block_g) if channels_last
               else min(_triton.next_power_of_2(partial_slices), PARTIAL_TILE))
    stats = torch.empty((batch, 2, num_groups) if channels_last else (1,), device=x.device, dtype=torch.float32)
    kernels.apply[(slices, grid_rows)](x, offset, offset_stride, y, partials, stats, weight, bias, batch, hw, channels,
                                       num_groups, cg, partial_slices, per_slice, eps, silu, BLOCK_P=block_p, **meta)


def _zero_offset(x: Tensor) -> Optional[Tensor]:
    """A zero offset (N, C) for channels_last x, rows at stride 0 (see the module docstring), or None: for
    contiguous x (whose kernels would gather it per element), and during a CUDA-graph capture that finds no
    zeros made yet (`_triton.constant_row`)."""
    if not _is_channels_last(x):
        return None
    zeros = _triton.constant_row(0.0, x.shape[1], x)  # channels_last x has at most MAX_CHANNELS
    return None if zeros is None else zeros.expand(x.shape[0], -1)


def _group_norm_launch(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       activation: Optional[str], offset: Optional[Tensor] = None,
                       sums: Optional[Tensor] = None) -> Tensor:
    if offset is None:
        offset = _zero_offset(x)
    return _group_norm_run(_LAUNCHERS, x, num_groups, weight, bias, eps, activation, offset, sums)


def _group_norm_traced(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       activation: Optional[str], offset: Optional[Tensor] = None) -> Tensor:
    kernels = _Kernels(wrap_triton(_group_norm_stats_kernel), wrap_triton(_group_norm_apply_kernel),
                       wrap_triton(_group_norm_single_kernel), wrap_triton(_group_norm_single_cl_kernel))
    return _group_norm_run(kernels, x, num_groups, weight, bias, eps, activation, offset)


# The op torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_group_norm_op = _triton.CompileOp("fastdiff::triton_group_norm", _group_norm_launch, _group_norm_traced,
                                   fake=lambda x, num_groups, weight, bias, eps, activation, offset=None:
                                   torch.empty_like(x))


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None, offset: Optional[Tensor] = None,
               sums: Optional[Tensor] = None) -> Tensor:
    """GroupNorm over x + offset[:, :, None, ...]: (N, C, *spatial), then `activation` (None or "silu"), with
    the Triton kernels.

    x: float16, bfloat16 or float32, contiguous or channels_last (other strides are made contiguous);
    weight, bias: (C,) in x's dtype, or None; offset: (N, C) in x's dtype with adjacent channels, its rows at
    any stride (0: an expanded (1, C) row), or None, added to x in float32 (the reference adds it in x's
    dtype first, as the unfused model does). Statistics in float32.
    sums: x's statistics as the kernel that wrote x summed them (`group_sums_ref` gives the format;
    kernels/group_sums.py's producers make them), or None. With them only the normalizing pass runs: one
    launch that reads x once, instead of two reads or two launches. Not with an offset. Ignored while
    torch.compile traces (the statistics are then computed from x).
    Returns x's shape, dtype and layout. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_group_norm_inputs(x, num_groups, weight, bias, eps, activation, offset, sums)
    if not x.is_contiguous() and not _is_channels_last(x):
        x = x.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if x.numel() == 0:
        return torch.empty_like(x)
    if torch.compiler.is_compiling():
        return _group_norm_op(x, num_groups, weight, bias, float(eps), activation, offset)
    return _group_norm_launch(x, num_groups, weight, bias, float(eps), activation, offset, sums)
