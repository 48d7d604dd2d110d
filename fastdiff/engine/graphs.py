"""CUDA graphs: a function captured once per input signature and replayed; a pair of them chosen between on the
GPU."""
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastdiff import _ext


class _Captured(NamedTuple):
    graph: "torch.cuda.CUDAGraph"  # or what else has replay(): EqualHalvesGraphRunner's _Choice
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
        static = self._static(inputs)
        self._warm_up(self.fn, static)
        graph, output, replaced = self._capture_graph(self.fn, static)
        if self._surgery:
            graph.instantiate()
        return _Captured(graph, static, output, replaced)

    def _static(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The graph's input buffers: copies of the inputs, in their strides, but the ones taken by reference."""
        return tuple(t if i in self.by_reference else
                     torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                     for i, t in enumerate(inputs))

    def _warm_up(self, fn: Callable[..., Tensor], static: tuple[Tensor, ...]) -> None:
        # On a side stream, as torch.cuda.graphs' own make_graphed_callables does: lazy cuBLAS/cuDNN state and
        # Triton autotuning (which synchronises) happen here, never inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)

    @property
    def _surgery(self) -> bool:
        return self.memset_kernels and _ext.availability("cuda", "graph")[0]

    def _capture_graph(self, fn: Callable[..., Tensor], static: tuple[Tensor, ...], keep: bool = False
                       ) -> tuple["torch.cuda.CUDAGraph", Tensor, int]:
        """fn(*static) captured into the runner's pool: (graph, its output, memset nodes replaced). The graph is
        not instantiated where the memset surgery (or `keep`) kept it editable."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph(keep_graph=True) if self._surgery or keep else torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = fn(*static)
        if not isinstance(output, Tensor):
            raise TypeError(f"the captured function must return one tensor, got {type(output).__name__}")
        return graph, output, _ext.graph_memsets_to_kernels(graph) if self._surgery else 0

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self._graphs.clear()
        self._pool = None


class _Choice(NamedTuple):
    """fastdiff._C's graph choosing between two captured graphs, which it holds (with their pool) alive."""
    graph: object  # fastdiff._C.ChoiceGraph
    equal: "torch.cuda.CUDAGraph"
    unequal: "torch.cuda.CUDAGraph"

    def replay(self) -> None:
        self.graph.replay()


class EqualHalvesGraphRunner(CUDAGraphRunner):
    """A CUDAGraphRunner of fn(x, *rest) for an x of 2B rows that is often one half twice, [h; h] (diffusers'
    latents under guidance), where fn(x[:B], *rest) then gives the same output as fn(x, *rest) with less work.
    Each input signature captures both, fn(x[:B]) and fn(x), and fastdiff._C makes them one graph
    (`_ext.graph_if_equal_halves`) whose first kernel compares x's halves on the GPU and whose conditional node
    then runs the one that fits: no host synchronisation. The unequal graph writes its output into the equal
    one's. Needs `available()`; `takes(x)` says which x it takes (the halves one block of 16-byte-aligned bytes
    each)."""

    @staticmethod
    def available() -> bool:
        return _ext.availability("cuda", "choice")[0]

    @staticmethod
    def takes(x: Tensor) -> bool:
        dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        return x.dim() >= 1 and x.shape[0] % 2 == 0 and dense and (x.numel() * x.element_size() // 2) % 16 == 0

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Captured:
        static = self._static(inputs)
        half = static[0].shape[0] // 2

        def once(x: Tensor, *rest: Tensor) -> Tensor:
            return self.fn(x[:half], *rest)

        self._warm_up(once, static)
        self._warm_up(self.fn, static)
        equal, output, replaced = self._capture_graph(once, static, keep=True)
        unequal, _, more = self._capture_graph(lambda *args: output.copy_(self.fn(*args)), static, keep=True)
        choice = _Choice(_ext.graph_if_equal_halves(static[0], equal, unequal), equal, unequal)
        return _Captured(choice, static, output, replaced + more)
