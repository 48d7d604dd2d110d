"""CUDA-graph capture for the GPU tests that check an op replays correctly."""
import torch


def capture(fn, warm: bool = True):
    """Capture fn() into a new CUDA graph; return (graph, what fn returned during the capture), the static
    outputs a replay rewrites. warm: call fn once first, on a side stream as capture requires, so that compiles,
    autotuning and lazy initialisation happen outside the capture (False when the caller has just called it)."""
    if warm:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
