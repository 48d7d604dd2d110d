"""CUDA graphs: a function captured once per input signature and replayed; a choice made on the GPU inside one."""
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from fastdiff import _ext


class _Captured(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[Tensor, ...]  # static input buffers, copied into before each replay
    output: Tensor  # static output buffer, rewritten by each replay
    memsets_replaced: int  # memset nodes made kernel nodes (`memset_kernels`)


class CUDAGraphRunner:
    """Calls `fn(*inputs) -> Tensor` through CUDA graphs: one capture per input signature (shapes, dtypes,
    strides, device), then copy the inputs into that graph's static buffers and replay.

    The returned tensor is the graph's static output: the next call of the same signature overwrites it, so
    read it (or clone it) before calling again. Inputs at the positions in `by_reference` are not copied: the
    graph reads the caller's tensor itself, so their address is part of the signature (another tensor
    captures another graph) and the caller keeps them alive and writes new values into them in place (the
    fast path's text context, constant over a sampling loop, whose projections are computed outside it).
    Graphs share one memory pool (they never run concurrently), so a second resolution costs only what it
    needs beyond the first. `fn` must have no host
    synchronisation and no branch on tensor values; it may allocate (from the graph's pool).

    memset_kernels: before instantiating a graph, make its small memset nodes (cuDNN's 4-byte workspace counters)
    kernel nodes that write the same bytes (`fastdiff._ext.graph_memsets_to_kernels`), where fastdiff._C has its
    CUDA part: a memset node idles the GPU for microseconds around it. Outputs are bitwise the same.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2, by_reference: tuple[int, ...] = (),
                 memset_kernels: bool = True):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device and torch sees none; call the model directly "
                               "on the CPU (Pipeline does so when fast=None)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must not run inside a capture), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.by_reference = frozenset(by_reference)
        self.memset_kernels = memset_kernels
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def signature(self, inputs: tuple[Tensor, ...]) -> tuple:
        return tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() if i in self.by_reference else None)
                     for i, t in enumerate(inputs))

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) are held."""
        return len(self._graphs)

    @property
    def memsets_replaced(self) -> int:
        """Memset nodes made kernel nodes, over the graphs held."""
        return sum(entry.memsets_replaced for entry in self._graphs.values())

    def __call__(self, *inputs: Tensor) -> Tensor:
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise ValueError(f"input {i} must be a CUDA tensor, got "
                                 f"{t.device if isinstance(t, Tensor) else type(t).__name__}")
        key = self.signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs)
        for static, t in zip(entry.inputs, inputs):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        entry.graph.replay()
        return entry.output

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Captured:
        static = tuple(t if i in self.by_reference else
                       torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                       for i, t in enumerate(inputs))
        # Warm up on a side stream, as torch.cuda.graphs' own make_graphed_callables does: lazy cuBLAS/cuDNN
        # state and Triton autotuning (which synchronises) happen here, never inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        surgery = self.memset_kernels and _ext.availability("cuda", "graph")[0]
        graph = torch.cuda.CUDAGraph(keep_graph=True) if surgery else torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.fn(*static)
        if not isinstance(output, Tensor):
            raise TypeError(f"the captured function must return one tensor, got {type(output).__name__}")
        replaced = 0
        if surgery:
            replaced = _ext.graph_memsets_to_kernels(graph)
            graph.instantiate()
        return _Captured(graph, static, output, replaced)

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self._graphs.clear()
        self._pool = None


def conditional_nodes() -> bool:
    """Whether this torch captures CUDA graph conditional nodes (`if_node`; CUDA 12.4 and later)."""
    graph = getattr(torch.cuda, "CUDAGraph", None)
    return all(hasattr(graph, name) for name in ("get_currently_capturing_graph", "begin_capture_to_if_node",
                                                  "end_capture_to_conditional_node"))


@contextmanager
def if_node(pred: Tensor) -> Iterator[None]:
    """Inside a CUDA graph capture: what the block launches becomes a conditional node's body, which a replay runs
    only while `pred` (a 0-d bool CUDA tensor, computed earlier in the same graph) is true. The choice is the
    GPU's, at replay: no host synchronisation. Tensors the block allocates come from the graph's pool."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()
