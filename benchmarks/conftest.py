"""Shared machinery of the kernel benchmarks (`pytest benchmarks/ --benchmark-only`).

Each benchmark times one op from one provider (`fastdiff` = the Triton kernel, `torch` = what PyTorch
offers for the same call) on the same inputs, and stores in `extra_info` the figures to read:
  ms               median time per call, CUDA events around a CUDA-graph replay of `calls` back-to-back
                   calls, so neither the host nor Python sits in the figure;
  tflops / gbs     analytic FLOP and byte counts (every input read once, every output written once)
                   over `ms`;
  copy_same_ms     the best device copy (torch clone, copy_, or a plain Triton copy kernel) moving the same
                   bytes under the same conditions, and `pct_copy_same`, its time over ours: the fair bar
                   for a small, launch-bound op;
  pct_copy_big     `gbs` over the bandwidth of the best 1 GiB copy measured in the same process.
Inputs rotate among enough sets to exceed 3x the L2 cache, so memory-bound ops read from HBM, not L2.
The pytest-benchmark table itself times whole graph replays (`calls` calls each, host sync included).

Without CUDA the same files run tiny shapes once each (the `fastdiff` provider under TRITON_INTERPRET=1),
which checks that the benchmarks work, not how fast anything is.
"""
import math
import os

import pytest
import torch

from timing import graph_ms

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

PROVIDERS = ("fastdiff", "torch")
MIN_CALLS = 20  # calls per captured graph
MAX_SETS = 64  # input sets rotated at most


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default only looks at test_*.py, and at files named on
    the command line, which must not be collected twice)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def input_sets(bytes_per_set: int) -> int:
    """How many input sets to rotate so that one graph replay streams over 3x the L2 cache."""
    if not ON_GPU:
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(MAX_SETS, math.ceil(3 * l2 / bytes_per_set)))


if ON_GPU:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(
        Src,  # pointer to the source, n elements
        Dst,  # pointer to the destination, n elements
        n,  # elements
        BLOCK: tl.constexpr,  # elements per program
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Dst + offs, tl.load(Src + offs, mask=offs < n), mask=offs < n)


def copy_calls(src: torch.Tensor, dst: torch.Tensor) -> dict:
    """The device copies timed as the bandwidth ceiling: torch's clone() and copy_(), and a plain Triton
    copy kernel (16-byte accesses, 8K elements per program), which beats both on H100/H200."""
    grid = (triton.cdiv(src.numel(), 8192),)
    return {"clone": src.clone, "copy_": lambda: dst.copy_(src),
            "triton": lambda: _copy_kernel[grid](src, dst, src.numel(), BLOCK=8192, num_warps=8)}


def copy_ms(nbytes: int, n_sets: int, calls: int) -> dict:
    """ms per copy moving `nbytes` in all (half read, half written), rotating `n_sets` sources, per method."""
    numel = max(1, nbytes // 4)  # float16 elements read (and written)
    srcs = [torch.randn(numel, device="cuda", dtype=torch.float16) for _ in range(n_sets)]
    dsts = [torch.empty_like(t) for t in srcs]
    methods = [copy_calls(a, b) for a, b in zip(srcs, dsts)]
    return {name: graph_ms([methods[i % n_sets][name] for i in range(calls)])[0] for name in methods[0]}


@pytest.fixture(scope="session")
def big_copy_gbs() -> float:
    """Device copy bandwidth in GB/s, bytes read plus written, of 1 GiB copies: the best of the methods in
    `copy_calls` (0 without CUDA)."""
    if not ON_GPU:
        return 0.0
    return 2**31 / min(copy_ms(2**31, 1, 4).values()) / 1e6


@pytest.fixture
def measure(benchmark, big_copy_gbs):
    """measure(call_for_set, n_sets, flops=0, nbytes=0): time `call_for_set(i)` (a zero-argument callable
    on input set i), fill benchmark.extra_info, and return the info dict."""

    def run(call_for_set, n_sets: int, flops: float = 0.0, nbytes: float = 0.0, copy_same: bool = True):
        info = benchmark.extra_info
        if not ON_GPU:
            call = call_for_set(0)
            benchmark.pedantic(call, rounds=1, iterations=1)
            info["ms"] = benchmark.stats.stats.median * 1e3
            return info
        calls = [call_for_set(i % n_sets) for i in range(max(MIN_CALLS, n_sets))]
        ms, graph = graph_ms(calls)
        info.update(ms=ms, calls=len(calls), input_sets=n_sets, gpu=torch.cuda.get_device_name(),
                    big_copy_gbs=big_copy_gbs)
        if flops:
            info["tflops"] = flops / ms / 1e9
        if nbytes:
            info["bytes"] = nbytes
            info["gbs"] = nbytes / ms / 1e6
            info["pct_copy_big"] = 100 * info["gbs"] / big_copy_gbs
            if copy_same:  # the best copy of the same bytes, rotating as many sources
                info["copy_same_ms"] = min(copy_ms(int(nbytes), n_sets, len(calls)).values())
                info["pct_copy_same"] = 100 * info["copy_same_ms"] / ms

        def replay(graph=graph):  # bound now: `del graph` below drops the last other reference
            graph.replay()
            torch.cuda.synchronize()

        benchmark.pedantic(replay, rounds=5, iterations=1, warmup_rounds=1)
        del graph
        return info

    return run


def versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name() if ON_GPU else "cpu"}


@pytest.fixture(autouse=True)
def _seed_and_versions(request):
    torch.manual_seed(0)
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(versions())
