// Surgery on captured CUDA graphs before they are instantiated, and a graph that chooses between two on the GPU
// (graph_cuda.cu). Plain CUDA runtime, no torch header, like scheduler_step.h.
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

// Makes `*out`, a new graph that runs `equal` where the two halves of the 2 * half_bytes bytes at `data` are
// bitwise equal, else `unequal`: a one-block kernel compares the halves and sets the condition of an if/else
// conditional node whose bodies are child graphs cloned from the two (which stay the caller's). The choice is the
// GPU's, at each launch, from the bytes there then: no host synchronisation. `data` 16-byte aligned, half_bytes a
// multiple of 16. cudaErrorNotSupported where the runtime predates if/else nodes (CUDA 12.8).
cudaError_t if_equal_halves(const void* data, size_t half_bytes, cudaGraph_t equal, cudaGraph_t unequal,
                            cudaGraph_t* out);

}  // namespace fastdiff
