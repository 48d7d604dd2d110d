// x @ weight^T, written to (or added onto) out: cuBLAS's GEMM on torch's handle and stream, WITHOUT a workspace.
//
// Why not torch: torch gives cuBLAS a workspace, and before many of its GEMMs cuBLAS then clears part of it.
// Inside a captured CUDA graph each clear is a memset node, and the GPU idles around it (about 1.4 us before
// and 2-7 us after, on an H200). With no workspace cuBLAS picks kernels that need none: at SD1.5's shapes the
// same kernels, bitwise the same outputs, and 30 fewer memsets per UNet step at CFG batch 16
// (H200, torch 2.11). torch's workspace size is process-wide (CUBLAS_WORKSPACE_CONFIG, read once), so
// fastdiff sets it to zero on the handle for its own calls only; torch sets its own again on its next call.
//
// Only compiled where the CUDA toolkit has cuBLAS's headers (setup.py defines FASTDIFF_WITH_CUBLAS).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <climits>
#include <functional>

#include "matmul.h"

namespace fastdiff {

void matmul_nt_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out, bool accumulate,
                    bool reduced_precision_reduction) {
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2,
                    "matmul: x, weight and out must be 2-D here, got ", x.dim(), ", ", weight.dim(), " and ",
                    out.dim(), " dims");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, "matmul: weight has shape ", weight.sizes(), ", expected (N, ", k,
                    ") for x's last dim ", k);
  TORCH_CHECK_VALUE(out.size(0) == m && out.size(1) == n, "matmul: out has shape ", out.sizes(), ", expected (",
                    m, ", ", n, ")");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16, "matmul: x must be float16 or bfloat16, got ",
                    dtype);
  for (const at::Tensor& t : {std::cref(weight), std::cref(out)}) {
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, "matmul: every tensor must have x's dtype ", dtype, ", got ",
                      t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "matmul: every tensor must be on x's device ", x.device(),
                      ", got ", t.device());
  }
  TORCH_CHECK_VALUE(x.is_cuda(), "matmul: the tensors must be on a CUDA device, got ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
                    "matmul: x, weight and out must be contiguous");
  TORCH_CHECK_VALUE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, "matmul: dims (", m, ", ", n, ", ", k,
                    ") exceed cuBLAS's int range");
  if (m == 0 || n == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // on torch's current stream
  TORCH_CUDABLAS_CHECK(cublasSetWorkspace(handle, nullptr, 0));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, reduced_precision_reduction
                                                     ? CUBLAS_DEFAULT_MATH
                                                     : CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cudaDataType_t type = dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  // Row-major out (M, N) is column-major out^T (N, M) = weight (N, K) x x^T (K, M): cuBLAS's (T, N) GEMM on the
  // row-major buffers as they are, as torch's F.linear calls it.
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                    static_cast<int>(k), &alpha, weight.data_ptr(), type, static_cast<int>(k),
                                    x.data_ptr(), type, static_cast<int>(k), &beta, out.data_ptr(), type,
                                    static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
}

}  // namespace fastdiff
