// Surgery on a captured CUDA graph before it is instantiated (graph_cuda.cu). Plain CUDA runtime, no torch
// header, like scheduler_step.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace fastdiff {

// Replaces each memset node of `graph` that sets at most `max_bytes` by a kernel node that writes the same
// bytes, with the same dependencies in and out. In a replayed graph a memset node leaves the GPU idle for
// several microseconds around it, where a kernel-to-kernel edge idles about half a microsecond; the memsets
// torch's captures hold are cuDNN's and cuBLASLt's 4-byte workspace counters. Memsets with a non-default edge
// (a programmatic dependency), with more bytes, or of an element size other than 1, 2 or 4 stay.
// `replaced` and `kept` count the memset nodes replaced and left in place.
cudaError_t memset_nodes_to_kernels(cudaGraph_t graph, size_t max_bytes, int* replaced, int* kept);

}  // namespace fastdiff
