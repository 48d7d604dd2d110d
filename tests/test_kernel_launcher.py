"""kernels._triton.Launcher: repeated launches through the compiled kernel's launcher give what Triton's own
launch gives, also under CUDA-graph capture. GPU only: the interpreter always launches through Triton."""
import importlib
from contextlib import contextmanager

import pytest
import torch

from fastdiff.kernels import _triton
from fastdiff.kernels.attention import attention, attention_ref

attention_module = importlib.import_module("fastdiff.kernels.attention")  # the package exports the function

pytestmark = pytest.mark.gpu


def _qkv(seq_q=333, seq_kv=77, head_dim=40, dtype=torch.float16):
    return [torch.randn(2, 8, s, head_dim, device="cuda", dtype=dtype) for s in (seq_q, seq_kv, seq_kv)]


def test_repeated_launch_skips_triton_and_matches_its_launch():
    launcher = attention_module._attention_launcher
    q, k, v = _qkv()
    with _launcher_enabled(False):
        through_triton = attention(q, k, v)
    first = attention(q, k, v)  # records this signature
    launcher._recorded = None
    repeated = attention(q, k, v)
    torch.cuda.synchronize()
    assert launcher._recorded is None, "the repeated call went through Triton's launch path"
    err = (repeated.float() - attention_ref(q, k, v).float()).abs().max().item()
    print(f"max abs error of the repeated launch vs reference: {err:.3e}")
    assert torch.equal(repeated, through_triton) and torch.equal(first, through_triton)
    assert err < 1e-2


def test_new_signature_is_recorded_not_reused():
    launcher = attention_module._attention_launcher
    q, k, v = _qkv(seq_q=200)
    attention(q, k, v)
    entries = len(launcher._launches)
    q2, k2, v2 = _qkv(seq_q=201)  # another grid and autotune key
    out = attention(q2, k2, v2)
    assert len(launcher._launches) == entries + 1
    err = (out.float() - attention_ref(q2, k2, v2).float()).abs().max().item()
    print(f"max abs error at a new length: {err:.3e}")
    assert err < 1e-2
    # A misaligned view (offset by one element) must not reuse the aligned launch.
    buf = torch.randn(2 * 8 * 200 * 40 + 1, device="cuda", dtype=torch.float16)
    q3 = buf[1:].view(2, 8, 200, 40)
    out3 = attention(q3, k, v)
    err3 = (out3.float() - attention_ref(q3, k, v).float()).abs().max().item()
    print(f"max abs error with a misaligned q: {err3:.3e}")
    assert err3 < 1e-2


def test_repeated_launch_under_cuda_graph_capture():
    q, k, v = _qkv()
    attention(q, k, v)  # record outside the capture (the first launch may compile and autotune)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        err = (out.float() - attention_ref(q, k, v).float()).abs().max().item()
        print(f"max abs error of a replayed graph: {err:.3e}")
        assert err < 1e-2


@contextmanager
def _launcher_enabled(enabled: bool):
    saved, _triton.Launcher.enabled = _triton.Launcher.enabled, enabled
    try:
        yield
    finally:
        _triton.Launcher.enabled = saved
