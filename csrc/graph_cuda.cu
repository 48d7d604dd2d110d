// fastdiff's CUDA graph surgery (graph.h): memset nodes become kernel nodes that write the same bytes; a graph
// that runs one of two graphs, chosen on the GPU by comparing the halves of a buffer.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "graph.h"

namespace fastdiff {
namespace {

constexpr unsigned kFillThreads = 256;
constexpr unsigned kMaxFillBlocks = 1024;  // the grid-stride loop covers the rest

// What cudaMemset2D does: `height` rows `pitch` bytes apart, each `width` elements of `elem` bytes set to
// `value`'s low `elem` bytes.
__global__ void fill_kernel(char* dst, size_t pitch, unsigned int value, unsigned int elem, size_t width,
                            size_t height) {
  const size_t n = width * height;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / width;
    char* p = dst + row * pitch + (i - row * width) * elem;
    if (elem == 4) *reinterpret_cast<unsigned int*>(p) = value;
    else if (elem == 2) *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(value);
    else *p = static_cast<char>(value);
  }
}

// Sets `condition` to whether the halves a[0, words) and b[0, words) are equal: one block, whose threads OR their
// differences together.
__global__ void equal_halves_kernel(const uint4* a, const uint4* b, size_t words,
                                    cudaGraphConditionalHandle condition) {
  int differ = 0;
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) {
    const uint4 x = a[i], y = b[i];
    differ |= (x.x != y.x) | (x.y != y.y) | (x.z != y.z) | (x.w != y.w);
  }
  differ = __syncthreads_or(differ);
  if (threadIdx.x == 0) cudaGraphSetConditional(condition, differ ? 0u : 1u);
}

constexpr unsigned kCompareThreads = 1024;

// A node's incoming (or outgoing) neighbours, and whether every one of those edges is a default one.
struct Edges {
  std::vector<cudaGraphNode_t> nodes;
  bool plain = true;
};

cudaError_t edges_of(cudaGraphNode_t node, bool incoming, Edges* out) {
  size_t n = 0;
#if CUDART_VERSION >= 13000
  auto query = incoming ? cudaGraphNodeGetDependencies : cudaGraphNodeGetDependentNodes;
  cudaError_t err = query(node, nullptr, nullptr, &n);
  if (err != cudaSuccess) return err;
  out->nodes.resize(n);
  std::vector<cudaGraphEdgeData> data(n);
  err = query(node, out->nodes.data(), data.data(), &n);
  if (err != cudaSuccess) return err;
  const cudaGraphEdgeData plain{};
  out->plain = std::all_of(data.begin(), data.end(), [&](const cudaGraphEdgeData& e) {
    return std::memcmp(&e, &plain, sizeof(e)) == 0;
  });
#else
  auto query = incoming ? cudaGraphNodeGetDependencies : cudaGraphNodeGetDependentNodes;
  cudaError_t err = query(node, nullptr, &n);
  if (err != cudaSuccess) return err;
  out->nodes.resize(n);
  err = query(node, out->nodes.data(), &n);
  if (err != cudaSuccess) return err;
#endif
  return cudaSuccess;
}

cudaError_t add_edge(cudaGraph_t graph, cudaGraphNode_t from, cudaGraphNode_t to) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddDependencies(graph, &from, &to, nullptr, 1);
#else
  return cudaGraphAddDependencies(graph, &from, &to, 1);
#endif
}

}  // namespace

#define FASTDIFF_TRY(expr)                  \
  do {                                      \
    const cudaError_t err_ = (expr);        \
    if (err_ != cudaSuccess) return err_;   \
  } while (0)

cudaError_t memset_nodes_to_kernels(cudaGraph_t graph, size_t max_bytes, int* replaced, int* kept) {
  *replaced = *kept = 0;
  size_t count = 0;
  FASTDIFF_TRY(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  FASTDIFF_TRY(cudaGraphGetNodes(graph, nodes.data(), &count));
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    FASTDIFF_TRY(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeMemset) continue;
    cudaMemsetParams p;
    FASTDIFF_TRY(cudaGraphMemsetNodeGetParams(node, &p));
    Edges in, out;
    FASTDIFF_TRY(edges_of(node, true, &in));
    FASTDIFF_TRY(edges_of(node, false, &out));
    const size_t elements = p.width * p.height;
    const bool small = elements * p.elementSize <= max_bytes;
    const bool elem_ok = p.elementSize == 1 || p.elementSize == 2 || p.elementSize == 4;
    if (!(small && elem_ok && in.plain && out.plain && elements > 0)) {
      ++*kept;
      continue;
    }
    char* dst = static_cast<char*>(p.dst);
    size_t pitch = p.pitch;
    unsigned int value = p.value, elem = p.elementSize;
    size_t width = p.width, height = p.height;
    void* args[] = {&dst, &pitch, &value, &elem, &width, &height};  // copied when the node is made
    cudaKernelNodeParams kernel{};
    kernel.func = reinterpret_cast<void*>(fill_kernel);
    kernel.gridDim = dim3(static_cast<unsigned>(
        std::min<size_t>((elements + kFillThreads - 1) / kFillThreads, kMaxFillBlocks)));
    kernel.blockDim = dim3(kFillThreads);
    kernel.kernelParams = args;
    cudaGraphNode_t fill;
    FASTDIFF_TRY(cudaGraphAddKernelNode(&fill, graph, in.nodes.data(), in.nodes.size(), &kernel));
    for (cudaGraphNode_t next : out.nodes) FASTDIFF_TRY(add_edge(graph, fill, next));
    FASTDIFF_TRY(cudaGraphDestroyNode(node));  // and its edges
    ++*replaced;
  }
  return cudaSuccess;
}

cudaError_t if_equal_halves(const void* data, size_t half_bytes, cudaGraph_t equal, cudaGraph_t unequal,
                            cudaGraph_t* out) {
#if CUDART_VERSION >= 12080
  if (reinterpret_cast<uintptr_t>(data) % 16 || half_bytes % 16) return cudaErrorInvalidValue;
  cudaGraph_t graph;
  FASTDIFF_TRY(cudaGraphCreate(&graph, 0));
  const cudaError_t err = [&]() -> cudaError_t {
    cudaGraphConditionalHandle condition;
    FASTDIFF_TRY(cudaGraphConditionalHandleCreate(&condition, graph, 0, 0));
    const uint4* a = static_cast<const uint4*>(data);
    const uint4* b = a + half_bytes / 16;
    size_t words = half_bytes / 16;
    void* args[] = {&a, &b, &words, &condition};  // copied when the node is made
    cudaKernelNodeParams kernel{};
    kernel.func = reinterpret_cast<void*>(equal_halves_kernel);
    kernel.gridDim = dim3(1);
    kernel.blockDim = dim3(kCompareThreads);
    kernel.kernelParams = args;
    cudaGraphNode_t compare;
    FASTDIFF_TRY(cudaGraphAddKernelNode(&compare, graph, nullptr, 0, &kernel));
    cudaGraphNodeParams params{};
    params.type = cudaGraphNodeTypeConditional;
    params.conditional.handle = condition;
    params.conditional.type = cudaGraphCondTypeIf;
    params.conditional.size = 2;  // bodies: [0] when the condition is non-zero, [1] otherwise
    cudaGraphNode_t choice;
#if CUDART_VERSION >= 13000
    FASTDIFF_TRY(cudaGraphAddNode(&choice, graph, &compare, nullptr, 1, &params));
#else
    FASTDIFF_TRY(cudaGraphAddNode(&choice, graph, &compare, 1, &params));
#endif
    cudaGraphNode_t body;
    FASTDIFF_TRY(cudaGraphAddChildGraphNode(&body, params.conditional.phGraph_out[0], nullptr, 0, equal));
    FASTDIFF_TRY(cudaGraphAddChildGraphNode(&body, params.conditional.phGraph_out[1], nullptr, 0, unequal));
    return cudaSuccess;
  }();
  if (err != cudaSuccess) {
    cudaGraphDestroy(graph);
    return err;
  }
  *out = graph;
  return cudaSuccess;
#else
  return cudaErrorNotSupported;
#endif
}

#undef FASTDIFF_TRY

}  // namespace fastdiff
