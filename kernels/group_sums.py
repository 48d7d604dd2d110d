"""A residual add or a skip concatenation that also sums its output for the GroupNorm that reads it next.

A GroupNorm needs each (sample, group)'s mean and variance before it writes any output, so a stand-alone
GroupNorm either reads x twice in one program per group (few programs: 64 at SD1.5's 32x32 level at CFG batch
2) or launches twice, statistics then output. On an H200 that exchange costs more than the pass over memory
itself at the UNet's sizes (benchmarks/RESULTS.md, "GroupNorm + SiLU"). The kernel that writes x has every value in
registers already: these kernels also add them up, per slice of pixels, into partial sums in the format of
`group_sums_ref`, and `group_norm(x, ..., sums=)` then runs only its normalizing pass (one launch, one read).

Both kernels write channels_last output (N, HW, C) in memory and are cut like the channels_last split
GroupNorm (`channels_last_plan`): one program per (slice of pixels, sample), each walking (ROWS, C) tiles.
The shift K of a group's sums is its first output element (pixel 0, the group's first channel) as stored in
the output's dtype: every program recomputes it from the inputs, so the slices agree on it without talking.

    residual_add_sums  x + x_bias + y + bias as `residual_add` (x may repeat over y's samples, or be None)
    channel_cat_sums   cat([x, skip], dim=1) as `channel_cat` (skip may repeat over x's samples)

Each returns (output, sums). While torch.compile traces, sums is None (the GroupNorm then computes its own):
the tensor-returning ops are the compiled ones.

Where it pays (`pays`): on large maps only. Summing costs the producer a reduction and a channels-to-groups
exchange at its end, and the normalizing pass still has a fixed cost (adding the slices' sums, groups back to
channels); on small maps those fixed costs exceed what the norm saves. Measured on an H200 (fp16, CUDA-graph
replay, us, torch 2.11, triton 3.6), producer + norm with the sums / the plain op + the norm's own:
    residual add  1x320x64x64 10.5 / 15.7   2x320x64x64 14.7 / 19.5   2x640x32x32 11.3 / 14.2
                  2x320x32x32 (y + bias) 7.2 / 11.3   2x1280x16x16 10.6 / 8.0   2x1280x8x8 9.7 / 4.7
    concatenation 2x960x64x64 26.8 / 30.5   2x640x64x64 23.7 / 23.9   2x960x32x32 11.7 / 16.2
                  2x1920x32x32 17.5 / 18.2   2x1280x32x32 16.5 / 16.6   2x2560x16x16 13.2 / 11.0
                  2x2560x8x8 9.9 / 5.3
An alternative with (pixels, groups, channels in a group) tiles and no exchange was slower at SD1.5's 10 and
20 channels per group (2x320x64x64: 29.9 us), whose runs cannot be loaded in aligned 16-byte vectors.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _triton
from ._triton import triton
from .channel_cat import channel_cat, channel_cat_ref, check_channel_cat_inputs
from .group_norm import (MAX_CHANNELS, STAGES, ChannelsLastPlan, channels_last_plan, check_num_groups,
                         group_sums_ref)
from .residual_add import check_residual_add_inputs, residual_add, residual_add_ref

if triton is not None:
    import triton.language as tl

    from .group_norm import store_group_sums


# The producers' (programs per SM, tile elements, warps) by the output's elements per SM: the first whose bound
# holds. Longer slices hide less latency; more programs make more partial sums for the norm to add. Measured on
# an H200 (fp16, graph replay, us) for (1, 8192, 8) / (2, 4096, 4) / (4, 2048, 4): residual add 2x320x64x64 (20K
# per SM) 7.0 / 7.2 / 7.6; 2x640x32x32 (10K) 5.4 / 5.7 / 6.8; concatenation 2x640x64x64 (40K) 11.9 / 9.5 / 10.6;
# 2x960x64x64 (60K) 12.3 / 9.7 / 10.8; residual add 16x640x32x32 (80K) 35.0 / 22.7 / 22.3; 16x320x64x64 (160K)
# 60.5 / 57.8 / 38.6 (torch 2.11, triton 3.6).
PRODUCER_CONFIGS = ((32 * 1024, (1, 8192, 8)), (64 * 1024, (2, 4096, 4)), (None, (4, 2048, 4)))
MIN_PIXELS = 32 * 32  # `pays`: the smallest map (H * W) whose producers sum for the next GroupNorm


def pays(out: Tensor) -> bool:
    """Whether summing for the GroupNorm beats the norm's own statistics for an output like `out` (N, C, H, W):
    maps of at least MIN_PIXELS pixels (see the module docstring)."""
    return out.dim() == 4 and out.shape[2] * out.shape[3] >= MIN_PIXELS


def _check_groups(channels: int, num_groups: int) -> None:
    check_num_groups(channels, num_groups)
    if channels > MAX_CHANNELS:
        raise ValueError(f"the output has {channels} channels, over the kernels' limit {MAX_CHANNELS}")


def residual_add_sums_ref(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None,
                          x_bias: Optional[Tensor] = None, num_groups: int = 32) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin: (residual_add_ref(x, y, bias, x_bias=x_bias), group_sums_ref of it)."""
    _check_groups(y.shape[1], num_groups)
    out = residual_add_ref(x, y, bias, x_bias=x_bias)
    return out, group_sums_ref(out, num_groups)


def channel_cat_sums_ref(x: Tensor, skip: Tensor, num_groups: int = 32) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin: (channel_cat_ref(x, skip), group_sums_ref of it)."""
    _check_groups(x.shape[1] + skip.shape[1], num_groups)
    out = channel_cat_ref(x, skip)
    return out, group_sums_ref(out, num_groups)


if triton is not None:

    @triton.jit
    def _output_tile(X, XBias, Y, Bias, S, n, x_samples, s_samples, rows, mask_r, cols, mask_c, HW, C, C1,
                     CONCAT: tl.constexpr):
        """The output's values at pixels `rows` and channels `cols` of sample n, in float32, (ROWS, BLOCK_C)."""
        pixels = rows.to(tl.int64)[:, None]
        mask = mask_r[:, None] & mask_c[None, :]
        if CONCAT:  # x's C1 channels, then skip's C - C1
            in_x = (cols < C1)[None, :]
            xv = tl.load(X + (n.to(tl.int64) * HW + pixels) * C1 + cols[None, :], mask=mask & in_x, other=0.0)
            sv = tl.load(S + ((n % s_samples).to(tl.int64) * HW + pixels) * (C - C1) + (cols - C1)[None, :],
                         mask=mask & (cols >= C1)[None, :], other=0.0)
            v = tl.where(in_x, xv, sv).to(tl.float32)
        else:
            v = tl.load(Y + (n.to(tl.int64) * HW + pixels) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if Bias is not None:
                v += tl.load(Bias + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            if X is not None:
                xv = tl.load(X + ((n % x_samples).to(tl.int64) * HW + pixels) * C + cols[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                if XBias is not None:
                    xv += tl.load(XBias + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
                v += xv  # (y + bias) + (x + x_bias): residual_add's order
        return v

    # Not specialized: x_samples and s_samples (1, a shared sample, or the batch), P and PER_SLICE (the slicing
    # follows the SM count and the shape): a new batch or size must not compile a variant each.
    @triton.jit(do_not_specialize=["x_samples", "s_samples", "P", "PER_SLICE"])
    def _summed_output_kernel(
        X,  # residual add: pointer to x, (N_x, HW, C) in memory, or None (y + bias alone); concat: x, (N, HW, C1)
        XBias,  # residual add: pointer to x's bias (C,), or None
        Y,  # residual add: pointer to y, (N, HW, C); concat: None
        Bias,  # residual add: pointer to y's bias (C,), or None
        S,  # concat: pointer to skip, (N_s, HW, C - C1); residual add: None
        Out,  # pointer to the output, (N, HW, C) in memory (channels_last)
        Partials,  # pointer to float32 (2, N, P, G): the output's shifted sums per slice and group
        Scratch,  # pointer to float32 (N, P, 2, C): per-channel sums on their way to groups
        x_samples,  # samples in x: output sample n adds x's sample n % x_samples
        s_samples,  # samples in skip: output sample n takes skip's sample n % s_samples
        HW,  # pixels per sample
        C,  # output channels
        C1,  # concat: x's channels
        G,  # groups
        CG,  # channels per group
        P,  # slices per sample
        PER_SLICE,  # pixels per slice, a multiple of ROWS
        CONCAT: tl.constexpr,  # the op: concatenation, or residual add
        ROWS: tl.constexpr,  # pixels per loop step
        BLOCK_C: tl.constexpr,  # next_power_of_2(C)
        BLOCK_G: tl.constexpr,  # next_power_of_2(G)
        BLOCK_CG: tl.constexpr,  # next_power_of_2(CG)
        STAGES: tl.constexpr,  # loads in flight per loop
    ):
        p = tl.program_id(0)
        n = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        mask_c = cols < C
        # K of each channel's group: the group's first output element, rounded as it is stored
        first = tl.zeros([1], dtype=tl.int32)
        shift = _output_tile(X, XBias, Y, Bias, S, n, x_samples, s_samples, first, first == 0, cols // CG * CG,
                             mask_c, HW, C, C1, CONCAT)
        shift = shift.to(Out.dtype.element_ty).to(tl.float32)  # (1, BLOCK_C)
        acc1 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        end = tl.minimum((p + 1) * PER_SLICE, HW)
        for start in tl.range(p * PER_SLICE, end, ROWS, num_stages=STAGES):
            rows = start + tl.arange(0, ROWS)
            mask_r = rows < end
            v = _output_tile(X, XBias, Y, Bias, S, n, x_samples, s_samples, rows, mask_r, cols, mask_c, HW, C, C1,
                             CONCAT).to(Out.dtype.element_ty)
            mask = mask_r[:, None] & mask_c[None, :]
            tl.store(Out + (n.to(tl.int64) * HW + rows.to(tl.int64)[:, None]) * C + cols[None, :], v, mask=mask)
            d = tl.where(mask, v.to(tl.float32) - shift, 0.0)
            acc1 += d
            acc2 += d * d
        store_group_sums(tl.sum(acc1, 0), tl.sum(acc2, 0), cols, mask_c, Scratch, Partials, n, p,
                         tl.num_programs(1), P, C, G, CG, BLOCK_G, BLOCK_CG)

    _summed_output_launcher = _triton.Launcher(_summed_output_kernel)  # repeat launches skip Triton's Python


def _summed_output(out: Tensor, num_groups: int, x: Optional[Tensor], x_bias: Optional[Tensor], y: Optional[Tensor],
                   bias: Optional[Tensor], skip: Optional[Tensor]) -> Tensor:
    """Launch the kernel that writes channels_last `out` (N, C, H, W) and return its sums (2, N, P, G)."""
    batch, channels = out.shape[:2]
    hw = out.numel() // (batch * channels)
    per_sm = out.numel() / _triton.sm_count(out.device)
    config = next(config for bound, config in PRODUCER_CONFIGS if bound is None or per_sm <= bound)
    plan = channels_last_plan(out, num_groups, config)
    sums = torch.empty((2, batch, plan.slices, num_groups), device=out.device, dtype=torch.float32)
    scratch = torch.empty((batch, plan.slices, 2, channels), device=out.device, dtype=torch.float32)
    concat = skip is not None

    def launch(plan: ChannelsLastPlan) -> None:
        _summed_output_launcher[(plan.slices, batch)](
            x, x_bias, y, bias, skip, out, sums, scratch, batch if x is None else x.shape[0],
            skip.shape[0] if concat else 1, hw, channels, x.shape[1] if concat else channels, num_groups,
            channels // num_groups, plan.slices, plan.per_slice, CONCAT=concat, ROWS=plan.rows,
            BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_CG=plan.block_cg, STAGES=STAGES, num_warps=plan.warps)

    launch(plan)
    _triton.compile_later(launch, (channels_last_plan(out, num_groups, config) for _, config in PRODUCER_CONFIGS))
    return sums


def residual_add_sums(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                      num_groups: int = 32) -> tuple[Tensor, Optional[Tensor]]:
    """`residual_add(x, y, bias, x_bias=x_bias)` of channels_last maps (N, C, H, W), and the sums of its output
    for a GroupNorm of `num_groups` groups (`group_norm(out, num_groups, ..., sums=)`), in one kernel.
    Returns (out, sums): out channels_last in y's dtype, sums float32 (2, N, P, num_groups) (`group_sums_ref`),
    or None while torch.compile traces. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1."""
    check_residual_add_inputs(x, y, bias, x_bias=x_bias)
    _check_groups(y.shape[1], num_groups)
    if y.dim() != 4 or not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"y must be a channels_last (N, C, H, W) map, got shape {tuple(y.shape)} with strides "
                         f"{y.stride()}")
    if torch.compiler.is_compiling() or y.numel() == 0:
        return residual_add(x, y, bias, x_bias=x_bias), None
    out = torch.empty_like(y)
    bias = None if bias is None else bias.contiguous()
    x_bias = None if x_bias is None else x_bias.contiguous()
    return out, _summed_output(out, num_groups, x, x_bias, y, bias, None)


def channel_cat_sums(x: Tensor, skip: Tensor, num_groups: int = 32) -> tuple[Tensor, Optional[Tensor]]:
    """`channel_cat(x, skip)` (torch.cat([x, skip], dim=1) of channels_last maps, skip repeated over x's samples
    when it has fewer) and the sums of its output for a GroupNorm of `num_groups` groups, in one kernel.
    Returns (out, sums) as `residual_add_sums`."""
    check_channel_cat_inputs(x, skip)
    channels = x.shape[1] + skip.shape[1]
    _check_groups(channels, num_groups)
    if torch.compiler.is_compiling() or x.numel() + skip.numel() == 0:
        return channel_cat(x, skip), None
    n, _, h, w = x.shape
    out = torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out, _summed_output(out, num_groups, x, None, None, None, skip)
