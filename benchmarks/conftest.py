"""Shared machinery of the kernel benchmarks (`pytest benchmarks/ --benchmark-only`).

Each benchmark times one op from one provider (`fastdiff` = the Triton kernel, `torch` = what PyTorch
offers for the same call) on the same inputs, and stores in `extra_info` the figures to read:
  ms               median time per call, CUDA events around a CUDA-graph replay of `calls` back-to-back
                   calls, so neither the host nor Python sits in the figure;
  tflops / gbs     analytic FLOP and byte counts (every input read once, every output written once)
                   over `ms`;
  copy_same_ms     a device copy moving the same bytes under the same conditions, and `pct_copy_same`,
                   its time over ours: the fair bar for a small, launch-bound op;
  pct_copy_big     `gbs` over the bandwidth of a 1 GiB copy measured in the same process.
Inputs rotate among enough sets to exceed 3x the L2 cache, so memory-bound ops read from HBM, not L2.
The pytest-benchmark table itself times whole graph replays (`calls` calls each, host sync included).

Without CUDA the same files run tiny shapes once each (the `fastdiff` provider under TRITON_INTERPRET=1),
which checks that the benchmarks work, not how fast anything is.
"""
import math
import os
import statistics

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

PROVIDERS = ("fastdiff", "torch")
MIN_CALLS = 20  # calls per captured graph
REPLAYS = 15  # timed graph replays; the median is reported
MAX_SETS = 64  # input sets rotated at most


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default only looks at test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def input_sets(bytes_per_set: int) -> int:
    """How many input sets to rotate so that one graph replay streams over 3x the L2 cache."""
    if not ON_GPU:
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(MAX_SETS, math.ceil(3 * l2 / bytes_per_set)))


def _graph_ms(calls) -> tuple[float, "torch.cuda.CUDAGraph"]:
    """Median ms per call of zero-argument `calls` captured back to back in one CUDA graph, and the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune and warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times), graph


@pytest.fixture(scope="session")
def big_copy_gbs() -> float:
    """Device copy bandwidth in GB/s, bytes read plus written, of 1 GiB copies: the better of clone() and
    copy_() into a preallocated buffer (0 without CUDA)."""
    if not ON_GPU:
        return 0.0
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    clone_ms, _ = _graph_ms([src.clone for _ in range(4)])
    copy_ms, _ = _graph_ms([lambda: dst.copy_(src) for _ in range(4)])
    del src, dst
    return 2 * 2**30 / min(clone_ms, copy_ms) / 1e6


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
        ms, graph = _graph_ms(calls)
        info.update(ms=ms, calls=len(calls), input_sets=n_sets, gpu=torch.cuda.get_device_name(),
                    big_copy_gbs=big_copy_gbs)
        if flops:
            info["tflops"] = flops / ms / 1e9
        if nbytes:
            info["bytes"] = nbytes
            info["gbs"] = nbytes / ms / 1e6
            info["pct_copy_big"] = 100 * info["gbs"] / big_copy_gbs
            if copy_same:
                # clone of nbytes / 2 reads and writes nbytes in all, from as many rotating sources
                srcs = [torch.randn(max(1, int(nbytes) // 4), device="cuda", dtype=torch.float16)
                        for _ in range(n_sets)]
                copy_ms, _ = _graph_ms([srcs[i % n_sets].clone for i in range(len(calls))])
                info["copy_same_ms"] = copy_ms
                info["pct_copy_same"] = 100 * copy_ms / ms
                del srcs

        def replay():
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
