"""The Triton attention kernel against attention_ref.

CPU: the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) on small odd shapes that hit
both paths: on-chip (Skv <= 128, a single-pass softmax) and streaming (Skv > 128, online softmax with a
ragged last key block). GPU (`-m gpu`): every dtype on the SD shapes, judged against torch's own error.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.kernels.attention import attention, attention_ref
from cuda_graphs import capture

attention_module = importlib.import_module("fastdiff.kernels.attention")  # the package re-exports the function
triton_helpers = importlib.import_module("fastdiff.kernels._triton")

# Interpreter results against a float64 reference: dtype, atol, rtol. Low precision is dominated by the
# rounding of the output (and of p to the input dtype before p @ v).
CPU_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, marks=pytest.mark.skipif(
        triton_helpers.INTERPRET, reason="triton's interpreter multiplies bfloat16 tl.dot operands as raw uint16 "
        "bits (seen with triton 3.9); bfloat16 is covered by the GPU tests")),
]


def _inputs(batch, heads, seq_q, seq_kv, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads, seq_q, head_dim, device=device).to(dtype)
    k = torch.randn(batch, heads, seq_kv, head_dim, device=device).to(dtype)
    v = torch.randn(batch, heads, seq_kv, head_dim, device=device).to(dtype)
    return q, k, v


def _report(name, out, ref):
    err = (out.double() - ref.double()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
    return err


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES)
@pytest.mark.parametrize("seq_q, seq_kv, head_dim", [
    (97, 77, 40),  # cross-attention on CLIP's 77 tokens: on-chip path, D = 32 + 16 with 8 masked
    (97, 150, 40),  # self-attention: streaming path with a ragged last key block
    (33, 130, 80),  # D = 64 + 16, no masked columns
    (17, 5, 160),  # D = 128 + 32, fewer keys than one block: streams (a 256-wide padded tile is too big)
    (20, 9, 64),  # a few keys: on-chip path in every dtype (float32 tiles hold 32 keys)
])
def test_attention_matches_reference_on_odd_shapes(seq_q, seq_kv, head_dim, dtype, atol, rtol):
    q, k, v = _inputs(1, 2, seq_q, seq_kv, head_dim, dtype)
    out = attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    _report(f"{dtype} {seq_q}x{seq_kv} D{head_dim}", out, ref)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("seq_kv, head_dim", [(150, 40), (150, 160), (5, 256), (150, 256)])
def test_attention_matches_reference_with_every_candidate_config(seq_kv, head_dim):
    """Every config the tuning tables may name for a call computes the same attention (float16: the streaming
    paths' candidates; D 256 has only the 32-row tiles that do not spill)."""
    q, k, v = _inputs(1, 1, 37, seq_kv, head_dim, torch.float16)
    ref = attention_ref(q.double(), k.double(), v.double())
    configs = attention_module.candidate_configs(torch.float16, seq_kv, head_dim)
    assert configs and configs[0] == attention_module.default_config(torch.float16, seq_kv, head_dim)
    for config in configs:
        out = attention(q, k, v, config=config)
        _report(f"{config} {seq_kv} keys D{head_dim}", out, ref)
        torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_attention_refuses_a_config_that_does_not_suit_the_call():
    q, k, v = _inputs(1, 1, 8, 150, 40, torch.float16)
    with pytest.raises(ValueError, match=r"config .* does not suit dtype torch.float16, Skv 150, head dim 40"):
        attention(q, k, v, config=attention_module.AttentionConfig(64, 16, 4, 2))


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES[:2])
@pytest.mark.parametrize("head_dim", [40, 80])  # 40: p summed by v's spare padding column; 80: no spare column
def test_attention_streaming_rescales_when_later_keys_score_far_higher(head_dim, dtype, atol, rtol):
    # Scores that grow block after block: the running max moves and the accumulators (and, at D = 40, the
    # row sum in v's spare column) are rescaled at every key block.
    q, k, v = _inputs(1, 2, 37, 200, head_dim, torch.float32)
    k = k * torch.linspace(0.2, 6.0, 200)[None, None, :, None]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    _report(f"{dtype} growing scores D{head_dim}", out, ref)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_attention_takes_strided_views_and_keeps_their_layout():
    # Model code hands over transposed views of (B, S, H, D) projections; no copy should be needed.
    q, k, v = (t.transpose(1, 2) for t in (torch.randn(1, 97, 2, 40), torch.randn(1, 77, 2, 40),
                                           torch.randn(1, 77, 2, 40)))
    scale = 0.3
    out = attention(q, k, v, scale)
    ref = attention_ref(q.double(), k.double(), v.double(), scale)
    _report("strided views", out, ref)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_output_of_a_fused_qkv_slice_is_a_free_token_view():
    # q, k, v sliced from one (B, S, 3, H, D) projection are not dense; the output still comes in (B, S, H, D)
    # memory, so the model's (B, S, H * D) view of it needs no copy.
    qkv = torch.randn(2, 97, 3, 2, 40)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    _report("fused qkv slices", out, ref)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    tokens = out.transpose(1, 2).flatten(2)
    assert tokens.data_ptr() == out.data_ptr()  # a view, not a copy
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_head_dim_split_covers_every_column():
    for head_dim, split in {16: (16, 0), 40: (32, 16), 64: (64, 0), 80: (64, 16), 111: (64, 64), 128: (128, 0),
                            160: (128, 32), 256: (256, 0)}.items():
        d1, d2 = attention_module.head_dim_split(head_dim)
        print(head_dim, (d1, d2))
        assert (d1, d2) == split


@pytest.mark.parametrize("make_bad, message", [
    (lambda q, k, v: (q[0], k, v), "must be 4-D"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:1], v[:1]), "must agree on B, H and D"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "head dim 8 is not supported"),
    (lambda q, k, v: (q, k.half(), v), "k has dtype torch.float16, expected q's dtype torch.float32"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "q has dtype torch.float64"),
])
def test_attention_rejects_invalid_inputs(make_bad, message):
    q, k, v = _inputs(2, 2, 9, 7, 40, torch.float32)
    with pytest.raises(ValueError, match=message):
        attention(*make_bad(q, k, v))


def test_attention_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_helpers, "INTERPRET", False)
    q, k, v = _inputs(1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        attention(q, k, v)


def test_attention_op_traces_without_graph_breaks():
    q, k, v = _inputs(1, 2, 9, 7, 40, torch.float32)
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v))


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px, batch 2 (CFG), 8 heads: (Sq, Skv, D) per UNet level; SD2 / SDXL use head_dim 64; then
# odd sizes whose last query tile and last key block are both ragged.
GPU_SHAPES = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80), (256, 256, 160), (256, 77, 160),
              (4096, 4096, 64), (1024, 77, 64), (333, 300, 40), (333, 300, 80), (97, 1025, 111)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_q, seq_kv, head_dim", GPU_SHAPES)
def test_attention_error_on_gpu_at_most_twice_torch_error(seq_q, seq_kv, head_dim, dtype):
    q, k, v = _inputs(2, 8, seq_q, seq_kv, head_dim, dtype, "cuda")
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ref = attention_ref(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype))
    out = attention(q, k, v)
    ref_torch = F.scaled_dot_product_attention(q, k, v)
    err = _report(f"fastdiff {dtype} {seq_q}x{seq_kv} D{head_dim}", out, ref)
    err_torch = _report(f"torch    {dtype} {seq_q}x{seq_kv} D{head_dim}", ref_torch, ref)
    assert torch.isfinite(out).all()
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert err.max() <= 2 * err_torch.max() + floor
    assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
def test_attention_writes_every_output_element_on_gpu():
    q, k, v = _inputs(1, 3, 1000, 77, 80, torch.float16, "cuda")
    for _ in range(2):  # the first call compiles; the second runs the compiled kernel once
        out = attention(q, k, v)
    ref = attention_ref(q, k, v)
    _report("ragged Sq", out, ref)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_attention_survives_cuda_graph_capture():
    q, k, v = _inputs(2, 8, 256, 77, 40, torch.float16, "cuda")
    expected = attention(q, k, v)  # compiles outside the capture
    graph, out = capture(lambda: attention(q, k, v), warm=False)
    q.copy_(torch.randn_like(q))
    graph.replay()
    fresh = attention_ref(q, k, v)
    _report("graph replay", out, fresh)
    assert not torch.equal(expected, out)
    torch.testing.assert_close(out, fresh, atol=2e-3, rtol=2e-3)
    assert math.isfinite(out.float().sum().item())
