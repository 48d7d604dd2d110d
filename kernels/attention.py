"""Attention: softmax(q k^T * scale) v, non-causal.

Layouts: q (B, H, Sq, D), k and v (B, H, Skv, D) -> out (B, H, Sq, D).

`attention` is one Triton kernel with two paths, chosen by the length of the key sequence:
  streaming  (self-attention, Skv > 128): FlashAttention-2's forward pass. Each program owns BLOCK_M query
             rows, walks the keys in blocks of BLOCK_N and keeps a running max and sum (online softmax), so
             the (Sq, Skv) score matrix never reaches memory. Head dims that are not a power of two (SD1.5's
             40, 80, 160) are split into two power-of-two slices D = D1 + D2 (40 = 32 + 16 with 8 masked,
             80 = 64 + 16, 160 = 128 + 32), each with its own matmuls, so the tensor cores do 48 / 80 / 160
             columns of work instead of padding to 64 / 128 / 256. Where the second slice has a spare
             column (D = 40: 8), v's padding there reads as ones, so p @ v also sums p: the row sum costs
             no adds (8% faster at SD1.5's 4096 x 4096 on an H200).
  on-chip    (cross-attention on the 77 text tokens, Skv <= 128, D <= 128): all keys and values of a head
             fit one block, loaded once per program; the program then loops over query tiles with an exact
             single-pass softmax. This path is bound by reading q and writing the output, so the head dim is
             padded to a power of two (masked columns cost registers, not memory traffic).
Scores, softmax and the output accumulate in float32 in both. Cross-attention at D = 160 streams 64-key
blocks instead (a 256-wide padded tile does not fit shared memory).
"""
import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16  # tl.dot's smallest reduction width
MAX_HEAD_DIM = 256  # D1 + D2 columns of float32 accumulator per query row must stay in registers
MAX_ONCHIP_KEYS = 128  # the cross-attention path holds up to this many keys (77 for CLIP) in one block
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis, which walks B * H
ONCHIP_PROGRAMS_PER_SM = 4  # on-chip path: resident programs per SM that loop over query tiles


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Plain-PyTorch twin: scores and softmax in float32 (float64 stays float64), output in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Sq, Skv)
    return torch.matmul(scores.softmax(dim=-1), v.to(acc)).to(q.dtype)


def has_spare_column(head_dim: int) -> bool:
    """Whether the streaming path's two column slices leave a padding column, where p @ v sums p (D = 40)."""
    d1, d2 = head_dim_split(head_dim)
    return d1 + d2 > head_dim > d1


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(D1, D2): power-of-two column slices covering head_dim, each at least 16 wide (tl.dot's minimum).

    D1 is the largest power of two <= head_dim (head_dim >= 16); D2 covers the rest (0 when D1 covers all).
    """
    d1 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d1
    d2 = 0 if rest <= 0 else max(16, _triton.next_power_of_2(rest))
    return d1, d2


class AttentionConfig(NamedTuple):
    """One launch configuration of the kernel."""

    block_m: int  # query rows per program (per tile, on the on-chip path)
    block_n: int  # keys per block
    warps: int
    stages: int  # software-pipeline stages of the key loop


# Candidates per path, (BLOCK_M, BLOCK_N, warps, stages). The streaming path's (self-attention) are timed per
# shape by benchmarks/tune.py, whose pick the tuning table gives `fastdiff.ops`. The on-chip path (the 77-token
# cross-attention) has one per key block width (BLOCK_N = next_power_of_2(Skv) >= 16), 64 x 4 warps; past D_PAD
# 128 short keys stream in 64 x 64 x 4 warps (32-row tiles where 64 rows of accumulators would spill: D 256).
# float32 runs exact fp32 dots on CUDA cores: small tiles, no spills.
_STREAM_GRID = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (256, 64, 8, 3), (32, 64, 4, 2)]
_SHORT_KEYS_STREAM = [(64, 64, 4, 3), (32, 64, 4, 2)]  # the second for D 256, whose 64 rows would spill
_ONCHIP = (64, 4, 2)  # (BLOCK_M, warps, stages) of the on-chip path
_FP32 = (32, 32, 4, 2)


@functools.lru_cache(maxsize=None)
def candidate_configs(dtype: torch.dtype, seq_kv: int, head_dim: int) -> tuple[AttentionConfig, ...]:
    """The configs that suit a call, the default first: on-chip for short keys, small tiles for float32, no more
    than 80 float32 accumulators per thread (past that the kernel spills registers)."""
    d1, d2 = head_dim_split(head_dim)
    d_pad = _triton.next_power_of_2(head_dim)
    width = d1 + d2  # the streaming path's accumulator columns
    if dtype == torch.float32:
        grid = [_FP32]
    elif seq_kv <= MAX_ONCHIP_KEYS and d_pad <= 128:  # all keys in one block, padded head dim on chip
        m, w, s = _ONCHIP
        grid, width = [(m, max(16, _triton.next_power_of_2(seq_kv)), w, s)], d_pad
    elif seq_kv <= MAX_ONCHIP_KEYS:  # D_PAD 256 does not fit shared memory on chip
        grid = _SHORT_KEYS_STREAM
    elif width > 128:  # three stages of 128-key blocks overflow shared memory past 128 columns
        grid = [c for c in _STREAM_GRID if c[1] <= 64]
    else:
        grid = _STREAM_GRID
    return tuple(AttentionConfig(*c) for c in grid if c[0] * width <= 80 * 32 * c[2])


def default_config(dtype: torch.dtype, seq_kv: int, head_dim: int) -> AttentionConfig:
    """The config a call runs with when its caller names none."""
    return candidate_configs(dtype, seq_kv, head_dim)[0]


if triton is not None:

    # Sq and Skv not specialized: they only bound loops and masks (EVEN_N says when the key blocks are full), and
    # a new size must not compile a variant of its own.
    @triton.jit(do_not_specialize=["Sq", "Skv"])
    def _attention_kernel(
        Q,  # pointer to q, shape (B, H, Sq, D), any strides
        K,  # pointer to k, shape (B, H, Skv, D), any strides
        V,  # pointer to v, shape (B, H, Skv, D), any strides
        Out,  # pointer to the output, shape (B, H, Sq, D), any strides
        stride_qb, stride_qh, stride_qm, stride_qd,  # q strides, in elements
        stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
        stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
        stride_ob, stride_oh, stride_om, stride_od,  # output strides
        H,  # number of heads
        Sq,  # query length
        Skv,  # key/value length
        qk_scale,  # softmax scale * log2(e): scores go through exp2
        HEAD_DIM: tl.constexpr,  # D
        D1: tl.constexpr,  # first power-of-two column slice
        D2: tl.constexpr,  # second slice (0: none); D1 + D2 >= D, extra columns masked
        D_PAD: tl.constexpr,  # next_power_of_2(D): the single-pass path's padded head dim
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32 rounding)
        STRIDE_ALIGN: tl.constexpr,  # power of two dividing every batch/head/row stride: lets loads vectorize
        BLOCK_M: tl.constexpr,  # query rows per program
        BLOCK_N: tl.constexpr,  # keys per block
        EVEN_N: tl.constexpr,  # Skv % BLOCK_N == 0
        SINGLE_PASS: tl.constexpr,  # all keys in one block (Skv <= BLOCK_N): the on-chip path
        SPARE_COLUMN: tl.constexpr,  # D1 + D2 > HEAD_DIM: column HEAD_DIM of the v2 slice sums p (streaming)
    ):
        # The JIT only learns divisibility by 16 by itself; D = 40 rows are 80 bytes, still 16-byte aligned.
        # (x // A * A is x here, but it tells the compiler x is a multiple of A, so loads vectorize.)
        stride_qb = stride_qb // STRIDE_ALIGN * STRIDE_ALIGN
        stride_qh = stride_qh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_qm = stride_qm // STRIDE_ALIGN * STRIDE_ALIGN
        stride_kb = stride_kb // STRIDE_ALIGN * STRIDE_ALIGN
        stride_kh = stride_kh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_kn = stride_kn // STRIDE_ALIGN * STRIDE_ALIGN
        stride_vb = stride_vb // STRIDE_ALIGN * STRIDE_ALIGN
        stride_vh = stride_vh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_vn = stride_vn // STRIDE_ALIGN * STRIDE_ALIGN
        stride_ob = stride_ob // STRIDE_ALIGN * STRIDE_ALIGN
        stride_oh = stride_oh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_om = stride_om // STRIDE_ALIGN * STRIDE_ALIGN
        # torch.compile types Python floats as float64 (inductor keeps their precision); a float64 scale would
        # promote the scores, the running max and the accumulators, which must stay float32.
        qk_scale = tl.cast(qk_scale, tl.float32)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        Out += b * stride_ob + h * stride_oh

        offs_n = tl.arange(0, BLOCK_N)
        if SINGLE_PASS:
            # All keys in one block, loaded once: exact softmax, no running max. The program then walks
            # query tiles pid_m, pid_m + programs, ... so the next q tile loads while this one computes.
            # The path is bound by reading q and writing the output, so the head dim is simply padded
            # to D_PAD columns (masked, never read).
            offs_d = tl.arange(0, D_PAD)
            mask_d = offs_d < HEAD_DIM
            mask_n = offs_n < Skv
            k = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (D_PAD, BLOCK_N): k transposed
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, D_PAD)
            for tile in range(pid_m, tl.cdiv(Sq, BLOCK_M), tl.num_programs(0)):
                offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_m = offs_m < Sq
                q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, D_PAD)
                s = tl.dot(q, k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) float32
                s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
                p = tl.math.exp2(s - tl.max(s, 1)[:, None])
                l_i = tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # (BLOCK_M, D_PAD)
                out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
                tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out,
                         mask=mask_m[:, None] & mask_d[None, :])
        else:
            # One query tile per program; stream over key blocks with a running max m_i and sum l_i
            # (online softmax). The head dim is split into two power-of-two slices so no tensor-core
            # work is spent on padding.
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Sq
            offs_d1 = tl.arange(0, D1)
            q1 = tl.load(Q + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd,
                         mask=mask_m[:, None], other=0.0)  # (BLOCK_M, D1)
            # k is read transposed, (D, BLOCK_N), so q @ k^T is a plain dot
            k1_ptrs = K + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd  # (D1, BLOCK_N)
            v1_ptrs = V + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd  # (BLOCK_N, D1)
            acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
            if D2 > 0:
                offs_d2 = D1 + tl.arange(0, D2)
                mask_d2 = offs_d2 < HEAD_DIM
                q2 = tl.load(Q + offs_m[:, None] * stride_qm + offs_d2[None, :] * stride_qd,
                             mask=mask_m[:, None] & mask_d2[None, :], other=0.0)  # (BLOCK_M, D2)
                k2_ptrs = K + offs_n[None, :] * stride_kn + offs_d2[:, None] * stride_kd  # (D2, BLOCK_N)
                v2_ptrs = V + offs_n[:, None] * stride_vn + offs_d2[None, :] * stride_vd  # (BLOCK_N, D2)
                acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of p, unless v2's spare column sums it
            for start_n in range(0, Skv, BLOCK_N):
                mask_n = (start_n + offs_n) < Skv
                if EVEN_N:
                    k1 = tl.load(k1_ptrs)
                else:
                    k1 = tl.load(k1_ptrs, mask=mask_n[None, :], other=0.0)
                s = tl.dot(q1, k1, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) float32
                if D2 > 0:
                    if EVEN_N:
                        k2 = tl.load(k2_ptrs, mask=mask_d2[:, None], other=0.0)
                    else:
                        k2 = tl.load(k2_ptrs, mask=mask_d2[:, None] & mask_n[None, :], other=0.0)
                    s = tl.dot(q2, k2, s, input_precision=DOT_PRECISION)
                if not EVEN_N:
                    s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
                if not SPARE_COLUMN:
                    l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
                p = p.to(q1.dtype)
                if EVEN_N:
                    v1 = tl.load(v1_ptrs)
                else:
                    v1 = tl.load(v1_ptrs, mask=mask_n[:, None], other=0.0)
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
                if D2 > 0:
                    # With a spare column, v2's padding columns load as ones, so acc2's column HEAD_DIM
                    # sums p on the tensor cores (p is 0 at masked keys, whatever their row loads).
                    if EVEN_N:
                        v2 = tl.load(v2_ptrs, mask=mask_d2[None, :], other=1.0 * SPARE_COLUMN)
                    else:
                        v2 = tl.load(v2_ptrs, mask=mask_n[:, None] & mask_d2[None, :], other=1.0 * SPARE_COLUMN)
                    acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
                    k2_ptrs += BLOCK_N * stride_kn
                    v2_ptrs += BLOCK_N * stride_vn
                k1_ptrs += BLOCK_N * stride_kn
                v1_ptrs += BLOCK_N * stride_vn
            if SPARE_COLUMN:
                l_i = tl.sum(tl.where(offs_d2[None, :] == HEAD_DIM, acc2, 0.0), 1)
            inv_l = 1.0 / l_i
            out1 = (acc1 * inv_l[:, None]).to(Out.dtype.element_ty)
            tl.store(Out + offs_m[:, None] * stride_om + offs_d1[None, :] * stride_od, out1, mask=mask_m[:, None])
            if D2 > 0:
                out2 = (acc2 * inv_l[:, None]).to(Out.dtype.element_ty)
                tl.store(Out + offs_m[:, None] * stride_om + offs_d2[None, :] * stride_od, out2,
                         mask=mask_m[:, None] & mask_d2[None, :])

    _attention_launcher = _triton.Launcher(_attention_kernel)  # repeat launches skip Triton's Python


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot compute attention(q, k, v)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape (B, H, Skv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D "
                         "(q: (B, H, Sq, D), k: (B, H, Skv, D))")
    if q.dtype not in DTYPES:
        raise ValueError(f"q has dtype {q.dtype}, expected one of {DTYPES}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    head_dim = q.shape[3]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported, expected {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Sq={q.shape[2]} and Skv={k.shape[2]}")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise ValueError(f"B * H = {q.shape[0] * q.shape[1]} exceeds the kernel's limit {MAX_GRID_Y}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    check_triton_device(q)


def _stride_align(*tensors: Tensor) -> int:
    """The largest power of two (<= 16) dividing every batch, head and row stride of `tensors`."""
    align = 16
    for t in tensors:
        for stride in t.stride()[:3]:
            while stride % align:
                align //= 2
    return align


def empty_output(q: Tensor) -> Tensor:
    """The output buffer for q (B, H, Sq, D). A q whose head stride is below its row stride views a (B, Sq, H, D)
    buffer (a projection's output, or a slice of a fused (B, S, 3, H, D) QKV one): the output gets that layout,
    seen as (B, H, Sq, D), so that the caller's (B, Sq, H * D) view of it is free instead of a copy, as with
    SDPA's output. Any other q: empty_like (q's layout when q is dense, else contiguous)."""
    if q.stride(1) < q.stride(2):
        batch, heads, seq_q, head_dim = q.shape
        return q.new_empty((batch, seq_q, heads, head_dim)).transpose(1, 2)
    return torch.empty_like(q)


def _attention_run(kernel, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float],
                   config: Optional[AttentionConfig]) -> Tensor:
    """Launch `kernel` (the Launcher, or the kernel wrapped by wrap_triton while torch.compile traces) with
    `config`, or the default config for the call."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_m, block_n, warps, stages = config or default_config(q.dtype, seq_kv, head_dim)
    d_pad = _triton.next_power_of_2(head_dim)
    single_pass = seq_kv <= block_n and d_pad <= 128  # all keys in one block, the padded head dim on chip
    out = empty_output(q)
    d1, d2 = head_dim_split(head_dim)
    tiles = _triton.cdiv(seq_q, block_m)
    if single_pass:  # a few programs per SM, each looping over query tiles
        tiles = min(tiles, _triton.cdiv(ONCHIP_PROGRAMS_PER_SM * _triton.sm_count(q.device), batch * heads))
    kernel[(tiles, batch * heads)](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, seq_kv,
        scale * 1.4426950408889634,  # log2(e)
        HEAD_DIM=head_dim, D1=d1, D2=d2, D_PAD=d_pad,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STRIDE_ALIGN=_stride_align(q, k, v, out), BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=seq_kv % block_n == 0,
        SINGLE_PASS=single_pass, SPARE_COLUMN=has_spare_column(head_dim), num_warps=warps, num_stages=stages,
    )
    return out


def _attention_launch(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], config: Optional[list[int]]) -> Tensor:
    return _attention_run(_attention_launcher, q, k, v, scale, config)


def _attention_traced(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], config: Optional[list[int]]) -> Tensor:
    return _attention_run(wrap_triton(_attention_kernel), q, k, v, scale, config)


# The op torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_attention_op = _triton.CompileOp("fastdiff::triton_attention", _attention_launch, _attention_traced,
                                  fake=lambda q, k, v, scale, config: empty_output(q))


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
              config: Optional[AttentionConfig] = None) -> Tensor:
    """softmax(q k^T * scale) v with the Triton kernel; scale defaults to 1/sqrt(D).

    q: (B, H, Sq, D); k, v: (B, H, Skv, D); any strides (e.g. transposed views of (B, S, H, D) buffers).
    float16, bfloat16 or float32, 16 <= D <= 256, any Sq, Skv >= 1. Returns (B, H, Sq, D) in q's dtype, in a
    (B, Sq, H, D) layout when q views such a buffer, else in q's layout when q is dense (`empty_output`).
    Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1. `config`: one of
    `candidate_configs(q.dtype, Skv, D)` (fastdiff's tuning tables pick it per GPU and shape), else the default.
    """
    check_attention_inputs(q, k, v, scale)
    if q.numel() == 0:
        return empty_output(q)
    if config is not None and config not in candidate_configs(q.dtype, k.shape[2], q.shape[3]):
        raise ValueError(f"config {config} does not suit dtype {q.dtype}, Skv {k.shape[2]}, head dim {q.shape[3]}; "
                         f"expected one of {candidate_configs(q.dtype, k.shape[2], q.shape[3])}")
    op = _attention_op if torch.compiler.is_compiling() else _attention_launch
    return op(q, k, v, scale, None if config is None else list(config))
