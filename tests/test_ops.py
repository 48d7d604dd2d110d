"""The ops seam: backend selection, forcing, and auto's fallback for shapes a kernel does not cover."""
import pytest
import torch

from fastdiff import ops


def test_auto_on_cpu_uses_reference_for_model_ops():
    assert ops.resolve("attention", "cpu") == "reference"
    assert ops.resolve("group_norm", "cpu") == "reference"
    assert ops.resolve("geglu", "cpu") == "reference"


def test_set_backend_rejects_unknown_names_and_unimplemented_pairs():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("tensorrt")
    with pytest.raises(ValueError, match="does not implement 'attention'"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="op must be one of"):
        ops.set_backend("reference", op="conv")


def test_use_backend_restores_previous_setting():
    before = {op: ops.get_backend(op) for op in ops.OPS}
    with ops.use_backend("reference"):
        assert all(ops.get_backend(op) == "reference" for op in ops.OPS)
    assert {op: ops.get_backend(op) for op in ops.OPS} == before


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("triton", op="group_norm"):
        with pytest.raises(RuntimeError, match="forced for group_norm but cannot run on cpu"):
            ops.group_norm(torch.randn(1, 4, 2, 2), 2)


def test_auto_falls_back_to_reference_for_head_dims_outside_the_kernel(monkeypatch):
    """A 512-wide head (the SD VAE's) or a 4-wide one must not reach the Triton kernel under auto."""
    monkeypatch.setattr(ops, "resolve", lambda op, device_type: "triton")
    used = []
    monkeypatch.setitem(ops._impl_cache, ("attention", "triton"), lambda *a: used.append("triton"))
    monkeypatch.setitem(ops._impl_cache, ("attention", "reference"), lambda *a: used.append("reference"))
    for d in (4, 512, 40):
        q = torch.randn(1, 1, 3, d)
        ops.attention(q, q, q)
    assert used == ["reference", "reference", "triton"]


def test_geglu_backends_agree():
    """The Triton GEGLU (interpreter on the CPU) and the reference behind the seam: one (..., 2N) -> (..., N)."""
    h = torch.randn(2, 9, 2 * 24)
    with ops.use_backend("reference", op="geglu"):
        ref = ops.geglu(h)
    with ops.use_backend("triton", op="geglu"):
        out = ops.geglu(h)
    err = (out - ref).abs()
    print(f"geglu triton vs reference: max {err.max():.2e} mean {err.mean():.2e}")
    assert out.shape == (2, 9, 24)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shape", [(2, 3, 97, 77, 40), (1, 1, 64, 64, 512), (2, 1, 33, 5, 19)],
                         ids=["odd", "vae_width", "tiny_keys"])
def test_matmul_attention_matches_sdpa_across_query_blocks(shape, monkeypatch):
    """Blocks of 10 queries (the limit set low) cover full blocks and a short last one."""
    B, H, Sq, Skv, D = shape
    monkeypatch.setattr(ops, "MATMUL_ATTENTION_SCORES", 10 * Skv)
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, Skv, D), torch.randn(B, H, Skv, D + 3)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    out = ops.matmul_attention(q, k, v, scale=0.3)
    print(f"{shape}: rel {_rel(out, ref):.2e}")
    assert out.shape == (B, H, Sq, D + 3) and out.dtype == q.dtype
    assert _rel(out, ref) <= 1e-6


def test_sdpa_attention_is_torchs_with_the_ops_signature():
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2)
    assert torch.equal(ops.sdpa_attention(q, k, v, 0.2), expected)
    torch.testing.assert_close(ops.sdpa_attention(q, k, v), ops.attention(q, k, v))  # default scale 1/sqrt(D)


def test_auto_attention_takes_matmul_past_the_kernels_widest_head():
    from fastdiff.kernels.attention import MAX_HEAD_DIM

    assert ops.attention_impl("auto", 512) is ops.matmul_attention  # SD's VAE: one head of 512
    assert ops.attention_impl("auto", MAX_HEAD_DIM + 1) is ops.matmul_attention
    assert ops.attention_impl("auto", MAX_HEAD_DIM) is not ops.matmul_attention
    assert ops.attention_impl("sdpa", 512) is ops.sdpa_attention


def test_attention_impl_names_each_preference_and_rejects_others():
    assert ops.attention_impl("fastdiff", 64) is ops.attention
    assert ops.attention_impl("sdpa", 64) is ops.sdpa_attention
    assert ops.attention_impl("matmul", 64) is ops.matmul_attention
    with pytest.raises(ValueError, match="attention preference must be one of"):
        ops.attention_impl("flash", 64)


def test_auto_attention_is_matmul_past_the_kernels_widest_head_and_per_call_below():
    picked = {d: ops.attention_impl("auto", d) for d in (40, 80, 160, 512)}
    print({d: fn.__name__ for d, fn in picked.items()})
    assert picked == {40: ops._auto_attention, 80: ops._auto_attention, 160: ops._auto_attention,
                      512: ops.matmul_attention}


def _auto_picks(monkeypatch, shapes, choice=None) -> list[str]:
    """What `ops._auto_attention` runs for q of each shape, with the tuning table's choice `choice` (None: no
    table)."""
    calls = []
    monkeypatch.setattr(ops, "sdpa_attention", lambda *a: calls.append("sdpa"))
    monkeypatch.setattr(ops, "attention", lambda *a: calls.append("fastdiff"))
    monkeypatch.setattr(ops, "_tuned", lambda q, k: choice)
    for shape in shapes:
        q = torch.empty(shape)
        ops._auto_attention(q, q, q)
    return calls


def test_auto_attention_without_a_table_spare_column_by_batch_sdpa_at_80_triton_at_160(monkeypatch):
    # SD1.5's head dims at heads 8: 40 (Triton sums p in a spare column, from AUTO_MIN_BATCH_HEADS), 80, 160
    # (above AUTO_TRITON_ABOVE_HEAD_DIM)
    monkeypatch.setattr(ops, "AUTO_MIN_BATCH_HEADS", 32)
    shapes = [(3, 8, 10, 40), (4, 8, 10, 40), (4, 8, 10, 80), (2, 8, 10, 160),
              (2, 8, 10, ops.AUTO_TRITON_ABOVE_HEAD_DIM)]
    assert _auto_picks(monkeypatch, shapes) == ["sdpa", "fastdiff", "sdpa", "fastdiff", "sdpa"]


def test_auto_attention_follows_the_tuning_table(monkeypatch):
    shapes = [(2, 8, 10, 80), (2, 8, 10, 160)]
    assert _auto_picks(monkeypatch, shapes, ("fastdiff", (128, 64, 4, 3))) == ["fastdiff", "fastdiff"]
    assert _auto_picks(monkeypatch, shapes, ("sdpa", (128, 64, 4, 3))) == ["sdpa", "sdpa"]
