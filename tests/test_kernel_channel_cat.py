"""The Triton channel concatenation of channels_last maps (the UNet decoder's skips) against torch.cat.

CPU: under TRITON_INTERPRET=1 on odd widths (tiles part-filled in pixels and channels, an empty input), every
dtype, bitwise equal to torch.cat; a skip of fewer samples repeated over x's; invalid inputs; the ops seam.
GPU (`-m gpu`): SD1.5's decoder shapes at CFG batch 2 and 8 in every dtype, the shared sample's skip, and
CUDA-graph capture.
"""
import importlib

import pytest
import torch

from fastdiff import ops
from fastdiff.kernels.channel_cat import channel_cat, channel_cat_ref
from cuda_graphs import capture

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c1, c2, h, w", [(2, 70, 24, 3, 5), (1, 64, 128, 6, 6), (3, 5, 0, 2, 7), (1, 8, 3, 1, 1)])
def test_channel_cat_equals_torch_cat(n, c1, c2, h, w, dtype):
    torch.manual_seed(0)
    x, skip = _cl(torch.randn(n, c1, h, w).to(dtype)), _cl(torch.randn(n, c2, h, w).to(dtype))
    out = channel_cat(x, skip)
    assert out.shape == (n, c1 + c2, h, w) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, channel_cat_ref(x, skip))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skip_samples", [1, 2])
def test_channel_cat_repeats_a_skip_of_fewer_samples(skip_samples, dtype):
    """A skip taken before a shared sample parted into its guidance rows: skip's samples repeat over x's 4."""
    torch.manual_seed(0)
    x, skip = _cl(torch.randn(4, 70, 3, 5).to(dtype)), _cl(torch.randn(skip_samples, 24, 3, 5).to(dtype))
    out = channel_cat(x, skip)
    assert out.shape == (4, 94, 3, 5) and out.is_contiguous(memory_format=torch.channels_last)
    expected = torch.cat([x, torch.cat([skip] * (4 // skip_samples))], dim=1)
    assert torch.equal(out, expected) and torch.equal(channel_cat_ref(x, skip), expected)


def test_channel_cat_rejects_bad_inputs():
    x = _cl(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"skip must match x's batch \(or a divisor of it\) and spatial size "
                                         r"\(2, 3, 3\), got shape \(2, 4, 3, 4\)"):
        channel_cat(x, _cl(torch.randn(2, 4, 3, 4)))
    with pytest.raises(ValueError, match=r"skip must match x's batch .*, got shape \(3, 4, 3, 3\)"):
        channel_cat(x, _cl(torch.randn(3, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"skip must match x's batch .*, got shape \(4, 4, 3, 3\)"):
        channel_cat_ref(x, _cl(torch.randn(4, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"4-D"):
        channel_cat(x, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="skip has dtype torch.float16"):
        channel_cat(x, _cl(torch.randn(2, 4, 3, 3)).half())
    with pytest.raises(ValueError, match="skip must be channels_last"):
        channel_cat(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        channel_cat(x.long(), _cl(torch.randn(2, 4, 3, 3)).long())


def test_ops_seam_runs_the_kernel_on_channels_last_only(monkeypatch):
    module = importlib.import_module("fastdiff.kernels.channel_cat")  # the package re-exports the function
    calls = []
    launch = module._channel_cat_launch
    monkeypatch.setattr(module, "_channel_cat_launch", lambda *args: (calls.append(1), launch(*args))[1])
    x, skip = _cl(torch.randn(1, 8, 2, 3)), _cl(torch.randn(1, 4, 2, 3))
    with ops.use_backend("triton", op="channel_cat"):
        assert torch.equal(ops.channel_cat(x, skip), torch.cat([x, skip], 1))
    assert calls == [1]
    # under auto the CPU runs the reference; so do contiguous maps on a GPU (see ops.channel_cat)
    assert torch.equal(ops.channel_cat(x.contiguous(), skip.contiguous()), torch.cat([x, skip], 1))
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("c1, c2, hw", [(1280, 1280, 8), (1280, 640, 16), (1280, 640, 32), (640, 320, 64),
                                        (320, 320, 64)])
def test_gpu_channel_cat_equals_torch_cat(n, c1, c2, hw, dtype):
    x = _cl(torch.randn(n, c1, hw, hw, device="cuda").to(dtype))
    skip = _cl(torch.randn(n, c2, hw, hw, device="cuda").to(dtype))
    assert torch.equal(channel_cat(x, skip), torch.cat([x, skip], 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 16])
def test_gpu_channel_cat_repeats_a_shared_samples_skip(n, dtype):
    """SD1.5's last up block: the conv_in skip of the shared sample (n / 2 latents) under CFG's n rows."""
    x = _cl(torch.randn(n, 320, 64, 64, device="cuda").to(dtype))
    skip = _cl(torch.randn(n // 2, 320, 64, 64, device="cuda").to(dtype))
    assert torch.equal(channel_cat(x, skip), torch.cat([x, torch.cat([skip, skip])], 1))


@pytest.mark.gpu
def test_gpu_channel_cat_in_a_cuda_graph():
    x = _cl(torch.randn(2, 640, 64, 64, device="cuda", dtype=torch.float16))
    skip = _cl(torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16))
    graph, out = capture(lambda: channel_cat(x, skip))
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, torch.cat([x, skip], 1))
