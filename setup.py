"""Builds the optional extension fastdiff._C from csrc/ and installs the top-level kernels/ folder's op files as
modules of fastdiff.kernels; everything else is in pyproject.toml.

The extension is optional. Where torch is not importable, no C++ compiler works or the build fails, setup
prints a warning and installs fastdiff without it (the ops seam then uses Triton or plain PyTorch, and
`fastdiff info` says why). pip shows that warning only with -v.

    FASTDIFF_SKIP_CUDA_BUILD=1   build the C++ (CPU) part only, even where torch has CUDA and nvcc exists
    TORCH_CUDA_ARCH_LIST         GPU targets instead of the default sm_80 + sm_90 (+ PTX for newer GPUs)

The CUDA part includes fastdiff's GEMM without a cuBLAS workspace (csrc/matmul_cuda.cpp) where the CUDA toolkit
has cuBLAS's headers; without them it builds the rest.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

CPU_SOURCES = ["csrc/fastdiff_api.cpp", "csrc/scheduler_step_cpu.cpp"]
CUDA_SOURCES = ["csrc/scheduler_step_cuda.cu", "csrc/graph_cuda.cu"]
CUBLAS_SOURCES = ["csrc/matmul_cuda.cpp"]
CUDA_LIBRARIES = ("cudart", "c10_cuda", "torch_cuda", "cublas")  # what the CUDA part links beyond CppExtension
# at::parallel_for is inline in ATen's headers: without -fopenmp it silently runs on one thread.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", *OPENMP]  # the C++ standard is torch's choice (C++17 or C++20, by version)
# sm_80 and sm_90 machine code; compute_90 PTX lets newer GPUs JIT-compile it.
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]


class BuildPy(build_py):
    """fastdiff.kernels is fastdiff/kernels/__init__.py plus every op file of the top-level kernels/ folder.

    kernels/ has no __init__.py, so that from the repository root `import kernels` still finds Hugging Face's
    `kernels` distribution (which transformers imports), not this folder. A wheel gets the op files beside the
    package's __init__.py; a source checkout reaches them through that package's __path__."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "fastdiff.kernels":
            here = os.path.dirname(os.path.abspath(__file__))
            modules += [(package, os.path.splitext(os.path.basename(f))[0], os.path.relpath(f, here))
                        for f in sorted(glob.glob(os.path.join(here, "kernels", "*.py")))]
        return modules


def warn(message: str) -> None:
    print(f"\nWARNING: fastdiff is installed WITHOUT its compiled extension fastdiff._C: {message}\n"
          "fastdiff still works, on its Triton and PyTorch paths; `fastdiff info` shows what is in use.\n",
          file=sys.stderr, flush=True)


def cuda_unavailable_reason(torch, cpp_extension) -> str:
    """Why the CUDA part will not be built, or "" when it will."""
    if os.environ.get("FASTDIFF_SKIP_CUDA_BUILD", "0") == "1":
        return "FASTDIFF_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    return ""


def has_cublas_headers(cuda_home: str) -> bool:
    """Whether the CUDA toolkit at cuda_home has cuBLAS's headers (some installs ship nvcc without them)."""
    return any(os.path.exists(os.path.join(d, "cublas_v2.h"))
               for d in [os.path.join(cuda_home, "include"), *glob.glob(os.path.join(cuda_home, "targets", "*",
                                                                                    "include"))])


def make_extension(cpp_extension, with_cuda: bool):
    if not with_cuda:
        return cpp_extension.CppExtension("fastdiff._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS},
                                          extra_link_args=OPENMP)
    nvcc = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += NVCC_ARCH_FLAGS  # torch adds its own -gencode flags only when none are given
    sources, macros, libraries = CPU_SOURCES + CUDA_SOURCES, [("FASTDIFF_WITH_CUDA", None)], []
    if has_cublas_headers(cpp_extension.CUDA_HOME):
        sources, macros, libraries = sources + CUBLAS_SOURCES, macros + [("FASTDIFF_WITH_CUBLAS", None)], ["cublas"]
    else:
        print(f"fastdiff: no cublas_v2.h under {cpp_extension.CUDA_HOME}: fastdiff._C without its GEMM",
              file=sys.stderr)
    return cpp_extension.CUDAExtension("fastdiff._C", sources, define_macros=macros, libraries=libraries,
                                       extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc},
                                       extra_link_args=OPENMP)


def link_shared_libstdcxx(compiler, extensions) -> None:
    """Make the extension use the shared libstdc++ even where the compiler links it statically.

    Some toolchains (a g++ wrapper adding -static-libstdc++, as on the project's GPU machines) copy
    libstdc++ into the extension. torch has loaded the shared one already, and the two copies then share
    part of their global state (locale facets) but not all: the first error message the extension formats
    crashes the process. Naming the shared library before the driver's own -lstdc++ lets the linker take
    every symbol from it. Skipped where the compiler cannot find it, so that no build breaks for this.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        found = subprocess.run([compiler.compiler_cxx[0], "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (AttributeError, IndexError, OSError, subprocess.SubprocessError):
        return
    if os.path.isabs(found):
        for ext in extensions:
            ext.extra_link_args.append("-l:libstdc++.so.6")


def extension_setup() -> dict:
    """setup() arguments for fastdiff._C, or {} when it cannot be built here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # ImportError, or a broken torch raising anything
        warn(f"torch is not importable ({type(e).__name__}: {e}); install torch first, then "
             "`pip install --no-build-isolation -e .`")
        return {}
    no_cuda = cuda_unavailable_reason(torch, cpp_extension)
    if no_cuda:
        print(f"fastdiff: building fastdiff._C without its CUDA part: {no_cuda}", file=sys.stderr)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Never fails the install: on a failed CUDA build retries CPU-only, then gives up with a warning."""

        def build_extensions(self):
            link_shared_libstdcxx(self.compiler, self.extensions)
            super().build_extensions()

        def run(self):
            # run() replaces the compiler option by a compiler object and, on failure, leaves inplace off:
            # a retry needs both back.
            options = (self.compiler, self.inplace)
            try:
                super().run()
                return
            except Exception as e:  # compiler errors surface as CompileError, RuntimeError, OSError, ...
                error = e
            if not no_cuda:
                print(f"\nWARNING: the CUDA part of fastdiff._C failed to build ({type(error).__name__}: "
                      f"{error}); retrying without it.\n", file=sys.stderr, flush=True)
                for ext in self.extensions:  # in place: setuptools annotated these objects already
                    ext.sources = [s for s in ext.sources if s not in CUDA_SOURCES + CUBLAS_SOURCES]
                    ext.define_macros = [m for m in ext.define_macros
                                         if m[0] not in ("FASTDIFF_WITH_CUDA", "FASTDIFF_WITH_CUBLAS")]
                    ext.libraries = [lib for lib in ext.libraries if lib not in CUDA_LIBRARIES]
                self.compiler, self.inplace = options
                try:
                    super().run()
                    return
                except Exception as e:
                    error = e
            self.extensions = []  # nothing for setuptools to copy into place
            warn(f"the build failed ({type(error).__name__}: {error}); reinstall with "
                 "`pip install -v --no-build-isolation -e .` to see the compiler's output")

    return {"ext_modules": [make_extension(cpp_extension, with_cuda=not no_cuda)],
            "cmdclass": {"build_ext": OptionalBuildExt}}


extension = extension_setup()
setup(ext_modules=extension.get("ext_modules", []),
      cmdclass={**extension.get("cmdclass", {}), "build_py": BuildPy})
