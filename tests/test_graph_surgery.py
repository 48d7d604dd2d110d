"""CUDA graph surgery in fastdiff._C (csrc/graph_cuda.cu): a captured graph's small memset nodes become kernel
nodes that write the same bytes. On the CPU: availability and errors. On the GPU: cuDNN's attention, captured,
holds memset nodes; after the surgery its replays hold none and give bitwise the output of the plain graph, and
a graph runner with it replays new inputs right; a graph made of two, chosen on the GPU by comparing a buffer's
halves, runs the right one."""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext


def test_availability_says_why_and_rejects_unknown_ops():
    ok, why = _ext.availability("cpu", "graph")
    assert not ok and "cpu" in why
    if not torch.cuda.is_available():
        ok, why = _ext.availability("cuda", "graph")
        assert not ok and why
    with pytest.raises(ValueError, match="op must be one of .*'graph'.*, got 'graphs'"):
        _ext.availability("cuda", "graphs")


def test_surgery_refuses_what_it_cannot_edit():
    ok, why = _ext.availability("cuda", "graph")
    if not ok:
        with pytest.raises(RuntimeError, match="graph surgery is not available: " + why[:20]):
            _ext.graph_memsets_to_kernels(object())
        return
    with pytest.raises(ValueError, match="graph must be a torch.cuda.CUDAGraph, got object"):
        _ext.graph_memsets_to_kernels(object())
    with pytest.raises(ValueError, match="captured with keep_graph=True"):
        _ext.graph_memsets_to_kernels(torch.cuda.CUDAGraph())  # no keep_graph: nothing to edit


# ---- GPU ----

def _attention_inputs():
    g = torch.Generator("cuda").manual_seed(0)
    return [torch.randn(2, 8, 4096, 40, device="cuda", generator=g).half() for _ in range(3)]


def _cudnn_attention(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _memsets_per_replay(runner, *inputs) -> int:
    from torch.profiler import ProfilerActivity, profile

    runner(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner(*inputs)
        torch.cuda.synchronize()
    return sum(e.name.startswith("Memset") for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
def test_cudnn_attention_graph_loses_its_memsets_and_keeps_its_output():
    """SD1.5's 64x64 self-attention at CFG batch 2 (head dim 40) on cuDNN: the shape whose memsets the UNet graph
    holds on an H200."""
    from fastdiff.engine import CUDAGraphRunner

    ok, why = _ext.availability("cuda", "graph")
    assert ok, f"fastdiff._C's graph surgery cannot run: {why}"
    q, k, v = _attention_inputs()
    try:
        eager = _cudnn_attention(q, k, v)
    except RuntimeError as e:
        pytest.skip(f"cuDNN attention does not run here: {e}")
    plain = CUDAGraphRunner(_cudnn_attention, warmup=1, memset_kernels=False)
    edited = CUDAGraphRunner(_cudnn_attention, warmup=1, memset_kernels=True)
    before, after = _memsets_per_replay(plain, q, k, v), _memsets_per_replay(edited, q, k, v)
    print(f"memsets per replay: plain {before}, edited {after}; replaced {edited.memsets_replaced}")
    if before == 0:
        pytest.skip("this cuDNN's attention graph holds no memset node")
    assert edited.memsets_replaced == before and plain.memsets_replaced == 0
    assert after == 0
    assert torch.equal(edited(q, k, v), plain(q, k, v))
    assert torch.equal(edited(q, k, v), eager)
    q2, k2, v2 = _attention_inputs()[::-1]  # new values through the static buffers
    assert torch.equal(edited(q2, k2, v2), _cudnn_attention(q2, k2, v2))


@pytest.mark.gpu
def test_fast_config_switches_the_surgery():
    """memset_kernels=False keeps every memset node in the UNet graph; True replaces them, same output."""
    import copy

    from cuda_graphs import fast_engine
    from fastdiff.engine import FastConfig
    from fastdiff.models import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(UNetConfig(cross_attention_dim=768, attention_head_dim=8)).half().eval()
    x = torch.randn(1, 4, 64, 64, device="cuda")
    t = torch.tensor(601.0, device="cuda")
    context = torch.randn(2, 77, 768, device="cuda").half()
    outs, replaced = [], []
    for memset_kernels in (False, True):
        fast = fast_engine(copy.deepcopy(unet), config=FastConfig(memset_kernels=memset_kernels))
        outs.append(fast.denoiser(context, cfg=True)(x, t).clone())
        replaced.append(fast._unet_calls.memsets_replaced)  # the UNet calls' CUDAGraphRunner
    print(f"memset nodes replaced: off {replaced[0]}, on {replaced[1]}")
    assert replaced[0] == 0 and replaced[1] > 0
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equal_halves_graph_runs_the_half_where_the_halves_match_bitwise(layout):
    """EqualHalvesGraphRunner: one graph over fn(x[:B]) and fn(x), chosen on the GPU by comparing x's halves byte
    for byte. fn tells the two apart by the rows it saw; a single differing element (the last one) makes the halves
    unequal, and so does -0.0 against 0.0."""
    from fastdiff.engine.graphs import EqualHalvesGraphRunner

    ok, why = _ext.availability("cuda", "choice")
    if not ok:
        pytest.skip(why)

    def fn(x):  # (rows, ...) -> (C, H, W): their mean plus the number of rows it was given
        return x.float().mean(0) + x.shape[0]

    runner = EqualHalvesGraphRunner(fn, warmup=1)
    h = torch.randn(2, 4, 8, 6, device="cuda").half().contiguous(memory_format=layout)
    last = h.clone()
    last.as_strided((last.numel(),), (1,))[-1] += 1  # the last element in memory order
    signed = torch.zeros_like(h)
    cases = [("[h; h]", torch.cat([h, h]), True), ("[h; last]", torch.cat([h, last]), False),
             ("[0; -0]", torch.cat([signed, -signed]), False), ("[0; 0]", torch.cat([signed, signed]), True)]
    runner(cases[0][1])  # captures
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [runner(x.contiguous(memory_format=layout)).clone() for _, x, _ in cases]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (name, x, equal), out in zip(cases, outs):
        ran = "half" if torch.equal(out, fn(x[:2])) else "whole"
        print(f"{name}: {ran} ran, expected {'half' if equal else 'whole'}")
        assert torch.equal(out, fn(x[:2]) if equal else fn(x)), name
    assert runner.captured == 1
