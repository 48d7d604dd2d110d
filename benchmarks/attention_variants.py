"""Variants of the attention kernel's head-dim-40 streaming loop, timed beside cuDNN's SDPA and fastdiff's kernel.

    python benchmarks/attention_variants.py [REGEX]   (on one CUDA GPU; writes attention_variants.json to $OUT or .)

A copy of `kernels/attention.py`'s loop for D = 40 (32 + 16 columns, v's padding column loaded as ones so that
the second product also sums p, full key blocks, one (1, S, 3, BH, D) QKV buffer as the engine's fused
projections give it). Each key block is NA columns whose softmax exponentials run on the special-function unit
(`exp2`) and NB columns whose run on the FMA pipe (`_exp2_poly`: a Cody-Waite split and a degree-3 polynomial,
1.1e-4 relative error), so that both pipes share the exponentials; POLY_A = 1 puts the NA columns on the
polynomial too, POLY_A = 2 on the special-function unit in float16, two per instruction (`_exp2_half`). WS asks
Triton's automatic warp specialization for the loop. CUDA-graph replay over input sets rotated past the L2 cache
(benchmarks/timing.py), with each variant's error against a float32 reference; a variant that does not compile is
recorded as its error. REGEX keeps the variants whose names it matches (re.search).
"""
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from timing import graph_ms  # noqa: E402

from fastdiff import tuning  # noqa: E402
from fastdiff.kernels import attention as fd_attention  # noqa: E402

@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA pipe: x = n + f with n = round(x) (1.5 * 2^23 added and taken away leaves n in j's
    low mantissa bits), 2^f for f in [-1/2, 1/2] by a degree-3 fit of the relative error, n added to its exponent."""
    x = tl.maximum(x, -125.0)  # 2^-125 is 0 in float16; lower, the exponent would wrap
    j = x + 12582912.0
    f = x - (j - 12582912.0)
    p = f * 0.05459282809704227 + 0.24221838062367185
    p = p * f + 0.6933686887920784
    p = p * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (j.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_poly_kernel(X, Y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + o, _exp2_poly(tl.load(X + o, mask=o < n)), mask=o < n)


@triton.jit
def _exp2_half(x):
    """2^x rounded to float16 on the special-function unit, two values per instruction (`ex2.approx.f16x2`): x is
    rounded to float16 first, so its error grows with |x| (2^-11 |x| ln 2 relative), which weights the small p."""
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def _chunk_s(q1, q2, K, offs_n, offs_d1, offs_d2, mask_d2, skn):
    """Scores of q's (32 + 16)-column halves against the key rows offs_n."""
    k1 = tl.load(K + offs_n[None, :] * skn + offs_d1[:, None])
    s = tl.dot(q1, k1)
    k2 = tl.load(K + offs_n[None, :] * skn + offs_d2[:, None], mask=mask_d2[:, None], other=0.0)
    return tl.dot(q2, k2, s)


@triton.jit
def _chunk_pv(p, V, acc1, acc2, offs_n, offs_d1, offs_d2, mask_d2, svn):
    """acc += p v over the value rows offs_n; acc2's column HEAD_DIM sums p (v's padding loads as ones)."""
    v1 = tl.load(V + offs_n[:, None] * svn + offs_d1[None, :])
    acc1 = tl.dot(p, v1, acc1)
    v2 = tl.load(V + offs_n[:, None] * svn + offs_d2[None, :], mask=mask_d2[None, :], other=1.0)
    acc2 = tl.dot(p, v2, acc2)
    return acc1, acc2


@triton.jit(do_not_specialize=["Skv"])
def _kern(Q, K, V, Out, sqm, skn, svn, som, sbh_q, sbh_k, sbh_v, sbh_o, Skv, qk_scale,
          HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr,
          NA: tl.constexpr, NB: tl.constexpr, POLY_A: tl.constexpr, WS: tl.constexpr):
    # every row and head stride is a multiple of 8 elements (D = 40 rows of 16-byte-aligned buffers)
    sqm, skn, svn, som = sqm // 8 * 8, skn // 8 * 8, svn // 8 * 8, som // 8 * 8
    sbh_q, sbh_k, sbh_v, sbh_o = sbh_q // 8 * 8, sbh_k // 8 * 8, sbh_v // 8 * 8, sbh_o // 8 * 8
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch 1: one index over the heads
    Q += bh * sbh_q
    K += bh * sbh_k
    V += bh * sbh_v
    Out += bh * sbh_o
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, NA)
    offs_d1 = tl.arange(0, D1)
    offs_d2 = D1 + tl.arange(0, D2)
    mask_d2 = offs_d2 < HEAD_DIM
    q1 = tl.load(Q + offs_m[:, None] * sqm + offs_d1[None, :])
    q2 = tl.load(Q + offs_m[:, None] * sqm + offs_d2[None, :], mask=mask_d2[None, :], other=0.0)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in tl.range(0, Skv, NA + NB, warp_specialize=WS):
        s_a = _chunk_s(q1, q2, K, start_n + offs_a, offs_d1, offs_d2, mask_d2, skn)
        row_max = tl.max(s_a, 1)
        if NB > 0:
            offs_b = start_n + NA + tl.arange(0, NB)
            s_b = _chunk_s(q1, q2, K, offs_b, offs_d1, offs_d2, mask_d2, skn)
            row_max = tl.maximum(row_max, tl.max(s_b, 1))
        m_new = tl.maximum(m_i, row_max * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        m_i = m_new
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        if POLY_A == 2:
            p_a = _exp2_half(s_a * qk_scale - m_new[:, None]).to(Q.dtype.element_ty)
        elif POLY_A:
            p_a = _exp2_poly(s_a * qk_scale - m_new[:, None]).to(Q.dtype.element_ty)
        else:
            p_a = tl.math.exp2(s_a * qk_scale - m_new[:, None]).to(Q.dtype.element_ty)
        acc1, acc2 = _chunk_pv(p_a, V, acc1, acc2, start_n + offs_a, offs_d1, offs_d2, mask_d2, svn)
        if NB > 0:
            p_b = _exp2_poly(s_b * qk_scale - m_new[:, None]).to(Q.dtype.element_ty)
            acc1, acc2 = _chunk_pv(p_b, V, acc1, acc2, offs_b, offs_d1, offs_d2, mask_d2, svn)
    l_i = tl.sum(tl.where(offs_d2[None, :] == HEAD_DIM, acc2, 0.0), 1)
    inv_l = 1.0 / l_i
    tl.store(Out + offs_m[:, None] * som + offs_d1[None, :], (acc1 * inv_l[:, None]).to(Out.dtype.element_ty))
    tl.store(Out + offs_m[:, None] * som + offs_d2[None, :], (acc2 * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=mask_d2[None, :])


def run_variant(q, k, v, out, bm, na, nb, warps, stages, poly_a, ws):
    """Launch the variant on q, k, v (1, BH, S, 40) views of one QKV buffer, into out."""
    batch, heads, seq, head_dim = q.shape
    assert batch == 1 and head_dim == 40 and seq % (na + nb) == 0
    meta = dict(HEAD_DIM=head_dim, D1=32, D2=16, BLOCK_M=bm, NA=na, NB=nb, POLY_A=poly_a, WS=ws,
                num_warps=warps, num_stages=stages)
    _kern[(triton.cdiv(seq, bm), heads)](q, k, v, out, q.stride(2), k.stride(2), v.stride(2), out.stride(2),
                                        q.stride(1), k.stride(1), v.stride(1), out.stride(1), seq,
                                        head_dim ** -0.5 * 1.4426950408889634, **meta)


# (BLOCK_M, NA (exp2 columns), NB (polynomial columns), warps, stages, POLY_A (A columns polynomial too), WS)
VARIANTS = [
    (128, 128, 0, 8, 3, 0, 0), (128, 64, 0, 4, 3, 0, 0), (128, 128, 0, 8, 3, 1, 0),
    (128, 64, 64, 8, 3, 0, 0), (128, 64, 64, 8, 2, 0, 0), (128, 64, 32, 8, 3, 0, 0), (128, 64, 32, 4, 3, 0, 0),
    (128, 128, 64, 8, 3, 0, 0), (128, 128, 64, 8, 2, 0, 0), (128, 128, 16, 8, 3, 0, 0), (128, 32, 16, 4, 3, 0, 0),
    (64, 64, 32, 4, 3, 0, 0), (128, 128, 0, 8, 3, 0, 1), (128, 64, 0, 4, 3, 0, 1), (128, 64, 32, 8, 3, 0, 1),
    (128, 128, 0, 8, 3, 2, 0), (128, 64, 0, 4, 3, 2, 0), (128, 128, 0, 8, 2, 2, 0), (128, 64, 0, 8, 3, 2, 0),
    (128, 128, 0, 8, 3, 2, 1),
]


def main(pattern: str = ""):
    torch.manual_seed(0)
    rows = []
    x = torch.linspace(-30, 0, 100001, device="cuda")
    y = torch.empty_like(x)
    _exp2_poly_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    print("poly exp2 max rel err", ((y - torch.exp2(x)).abs() / torch.exp2(x)).max().item(), flush=True)
    for BH, S in ((16, 9216), (16, 6144), (16, 4096)):
        D = 40
        n_sets = max(1, min(8, -(-3 * 50 * 2**20 // (BH * S * D * 2 * 4))))  # q, k, v, out past 3x the L2
        sets = []
        for _ in range(n_sets):
            qkv = torch.randn(1, S, 3, BH, D, device="cuda", dtype=torch.float16)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = torch.empty(1, S, BH, D, device="cuda", dtype=torch.float16).transpose(1, 2)
            sets.append((q, k, v, out))
        q, k, v, out = sets[0]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def t(fn):
            ms, _ = graph_ms([lambda s=s: fn(*s) for s in sets])
            return ms * 1e3

        res = dict(BH=BH, S=S)
        res["cudnn"] = round(t(lambda q, k, v, o: F.scaled_dot_product_attention(q, k, v)), 1)
        err_t = ((F.scaled_dot_product_attention(q, k, v).float() - ref).norm() / ref.norm()).item()
        res["err_cudnn"] = f"{err_t:.1e}"
        choice = tuning.attention_choice(q, k)
        cfg = choice[1] if choice else None
        res["table"] = str(choice)
        res["fastdiff"] = round(t(lambda q, k, v, o: fd_attention(q, k, v, config=cfg)), 1)
        for bm, na, nb, w, st, pa, ws in VARIANTS:
            name = f"{bm}m{na}a{nb}b_w{w}s{st}{['', 'P', 'H'][pa]}{'W' if ws else ''}"
            if S % (na + nb) or not re.search(pattern, name):
                continue
            try:
                out.zero_()
                run_variant(q, k, v, out, bm, na, nb, w, st, pa, ws)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = t(lambda q, k, v, o: run_variant(q, k, v, o, bm, na, nb, w, st, pa, ws))
                res[name] = (round(us, 1), f"{err:.1e}")
            except Exception as e:  # a variant that does not compile or fit: recorded, the others still run
                res[name] = repr(e)[:160]
        rows.append(res)
        print(json.dumps(res), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "attention_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
