// CUDA half of the fused sampling update: one pass over memory, each thread moving 16 bytes per operand
// per iteration (8 halves, 4 floats, 2 doubles) with a scalar tail, math in float (double for float64).
// Includes no torch header (see scheduler_step.h), so it also compiles on machines whose torch lacks CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "scheduler_step.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;    // block size for tensors large enough to fill the GPU
constexpr int kMinThreads = 64;  // smallest block size, for small latents (see launch)
// Resident threads per SM on sm_80/sm_90: the grid is capped at one full wave of these, and the
// grid-stride loop does the rest, so no block waits for a second wave.
constexpr int kThreadsPerSm = 2048;

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename T>
__device__ __forceinline__ T narrow(math_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

// 16 bytes of T: loaded and stored as one 128-bit access (LDG.E.128 / STG.E.128).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <bool ON, typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, int64_t i) {
  Pack<T> r{};
  if constexpr (ON) r = reinterpret_cast<const Pack<T>*>(p)[i];
  return r;
}

template <bool ON, typename T>
__device__ __forceinline__ math_t<T> load_one(const T* p, int64_t i) {
  if constexpr (ON) return widen(p[i]);
  else return math_t<T>(0);
}

// Elements [0, n_vec * kSize) go through 16-byte packs, the rest (fewer than kSize, or all of them when
// `vectorised` is false because some pointer is not 16-byte aligned) one element at a time.
template <typename T, bool GUIDED, bool PREV, bool NOISE>
__global__ void __launch_bounds__(kThreads)
step_kernel(StepArgs s, Coeffs<math_t<T>> k, bool vectorised) {
  using A = math_t<T>;
  constexpr int V = Pack<T>::kSize;
  const T* __restrict__ x = static_cast<const T*>(s.x);
  const T* __restrict__ u = static_cast<const T*>(s.uncond);
  const T* __restrict__ c = static_cast<const T*>(s.cond);
  const T* __restrict__ p = static_cast<const T*>(s.prev_x0);
  const T* __restrict__ z = static_cast<const T*>(s.noise);
  T* __restrict__ x_next = static_cast<T*>(s.x_next);
  T* __restrict__ x0 = static_cast<T*>(s.x0);

  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = vectorised ? s.n / V : 0;

  for (int64_t i = tid; i < n_vec; i += stride) {
    // All loads issued before any math, so each thread has up to five 16-byte requests in flight.
    const Pack<T> xv = load_pack<true>(x, i), uv = load_pack<true>(u, i), cv = load_pack<GUIDED>(c, i),
                  pv = load_pack<PREV>(p, i), zv = load_pack<NOISE>(z, i);
    Pack<T> xn, x0v;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A a, b;
      step_element<GUIDED, PREV, NOISE>(widen(xv.v[j]), widen(uv.v[j]), widen(cv.v[j]), widen(pv.v[j]),
                                        widen(zv.v[j]), k, a, b);
      xn.v[j] = narrow<T>(a);
      x0v.v[j] = narrow<T>(b);
    }
    reinterpret_cast<Pack<T>*>(x_next)[i] = xn;
    reinterpret_cast<Pack<T>*>(x0)[i] = x0v;
  }
  for (int64_t i = n_vec * V + tid; i < s.n; i += stride) {
    A a, b;
    step_element<GUIDED, PREV, NOISE>(widen(x[i]), widen(u[i]), load_one<GUIDED>(c, i), load_one<PREV>(p, i),
                                      load_one<NOISE>(z, i), k, a, b);
    x_next[i] = narrow<T>(a);
    x0[i] = narrow<T>(b);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
cudaError_t launch(const StepArgs& s, int sm_count, cudaStream_t stream) {
  constexpr int V = Pack<T>::kSize;
  // A null pointer is an absent operand and counts as aligned.
  const bool vectorised = aligned16(s.x) && aligned16(s.uncond) && aligned16(s.cond) && aligned16(s.prev_x0) &&
                          aligned16(s.noise) && aligned16(s.x_next) && aligned16(s.x0);
  const int64_t n_vec = vectorised ? s.n / V : 0;
  const int64_t work = std::max<int64_t>(n_vec, s.n - n_vec * V);  // threads with something to do
  // A 512x512 latent (16 K elements, 2 K packs in fp16) would be 8 blocks of 256 threads on 8 of 132 SMs.
  // So small a step is bound by each SM's latency, not by bandwidth: halve the blocks until they reach
  // every SM, so that more SMs share the work.
  int threads = kThreads;
  while (threads > kMinThreads && (work + threads - 1) / threads < sm_count) threads /= 2;
  const int64_t blocks =
      std::min<int64_t>((work + threads - 1) / threads, int64_t(sm_count) * (kThreadsPerSm / threads));
  const auto k = coeffs_in<math_t<T>>(s);
  dispatch_flags(s.cond != nullptr, s.prev_x0 != nullptr, s.noise != nullptr, [&](auto g, auto p, auto z) {
    step_kernel<T, decltype(g)::value, decltype(p)::value, decltype(z)::value>
        <<<unsigned(std::max<int64_t>(blocks, 1)), threads, 0, stream>>>(s, k, vectorised);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t scheduler_step_cuda(DType dtype, const StepArgs& args, int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float16: return launch<__half>(args, sm_count, stream);
    case DType::BFloat16: return launch<__nv_bfloat16>(args, sm_count, stream);
    case DType::Float32: return launch<float>(args, sm_count, stream);
    case DType::Float64: return launch<double>(args, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cuda_probe() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, step_kernel<float, false, false, false>);
  cudaGetLastError();  // a missing kernel image is not sticky; leave no error behind for the next launch
  return err;
}

}  // namespace fastdiff
