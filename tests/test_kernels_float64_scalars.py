"""The Triton kernels compile when their float arguments arrive as float64, as torch.compile passes them.

Inductor types a Python float kernel argument as fp64 (torch/_inductor/codegen/triton_utils.py keeps its
precision), Triton's own launcher as fp32. Before the kernels cast them, a float64 `qk_scale` promoted the
attention kernel's streaming path (running max, accumulators) to float64 and failed to compile on an H200
under torch.compile ("loop-carried variable acc1 ... re-assigned to fp64"). This builds each kernel's
Triton IR for an sm_90 target with both scalar types. It needs no GPU, but it needs the compiled (not the
interpreted) kernels, so it runs in a fresh process without TRITON_INTERPRET.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_BUILD_IR = r"""
import importlib

import triton
import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

attention = importlib.import_module("fastdiff.kernels.attention")
conv2d = importlib.import_module("fastdiff.kernels.conv2d")
group_norm = importlib.import_module("fastdiff.kernels.group_norm")
layer_norm = importlib.import_module("fastdiff.kernels.layer_norm")
residual_add = importlib.import_module("fastdiff.kernels.residual_add")
jit_function = importlib.import_module("fastdiff.kernels._triton").jit_function
TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
OPTIONS = BACKEND.parse_options({})


def build_ir(kernel, pointers, floats, float_type, constants):
    # pointers: {name: element type}; floats: float arguments; other non-constexpr arguments are int32.
    fn = jit_function(kernel)
    signature = {name: ("*" + pointers[name] if name in pointers else float_type if name in floats
                        else "constexpr" if name in constants else "i32") for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    BACKEND.load_dialects(context)
    ASTSource(fn=fn, signature=signature, constexprs=constexprs).make_ir(
        TARGET, OPTIONS, BACKEND.get_codegen_implementation(OPTIONS), BACKEND.get_module_map(), context)


for float_type in ("fp32", "fp64"):
    for dtype, precision in (("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")):
        for head_dim in (40, 80, 160):
            d1, d2 = attention.head_dim_split(head_dim)
            for single_pass, block_n, even_n in ((False, 64, True), (False, 64, False), (True, 128, False)):
                constants = dict(HEAD_DIM=head_dim, D1=d1, D2=d2, D_PAD=triton.next_power_of_2(head_dim),
                                 DOT_PRECISION=precision, STRIDE_ALIGN=8, BLOCK_M=64, BLOCK_N=block_n,
                                 EVEN_N=even_n, SINGLE_PASS=single_pass,
                                 SPARE_COLUMN=attention.has_spare_column(head_dim))
                build_ir(attention._attention_kernel, dict.fromkeys(("Q", "K", "V", "Out"), dtype), {"qk_scale"},
                         float_type, constants)
                print("attention", float_type, dtype, head_dim, "single pass" if single_pass else "streaming", "ok")
        for channels_last, with_offset in ((False, False), (True, False), (False, True), (True, True)):
            layout = ("channels_last" if channels_last else "contiguous") + (" offset" if with_offset else "")
            offset = dict(Offset=dtype) if with_offset else {}  # a pointer, or the constant None
            constants = dict(CHANNELS_LAST=channels_last, BLOCK=1024, ROWS=8, BLOCK_C=128, BLOCK_G=32,
                             BLOCK_CG=4, BLOCK_P=16, STAGES=2, **({} if with_offset else dict(Offset=None)))
            pointers = dict(X=dtype, Y=dtype, W=dtype, B=dtype, Partials="fp32", Stats="fp32", **offset)
            build_ir(group_norm._group_norm_apply_kernel, pointers, {"eps"}, float_type, constants)
            print("group_norm apply", float_type, dtype, layout, "ok")
            if channels_last:
                single = group_norm._group_norm_single_cl_kernel
                constants = dict(CG=10, BLOCK_CG=16, ROWS=256, STAGES=2)
            else:
                single, constants = group_norm._group_norm_single_kernel, dict(BLOCK=1024, STAGES=2)
            constants.update({} if with_offset else dict(Offset=None))
            build_ir(single, dict(X=dtype, Y=dtype, W=dtype, B=dtype, **offset), {"eps"}, float_type, constants)
            print("group_norm single", float_type, dtype, layout, "ok")
        # LayerNorm alone; + residual with both folded biases; the residual's bias alone (pointers, or None)
        for form, given in (("no add", ()), ("add + biases", ("R", "RB", "SB", "S")), ("bias alone", ("RB", "S"))):
            pointers = dict.fromkeys(("X", "Y", "W", "B", *given), dtype)
            build_ir(layer_norm._layer_norm_kernel, pointers, {"eps"}, float_type,
                     dict(HAS_RESIDUAL=bool(given), BLOCK_M=8, BLOCK_N=512,
                          **{name: None for name in ("R", "RB", "SB", "S") if name not in given}))
            print("layer_norm", float_type, dtype, form, "ok")
        for channels_last in (False, True):
            for biases in ((), ("Bias",), ("Bias", "XBias")):  # no float arguments: the compile path alone
                build_ir(residual_add._residual_add_kernel, dict(X=dtype, Y=dtype, Out=dtype, **dict.fromkeys(
                    biases, dtype)), set(), float_type, dict(CHANNELS_LAST=channels_last, BLOCK=1024, **{
                        name: None for name in ("Bias", "XBias") if name not in biases}))
                print("residual_add", float_type, dtype, "channels_last" if channels_last else "contiguous",
                      "+".join(biases) or "no bias", "ok")
        # conv2d: no float arguments either. A 3x3 and a 1x1 kernel, Cin a multiple of BLOCK_K or not, writing
        # the output in the dtype (one split) or float32 partials; then the sum of the partials.
        for kh, even_k, out in ((3, True, dtype), (3, False, "fp32"), (1, True, "fp32"), (1, False, dtype)):
            build_ir(conv2d._conv2d_kernel, dict(X=dtype, Wt=dtype, Out=out), set(), float_type,
                     dict(KH=kh, KW=kh, EVEN_K=even_k, DOT_FP32=dtype == "fp32", BLOCK_M=128, BLOCK_N=64, BLOCK_K=64,
                          STAGES=4))
            print("conv2d", float_type, dtype, f"{kh}x{kh}", "even K" if even_k else "masked K", "out", out, "ok")
        build_ir(conv2d._conv2d_sum_kernel, dict(Partials="fp32", Out=dtype), set(), float_type,
                 dict(BLOCK=1024, STAGES=4))
        print("conv2d sum", float_type, dtype, "ok")
"""


def test_kernels_build_with_float64_scalar_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _BUILD_IR], capture_output=True, text=True, env=env, timeout=600)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    assert result.stdout.count(" ok") == 2 * 3 * (3 * 3 + 4 * 2 + 3 + 2 * 3 + 4 + 1)  # every case of the loops above
