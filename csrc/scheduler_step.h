// The fused sampling update shared by the CPU and CUDA halves of fastdiff._C (see
// kernels/scheduler_step.py for the contract and the plain-PyTorch twin).
//
// This header is deliberately free of ATen/torch headers: the CUDA file includes only it and the CUDA
// runtime, so nvcc never parses torch's headers (a much faster build, and the .cu compiles without torch).
// fastdiff_api.cpp validates the tensors and hands the kernels raw pointers through `StepArgs`.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDIFF_HOST_DEVICE inline
#endif

namespace fastdiff {

// Element types the kernels are built for. Math runs in float (double for Float64).
enum class DType : int { Float16, BFloat16, Float32, Float64 };

// One call's operands: dense arrays of `n` elements of one DType in one memory order, already validated.
struct StepArgs {
  const void* x;       // current sample, (B, ...)
  const void* uncond;  // model output; with guidance the first half of [uncond; cond]
  const void* cond;    // second half of the model output; nullptr without guidance
  const void* prev_x0; // previous step's denoised estimate; nullptr when a_p == 0
  const void* noise;   // fresh noise; nullptr when a_n == 0
  void* x_next;        // out: the next sample
  void* x0;            // out: the denoised estimate of this step
  int64_t n;           // elements in x (and in each of uncond, cond, prev_x0, noise, x_next, x0)
  double guidance;     // g in m = u + g (c - u); unused without guidance
  double c_x, c_m;     // x0 = c_x x + c_m m
  double a_x, a_0, a_p, a_n;  // x_next = a_x x + a_0 x0 + a_p prev_x0 + a_n noise
};

// Coefficients converted once to the math type.
template <typename A>
struct Coeffs {
  A g, c_x, c_m, a_x, a_0, a_p, a_n;
};

template <typename A>
Coeffs<A> coeffs_in(const StepArgs& s) {
  return {A(s.guidance), A(s.c_x), A(s.c_m), A(s.a_x), A(s.a_0), A(s.a_p), A(s.a_n)};
}

// The whole update for one element, in the same order of operations as scheduler_step_ref. GUIDED,
// PREV and NOISE are compile-time so that absent operands are never read and the loops stay branch-free.
template <bool GUIDED, bool PREV, bool NOISE, typename A>
FASTDIFF_HOST_DEVICE void step_element(A x, A u, A c, A p, A z, const Coeffs<A>& k, A& x_next, A& x0) {
  A m = u;
  if constexpr (GUIDED) m = u + k.g * (c - u);
  x0 = k.c_x * x + k.c_m * m;
  A r = k.a_x * x + k.a_0 * x0;
  if constexpr (PREV) r = r + k.a_p * p;
  if constexpr (NOISE) r = r + k.a_n * z;
  x_next = r;
}

// Calls f(GUIDED, PREV, NOISE) with each flag as a std::bool_constant, so one generic lambda covers
// the eight specialisations.
template <typename F>
void dispatch_flags(bool guided, bool prev, bool noise, F&& f) {
  auto with_noise = [&](auto g, auto p) {
    if (noise) f(g, p, std::true_type{}); else f(g, p, std::false_type{});
  };
  auto with_prev = [&](auto g) {
    if (prev) with_noise(g, std::true_type{}); else with_noise(g, std::false_type{});
  };
  if (guided) with_prev(std::true_type{}); else with_prev(std::false_type{});
}

// CPU: runs on the calling thread plus at::parallel_for's pool.
void scheduler_step_cpu(DType dtype, const StepArgs& args);

}  // namespace fastdiff

#ifdef FASTDIFF_WITH_CUDA
#include <cuda_runtime_api.h>

namespace fastdiff {
// CUDA: enqueues one kernel on `stream` (no synchronisation, so it can be captured in a CUDA graph) and
// returns the launch's error code. `sm_count` sizes the grid.
cudaError_t scheduler_step_cuda(DType dtype, const StepArgs& args, int sm_count, cudaStream_t stream);

// cudaSuccess when this build holds a kernel image the current device can run.
cudaError_t cuda_probe();
}  // namespace fastdiff
#endif
