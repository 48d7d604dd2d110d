// The one C++ front door of fastdiff._C: validates every tensor (device, dtype, shape, contiguity) and
// hands raw pointers to the CPU or CUDA kernels declared in scheduler_step.h. Argument errors raise
// ValueError, as kernels/scheduler_step.py's check_step_inputs does; a CUDA tensor given to a build
// without CUDA raises NotImplementedError.
#include <torch/extension.h>

#ifdef FASTDIFF_WITH_CUDA
// c10's CUDA headers only: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>

#include "scheduler_step.h"

#ifdef FASTDIFF_WITH_CUDA
#include "graph.h"
#endif

#ifdef FASTDIFF_WITH_CUBLAS
#include "matmul.h"
#endif

namespace fastdiff {
namespace {

DType kernel_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    default:
      TORCH_CHECK_VALUE(false, "scheduler_step: x must be float16, bfloat16, float32 or float64, got ",
                        x.scalar_type());
  }
}

// The kernels walk flat memory, so every operand they read must be dense in x's memory order: contiguous,
// or channels_last when x is (a channels_last UNet's output then needs no copy). With the batch outermost in
// both, the cond half of a (2B, ...) model_output starts numel(x) elements in.
at::MemoryFormat memory_order(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "scheduler_step: x must be contiguous or channels_last, got strides ", x.strides(),
                    " for shape ", x.sizes(), "; call .contiguous() first (fastdiff._ext.scheduler_step does)");
  return at::MemoryFormat::ChannelsLast;
}

const char* order_name(at::MemoryFormat order) {
  return order == at::MemoryFormat::ChannelsLast ? "channels_last" : "contiguous";
}

// Shape, dtype and device first (the messages of check_step_inputs), then the memory order of the
// operands the kernel reads.
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& x, at::MemoryFormat order,
                   at::IntArrayRef expected_shape, const char* shape_why, bool read) {
  TORCH_CHECK_VALUE(t.sizes() == expected_shape, "scheduler_step: ", name, " has shape ", t.sizes(),
                    ", expected ", expected_shape, " ", shape_why);
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "scheduler_step: ", name, " has dtype ",
                    t.scalar_type(), ", expected x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "scheduler_step: ", name, " is on ", t.device(),
                    ", expected x's device ", x.device());
  TORCH_CHECK_VALUE(!read || t.is_contiguous(order), "scheduler_step: ", name, " must be ", order_name(order),
                    " like x, got strides ", t.strides(), " for shape ", t.sizes(),
                    "; convert it first (fastdiff._ext.scheduler_step does)");
}

// Returns the pointer the kernel reads, or nullptr when the coefficient is zero and the operand is skipped.
const void* optional_operand(const std::optional<at::Tensor>& t, const char* name, const char* coeff_name,
                             double coeff, const at::Tensor& x, at::MemoryFormat order) {
  TORCH_CHECK_VALUE(coeff == 0.0 || t.has_value(), "scheduler_step: coefficient ", coeff_name, "=", coeff,
                    " needs ", name, ", got None");
  if (!t.has_value()) return nullptr;
  check_operand(*t, name, x, order, x.sizes(), "(x's shape)", coeff != 0.0);
  return coeff != 0.0 ? t->data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> scheduler_step(const at::Tensor& x, const at::Tensor& model_output,
                                                  const std::array<double, 6>& coeffs,
                                                  std::optional<double> guidance_scale,
                                                  const std::optional<at::Tensor>& prev_x0,
                                                  const std::optional<at::Tensor>& noise) {
  TORCH_CHECK_VALUE(x.defined() && model_output.defined(), "scheduler_step: x and model_output must be tensors");
  const DType dtype = kernel_dtype(x);
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), "scheduler_step: x must be on cpu or cuda, got ", x.device());
  const at::MemoryFormat order = memory_order(x);
  const bool guided = guidance_scale.has_value();
  const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
  TORCH_CHECK_VALUE(!guided || x.dim() > 0, "scheduler_step: guidance needs a batch dimension, got a 0-d x");
  std::vector<int64_t> mo_shape = x.sizes().vec();
  if (guided) mo_shape[0] = 2 * batch;
  check_operand(model_output, "model_output", x, order, mo_shape,
                guided ? "(2B, ...) = [uncond; cond] because guidance_scale is set" : "(x's shape)", true);

  const auto [c_x, c_m, a_x, a_0, a_p, a_n] = coeffs;
  at::Tensor x_next = at::empty(x.sizes(), x.options().memory_format(order));
  at::Tensor x0 = at::empty(x.sizes(), x.options().memory_format(order));
  StepArgs args{};
  args.x = x.data_ptr();
  args.uncond = model_output.data_ptr();
  args.cond = guided ? static_cast<const char*>(args.uncond) + x.numel() * x.element_size() : nullptr;
  args.prev_x0 = optional_operand(prev_x0, "prev_x0", "a_p", a_p, x, order);
  args.noise = optional_operand(noise, "noise", "a_n", a_n, x, order);
  args.x_next = x_next.data_ptr();
  args.x0 = x0.data_ptr();
  args.n = x.numel();
  args.guidance = guidance_scale.value_or(0.0);
  args.c_x = c_x;
  args.c_m = c_m;
  args.a_x = a_x;
  args.a_0 = a_0;
  args.a_p = a_p;
  args.a_n = a_n;
  if (args.n == 0) return {x_next, x0};

  if (x.is_cuda()) {
#ifdef FASTDIFF_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    int sm_count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
    C10_CUDA_CHECK(scheduler_step_cuda(dtype, args, sm_count, c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK_NOT_IMPLEMENTED(false, "scheduler_step: fastdiff._C was built without its CUDA part, got x on ",
                                x.device());
#endif
  } else {
    pybind11::gil_scoped_release no_gil;
    scheduler_step_cpu(dtype, args);
  }
  return {x_next, x0};
}

#ifdef FASTDIFF_WITH_CUDA
// graph: a cudaGraph_t as torch.cuda.CUDAGraph.raw_cuda_graph() gives it (captured with keep_graph=True, not yet
// instantiated).
std::tuple<int, int> graph_memsets_to_kernels(int64_t graph, int64_t max_bytes) {
  TORCH_CHECK_VALUE(graph != 0, "graph_memsets_to_kernels: graph is a null cudaGraph_t");
  TORCH_CHECK_VALUE(max_bytes >= 0, "graph_memsets_to_kernels: max_bytes must be >= 0, got ", max_bytes);
  int replaced = 0, kept = 0;
  C10_CUDA_CHECK(memset_nodes_to_kernels(reinterpret_cast<cudaGraph_t>(graph), static_cast<size_t>(max_bytes),
                                         &replaced, &kept));
  return {replaced, kept};
}

// A graph fastdiff made (if_equal_halves), instantiated; replay() launches it on the current stream.
class ChoiceGraph {
 public:
  ChoiceGraph(cudaGraph_t graph, c10::DeviceIndex device) : graph_(graph), device_(device) {
    c10::cuda::CUDAGuard guard(device_);
    const cudaError_t err = cudaGraphInstantiate(&exec_, graph_, 0);
    if (err != cudaSuccess) {
      cudaGraphDestroy(graph_);
      C10_CUDA_CHECK(err);
    }
  }
  ChoiceGraph(const ChoiceGraph&) = delete;
  ChoiceGraph& operator=(const ChoiceGraph&) = delete;
  ~ChoiceGraph() {
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }
  void replay() {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaGraphLaunch(exec_, c10::cuda::getCurrentCUDAStream(device_).stream()));
  }

 private:
  cudaGraph_t graph_;
  cudaGraphExec_t exec_ = nullptr;
  c10::DeviceIndex device_;
};

// x: the buffer both graphs read, its rows [first half; second half]; equal, unequal: cudaGraph_t's as
// graph_memsets_to_kernels takes them.
std::unique_ptr<ChoiceGraph> graph_if_equal_halves(const at::Tensor& x, int64_t equal, int64_t unequal) {
  TORCH_CHECK_VALUE(x.is_cuda(), "graph_if_equal_halves: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) % 2 == 0, "graph_if_equal_halves: x must have an even number of "
                    "rows, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "graph_if_equal_halves: x must be contiguous or channels_last (its halves one block of bytes "
                    "each)");
  const size_t half_bytes = x.numel() * x.element_size() / 2;
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && half_bytes % 16 == 0,
                    "graph_if_equal_halves: x's address and half its bytes (", half_bytes,
                    ") must be multiples of 16");
  TORCH_CHECK_VALUE(equal != 0 && unequal != 0, "graph_if_equal_halves: a graph is a null cudaGraph_t");
  c10::cuda::CUDAGuard guard(x.device());
  cudaGraph_t graph;
  C10_CUDA_CHECK(if_equal_halves(x.data_ptr(), half_bytes, reinterpret_cast<cudaGraph_t>(equal),
                                 reinterpret_cast<cudaGraph_t>(unequal), &graph));
  return std::make_unique<ChoiceGraph>(graph, x.device().index());
}

// Whether this build and the driver have CUDA graphs' if/else conditional nodes (CUDA 12.8).
bool graph_choice_supported() {
  int driver = 0;
  return CUDART_VERSION >= 12080 && cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12080;
}
#endif

// "" when the CUDA kernels can run on the current device, else why not.
std::string cuda_status() {
#ifdef FASTDIFF_WITH_CUDA
  const cudaError_t err = cuda_probe();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
#else
  return "fastdiff._C was built without its CUDA part";
#endif
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff's compiled kernels: the fused sampling update on CPU (C++) and CUDA";
  m.def("scheduler_step", &fastdiff::scheduler_step, pybind11::arg("x"), pybind11::arg("model_output"),
        pybind11::arg("coeffs"), pybind11::arg("guidance_scale") = pybind11::none(),
        pybind11::arg("prev_x0") = pybind11::none(), pybind11::arg("noise") = pybind11::none(),
        R"(Fused CFG combine + solver step; returns (x_next, x0), new tensors shaped and laid out like x.

x: (B, ...) contiguous, or (B, C, H, W) channels_last; float16/bfloat16/float32/float64; on cpu or cuda.
model_output: (2B, ...) = [uncond; cond] when guidance_scale is given, else (B, ...); in x's memory order.
coeffs: the six floats of StepCoeffs (c_x, c_m, a_x, a_0, a_p, a_n).
prev_x0, noise: like x; required when a_p (a_n) is non-zero, ignored (never read) when it is zero.
Every tensor must share x's dtype and device. Math runs in float32 (float64 for float64).)");
  m.def("cuda_status", &fastdiff::cuda_status,
        "'' when the CUDA kernels can run on the current device, otherwise the reason they cannot");
#ifdef FASTDIFF_WITH_CUBLAS
  m.def("matmul_nt", &fastdiff::matmul_nt_cuda, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("out"),
        pybind11::arg("accumulate"), pybind11::arg("reduced_precision_reduction"),
        R"(out = x @ weight^T (out += ... when accumulate), cuBLAS on torch's handle and stream without a workspace.

x (M, K), weight (N, K), out (M, N): contiguous, float16 or bfloat16, one CUDA device.)");
  m.attr("with_cublas") = true;
#else
  m.attr("with_cublas") = false;
#endif
#ifdef FASTDIFF_WITH_CUDA
  m.def("graph_memsets_to_kernels", &fastdiff::graph_memsets_to_kernels, pybind11::arg("graph"),
        pybind11::arg("max_bytes"),
        R"(Memset nodes of a captured CUDA graph made kernel nodes, before it is instantiated; returns (replaced, kept).

graph: torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph() after the capture. Memsets of at most max_bytes
bytes with default edges become a kernel that writes the same bytes, with the same dependencies; the others
stay (csrc/graph.h).)");
  pybind11::class_<fastdiff::ChoiceGraph>(m, "ChoiceGraph", "A graph made by graph_if_equal_halves, instantiated")
      .def("replay", &fastdiff::ChoiceGraph::replay, "Launch it on the current stream");
  m.def("graph_if_equal_halves", &fastdiff::graph_if_equal_halves, pybind11::arg("x"), pybind11::arg("equal"),
        pybind11::arg("unequal"),
        R"(One graph that replays `equal` where x's two halves (rows) are bitwise equal at launch, else `unequal`.

equal, unequal: raw cudaGraph_t's (torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph(), not instantiated),
cloned into it as the bodies of an if/else conditional node, behind one kernel that compares the halves. x: a
CUDA tensor, contiguous or channels_last, with an even number of rows; its address and half its bytes multiples
of 16 (csrc/graph.h). Returns a ChoiceGraph.)");
  m.def("graph_choice_supported", &fastdiff::graph_choice_supported,
        "Whether this build and the driver have CUDA graphs' if/else conditional nodes (CUDA 12.8)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
