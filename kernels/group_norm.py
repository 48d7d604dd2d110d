"""GroupNorm with an optional fused SiLU.

x: (N, C, *spatial), contiguous or channels_last; statistics in float32; output in x's dtype and layout.

`group_norm` splits the reduction so the whole GPU is busy even when N * num_groups is small (64 groups
at batch 2, 32 for the VAE's 1x128x512x512): a group of 10 channels x 4096 pixels, or 4 x 262144, is far
too much work for one program. Three launches:
  stats     many programs per group, each reduces one tile to (count, mean, M2) with a two-pass sum in
            registers (no E[x^2] - E[x]^2 cancellation);
  finalize  one program per group merges its partials (Chan et al.'s parallel variance) into mean, rstd;
  apply     many programs per group normalize, scale, shift, apply SiLU and write. They walk the tiles in
            the reverse order of `stats`, so the tiles read last (still in L2) are read again first.
Tiles follow the memory layout: in contiguous x a group is one run of Cg * HW elements; in channels_last x
a tile is ROWS pixels x all C channels, laid out as (ROWS, G, Cg) so that each group reduces on its own.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

ACTIVATIONS = (None, "silu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE = 4096  # elements per stats/apply program: enough loads in flight, no spills
MAX_ROW = 16384  # channels_last: G * next_power_of_2(Cg) elements of one pixel must fit one tile
PARTIAL_BLOCK = 1024  # finalize merges partials this many at a time


def group_norm_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """Plain-PyTorch twin: F.group_norm in float32 (float64 stays float64), then the activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.group_norm(x.to(acc), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _group_norm_stats_kernel(
        X,  # pointer to x, (N, C, HW) contiguous or (N, HW, C) channels_last
        Partials,  # pointer to float32 (3, N * G, P): count, mean, M2 of each tile and group
        NG,  # N * G
        HW,  # pixels per channel
        C,  # channels
        G,  # groups
        CG,  # channels per group
        P,  # tiles per group
        CHANNELS_LAST: tl.constexpr,  # x's layout
        BLOCK: tl.constexpr,  # contiguous: elements per tile
        ROWS: tl.constexpr,  # channels_last: pixels per tile
        BLOCK_G: tl.constexpr,  # channels_last: next_power_of_2(G)
        BLOCK_CG: tl.constexpr,  # channels_last: next_power_of_2(CG)
    ):
        tile = tl.program_id(0)
        if CHANNELS_LAST:
            n = tl.program_id(1)
            rows = tile * ROWS + tl.arange(0, ROWS)
            g = tl.arange(0, BLOCK_G)
            j = tl.arange(0, BLOCK_CG)
            mask = (rows[:, None, None] < HW) & (g[None, :, None] < G) & (j[None, None, :] < CG)
            offs = rows[:, None, None].to(tl.int64) * C + (g * CG)[None, :, None] + j[None, None, :]
            x = tl.load(X + n.to(tl.int64) * HW * C + offs, mask=mask, other=0.0).to(tl.float32)
            count = tl.sum(tl.sum(mask.to(tl.float32), 2), 0)  # (BLOCK_G,)
            mean = tl.sum(tl.sum(x, 2), 0) / tl.maximum(count, 1.0)
            d = tl.where(mask, x - mean[None, :, None], 0.0)
            m2 = tl.sum(tl.sum(d * d, 2), 0)
            out = (n * G + g) * P + tile
            tl.store(Partials + out, count, mask=g < G)
            tl.store(Partials + NG * P + out, mean, mask=g < G)  # NG * P: one plane of the (3, N*G, P) buffer
            tl.store(Partials + 2 * NG * P + out, m2, mask=g < G)
        else:
            ng = tl.program_id(1)  # n * G + g
            group_size = CG * HW
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            mask = offs < group_size
            x = tl.load(X + ng.to(tl.int64) * group_size + offs, mask=mask, other=0.0).to(tl.float32)
            count = tl.minimum(group_size - tile * BLOCK, BLOCK).to(tl.float32)
            mean = tl.sum(x, 0) / count
            d = tl.where(mask, x - mean, 0.0)
            m2 = tl.sum(d * d, 0)
            out = ng * P + tile
            tl.store(Partials + out, count)
            tl.store(Partials + NG * P + out, mean)
            tl.store(Partials + 2 * NG * P + out, m2)

    @triton.jit
    def _group_norm_finalize_kernel(
        Partials,  # pointer to float32 (3, N * G, P) from the stats kernel
        Stats,  # pointer to float32 (2, N * G): mean, rstd
        NG,  # N * G
        P,  # tiles per group
        eps,  # added to the variance
        BLOCK_P: tl.constexpr,  # partials merged per step
    ):
        ng = tl.program_id(0)
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for start in range(0, P, BLOCK_P):
            offs = start + tl.arange(0, BLOCK_P)
            mask = offs < P
            c_i = tl.load(Partials + ng * P + offs, mask=mask, other=0.0)
            mean_i = tl.load(Partials + NG * P + ng * P + offs, mask=mask, other=0.0)
            m2_i = tl.load(Partials + 2 * NG * P + ng * P + offs, mask=mask, other=0.0)
            # Chan et al.: merge this block's partials, then merge the block into the running totals.
            c_b = tl.sum(c_i, 0)
            mean_b = tl.sum(c_i * mean_i, 0) / tl.maximum(c_b, 1.0)
            d_i = mean_i - mean_b
            m2_b = tl.sum(m2_i + c_i * d_i * d_i, 0)
            total = count + c_b
            delta = mean_b - mean
            mean += delta * c_b / total
            m2 += m2_b + delta * delta * count * c_b / total
            count = total
        tl.store(Stats + ng, mean)
        tl.store(Stats + NG + ng, 1.0 / tl.sqrt(m2 / count + eps))

    @triton.jit
    def _group_norm_apply_kernel(
        X,  # pointer to x, (N, C, HW) contiguous or (N, HW, C) channels_last
        Y,  # pointer to the output, same shape and layout as x
        Stats,  # pointer to float32 (2, N * G): mean, rstd
        W,  # pointer to weight (C,), or None
        B,  # pointer to bias (C,), or None
        NG,  # N * G
        HW,  # pixels per channel
        C,  # channels
        G,  # groups
        CG,  # channels per group
        P,  # tiles per group
        CHANNELS_LAST: tl.constexpr,  # x's layout
        SILU: tl.constexpr,  # apply SiLU after the affine
        BLOCK: tl.constexpr,  # contiguous: elements per tile
        ROWS: tl.constexpr,  # channels_last: pixels per tile
        BLOCK_G: tl.constexpr,  # channels_last: next_power_of_2(G)
        BLOCK_CG: tl.constexpr,  # channels_last: next_power_of_2(CG)
    ):
        # Reverse of the stats kernel's order: the tiles it read last are still in L2.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        row = tl.num_programs(1) - 1 - tl.program_id(1)
        if CHANNELS_LAST:
            n = row
            rows = tile * ROWS + tl.arange(0, ROWS)
            g = tl.arange(0, BLOCK_G)
            j = tl.arange(0, BLOCK_CG)
            mask_c = (g[:, None] < G) & (j[None, :] < CG)  # (BLOCK_G, BLOCK_CG)
            mask = (rows[:, None, None] < HW) & mask_c[None, :, :]
            offs = rows[:, None, None].to(tl.int64) * C + (g * CG)[None, :, None] + j[None, None, :]
            base = n.to(tl.int64) * HW * C
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Stats + n * G + g, mask=g < G, other=0.0)
            rstd = tl.load(Stats + NG + n * G + g, mask=g < G, other=0.0)
            channel = (g * CG)[:, None] + j[None, :]  # (BLOCK_G, BLOCK_CG)
            scale = tl.broadcast_to(rstd[:, None], (BLOCK_G, BLOCK_CG))
            if W is not None:
                scale = scale * tl.load(W + channel, mask=mask_c, other=0.0).to(tl.float32)
            shift = -mean[:, None] * scale
            if B is not None:
                shift += tl.load(B + channel, mask=mask_c, other=0.0).to(tl.float32)
            y = x * scale[None, :, :] + shift[None, :, :]
        else:
            ng = row
            group_size = CG * HW
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            mask = offs < group_size
            base = ng.to(tl.int64) * group_size
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Stats + ng)
            rstd = tl.load(Stats + NG + ng)
            channel = (ng % G) * CG + offs // HW  # neighbours share a channel: these gathers hit L1
            scale = tl.full([BLOCK], 1.0, tl.float32) * rstd
            if W is not None:
                scale = scale * tl.load(W + channel, mask=mask, other=0.0).to(tl.float32)
            shift = -mean * scale
            if B is not None:
                shift += tl.load(B + channel, mask=mask, other=0.0).to(tl.float32)
            y = x * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


def channels_last_perm(dim: int) -> tuple[int, ...]:
    """The permutation that makes a channels_last (N, C, *spatial) tensor contiguous: (0, 2, ..., 1)."""
    return (0, *range(2, dim), 1)


def check_group_norm_inputs(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, activation: Optional[str]) -> None:
    """Raise ValueError naming the bad value when the Triton kernels cannot compute this GroupNorm."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must divide the {channels} channels, got {num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({channels},)")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    row = triton.next_power_of_2(num_groups) * triton.next_power_of_2(channels // num_groups) if triton else 0
    if row > MAX_ROW and _is_channels_last(x):
        raise ValueError(f"channels_last x with {channels} channels in {num_groups} groups needs {row} elements "
                         f"per pixel tile, over the kernel's limit {MAX_ROW}")
    check_triton_device(x)


def _is_channels_last(x: Tensor) -> bool:
    """True when x is dense with channels innermost (and not also plainly contiguous)."""
    return not x.is_contiguous() and x.permute(channels_last_perm(x.dim())).is_contiguous()


@torch.library.custom_op("fastdiff::triton_group_norm", mutates_args=())
def _group_norm_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   activation: Optional[str]) -> Tensor:
    batch, channels = x.shape[:2]
    hw = x.numel() // (batch * channels)
    cg = channels // num_groups
    channels_last = _is_channels_last(x)
    y = torch.empty_like(x)  # same layout as x
    if channels_last:
        block_g, block_cg = triton.next_power_of_2(num_groups), triton.next_power_of_2(cg)
        rows = max(1, TILE // (block_g * block_cg))
        tiles, block = triton.cdiv(hw, rows), 1
        grid_rows = batch  # one tile covers every group of its pixels
    else:
        block_g = block_cg = rows = 1
        block = min(TILE, triton.next_power_of_2(cg * hw))
        tiles = triton.cdiv(cg * hw, block)
        grid_rows = batch * num_groups
    ng = batch * num_groups
    partials = torch.empty((3, ng, tiles), device=x.device, dtype=torch.float32)
    stats = torch.empty((2, ng), device=x.device, dtype=torch.float32)
    meta = dict(CHANNELS_LAST=channels_last, BLOCK=block, ROWS=rows, BLOCK_G=block_g, BLOCK_CG=block_cg)
    warps = 8 if TILE >= 4096 else 4
    _group_norm_stats_kernel[(tiles, grid_rows)](x, partials, ng, hw, channels, num_groups, cg, tiles,
                                                 num_warps=warps, **meta)
    _group_norm_finalize_kernel[(ng,)](partials, stats, ng, tiles, eps,
                                       BLOCK_P=min(PARTIAL_BLOCK, triton.next_power_of_2(tiles)))
    _group_norm_apply_kernel[(tiles, grid_rows)](x, y, stats, weight, bias, ng, hw, channels, num_groups, cg, tiles,
                                                 SILU=activation == "silu", num_warps=warps, **meta)
    return y


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, activation):
    return torch.empty_like(x)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """GroupNorm over x: (N, C, *spatial), then `activation` (None or "silu"), with the Triton kernels.

    x: float16, bfloat16 or float32, contiguous or channels_last (other strides are made contiguous);
    weight, bias: (C,) in x's dtype, or None. Statistics in float32. Returns x's shape, dtype and layout.
    Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_group_norm_inputs(x, num_groups, weight, bias, eps, activation)
    if not x.is_contiguous() and not _is_channels_last(x):
        x = x.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if x.numel() == 0:
        return torch.empty_like(x)
    return _group_norm_op(x, num_groups, weight, bias, float(eps), activation)
