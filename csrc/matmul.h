// fastdiff._C's GEMM without a cuBLAS workspace (matmul_cuda.cpp), built where the CUDA toolkit has cuBLAS's
// headers (FASTDIFF_WITH_CUBLAS).
#pragma once

#include <torch/extension.h>

namespace fastdiff {

// out = x @ weight^T, or out += x @ weight^T when accumulate. x (M, K), weight (N, K), out (M, N): contiguous,
// float16 or bfloat16, one CUDA device. reduced_precision_reduction: torch's
// allow_{fp16,bf16}_reduced_precision_reduction for the dtype. Raises ValueError naming a bad argument.
void matmul_nt_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out, bool accumulate,
                    bool reduced_precision_reduction);

}  // namespace fastdiff
