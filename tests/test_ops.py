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
