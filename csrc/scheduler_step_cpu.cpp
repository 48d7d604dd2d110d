// CPU half of the fused sampling update: one pass over memory, split across at::parallel_for's threads
// (OpenMP: setup.py compiles this file with -fopenmp, without which the header-inline parallel_for runs
// serially), with an inner loop plain enough for the compiler to vectorise for float and double.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "scheduler_step.h"

namespace fastdiff {
namespace {

// Half and BFloat16 are widened to float, as in scheduler_step_ref; double stays double.
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <bool ON, typename A, typename T>
inline A load(const T* p, int64_t i) {
  if constexpr (ON) return static_cast<A>(p[i]);
  else return A(0);
}

template <typename T, bool GUIDED, bool PREV, bool NOISE>
void step_range(const T* __restrict x, const T* __restrict u, const T* __restrict c,
                const T* __restrict p, const T* __restrict z, T* __restrict x_next, T* __restrict x0,
                const Coeffs<math_t<T>>& k, int64_t begin, int64_t end) {
  using A = math_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    A xn, x0i;
    step_element<GUIDED, PREV, NOISE>(static_cast<A>(x[i]), static_cast<A>(u[i]), load<GUIDED, A>(c, i),
                                      load<PREV, A>(p, i), load<NOISE, A>(z, i), k, xn, x0i);
    x_next[i] = static_cast<T>(xn);
    x0[i] = static_cast<T>(x0i);
  }
}

// ATen's own grain for elementwise CPU loops (at::internal::GRAIN_SIZE): below it one thread does it all,
// since waking the pool would cost more than it saves.
constexpr int64_t kGrainSize = 32768;

template <typename T>
void run_typed(const StepArgs& s) {
  const auto k = coeffs_in<math_t<T>>(s);
  dispatch_flags(s.cond != nullptr, s.prev_x0 != nullptr, s.noise != nullptr, [&](auto g, auto p, auto z) {
    at::parallel_for(0, s.n, kGrainSize, [&](int64_t begin, int64_t end) {
      step_range<T, decltype(g)::value, decltype(p)::value, decltype(z)::value>(
          static_cast<const T*>(s.x), static_cast<const T*>(s.uncond), static_cast<const T*>(s.cond),
          static_cast<const T*>(s.prev_x0), static_cast<const T*>(s.noise), static_cast<T*>(s.x_next),
          static_cast<T*>(s.x0), k, begin, end);
    });
  });
}

}  // namespace

void scheduler_step_cpu(DType dtype, const StepArgs& args) {
  switch (dtype) {
    case DType::Float16: return run_typed<c10::Half>(args);
    case DType::BFloat16: return run_typed<c10::BFloat16>(args);
    case DType::Float32: return run_typed<float>(args);
    case DType::Float64: return run_typed<double>(args);
  }
}

}  // namespace fastdiff
