"""A linear layer with its epilogue in the same kernel: x W^T + bias, then the GEGLU gate or a residual add.

The UNet's transformers end two of their matmuls in elementwise work that eager PyTorch runs as kernels of
their own, each a full pass over the matmul's output:
  - the MLP's first Linear makes [value | gate] (2N wide) and GEGLU keeps value * GELU(gate) (N wide);
  - the MLP's second Linear and the transformer's proj_out are followed by the residual add `x + ...`.
Here one Triton matmul does either in its epilogue: `linear(x, w, b, geglu=True)` computes the value and the
gate columns of one output tile side by side (two accumulators over the same x tile) and writes only
value * GELU(gate); `linear(x, w, b, residual=r)` adds r to the tile before its one store.

The kernel loads its tiles with TMA (host-side tensor descriptors): on an H200 that was 1.1-1.3x faster than
the same kernel with descriptors built on the device, which pays for them in every program. So the rows of
x, weight, residual and the output must start 16-byte aligned (K and N a multiple of 8 in float16, 4 in
float32). Every product accumulates in float32; float32 inputs multiply in full float32 (no TF32).

GELU is the exact erf form, F.gelu's default, evaluated as g * Phi(g) with Phi from Abramowitz & Stegun 7.1.26
(`_gelu`): 1 - erf(z) = t (a1 + a2 t + ... + a5 t^4) exp(-z^2), t = 1 / (1 + p z), |error| <= 1.5e-7 on erf. The
epilogue is arithmetic-bound at K = 320, where five K steps of MMA meet one GELU per output element: libdevice's
erff (two branches, both taken by most warps) made the GEGLU projection at SD1.5's 64x64 level at CFG batch 16
311.9 us against 290.3 with this form and 231.7 with no GELU at all (torch 2.11, triton 3.6). The
negative tail keeps its relative accuracy: Phi(g) there is the small term itself, never 1 - (1 - small).
Evaluated in float32 on the CPU, this form is within 6.3e-7 of the float64 GELU on [-9, 9]; float32 F.gelu's
own error there reaches 1.3e-6.

Where the kernel runs under `auto` (`ops.linear`): on the tensors it `takes`, where the GPU's tuning table
(`fastdiff.tuning.linear_choice`, written by benchmarks/tune.py) measured it faster than cuBLAS + the separate
epilogue kernel, else where `faster_than_cublas` says it was at SD1.5's shapes on an H200 (benchmarks/RESULTS.md,
"Linear with its epilogue").
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _triton
from ._triton import check_triton_device, triton
from .matmul import check_weight_shape

if triton is not None:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_M = 8  # row tiles per group in the launch order: a group's programs share weight tiles in L2


def _out_width(weight: Tensor, geglu: bool) -> int:
    """The output's last dim: the weight's rows, or half of them with the GEGLU gate ([value | gate])."""
    return weight.shape[0] // 2 if geglu else weight.shape[0]


def _row_align(x: Tensor) -> int:
    """Elements per 16 bytes: TMA needs every row to start 16-byte aligned, so K and N multiples of this."""
    return 16 // x.element_size()


def check_linear_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                        geglu: bool) -> None:
    """Validation shared by every backend: x (..., K), weight (N', K) with N' = 2N for geglu else N, bias (N',)
    or None, residual (..., N) like the output or None; geglu and residual exclude each other."""
    check_weight_shape(x, weight)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if geglu and weight.shape[0] % 2:
        raise ValueError(f"geglu needs an even number of weight rows ([value | gate]), got {weight.shape[0]}")
    if geglu and residual is not None:
        raise ValueError("geglu and residual cannot be combined: the epilogue is one or the other")
    out_shape = (*x.shape[:-1], _out_width(weight, geglu))
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output's {out_shape}")


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
               geglu: bool = False) -> Tensor:
    """Plain-PyTorch twin, as fastdiff's UNet computes it eagerly: F.linear, then value * F.gelu(gate) of
    its two halves (geglu) or + residual, each rounded to the dtype. x: (..., K); weight: (N', K); bias (N',)
    or None; residual: the output's shape or None. Returns (..., N'), or (..., N' / 2) with geglu."""
    check_linear_shapes(x, weight, bias, residual, geglu)
    h = F.linear(x, weight, bias)
    if geglu:
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)
    return h if residual is None else residual + h


if triton is not None:

    @triton.jit
    def _gelu(g):
        """g * Phi(g) = g * (1 + erf(g / sqrt(2))) / 2, Phi from A&S 7.1.26 (see the module docstring)."""
        z = tl.abs(g) * 0.7071067811865476  # 1/sqrt(2)
        one = tl.full(z.shape, 1.0, tl.float32)
        t = tl.math.fdiv(one, 1.0 + 0.3275911 * z, ieee_rounding=False)
        poly = 1.061405429 * t - 1.453152027
        poly = poly * t + 1.421413741
        poly = poly * t - 0.284496736
        poly = poly * t + 0.254829592
        tail = 0.5 * poly * t * tl.math.exp2(-1.4426950408889634 * z * z)  # (1 - erf(z)) / 2; log2(e)
        return g * tl.where(g < 0, tail, 1.0 - tail)

    # M not specialized: the rows only place the tiles (the descriptors bound them), and a new size or batch must
    # not compile a variant of its own.
    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(
        x_desc,  # descriptor of x, (M, K), tiles (BLOCK_M, BLOCK_K)
        w_desc,  # descriptor of the weight, (N', K), tiles (BLOCK_N, BLOCK_K); N' = 2N for GEGLU
        Bias,  # pointer to the bias (N',), or None
        r_desc,  # descriptor of the residual, (M, N), tiles (BLOCK_M, BLOCK_N), or None
        o_desc,  # descriptor of the output, (M, N), tiles (BLOCK_M, BLOCK_N)
        M, N, K,
        GEGLU: tl.constexpr,  # output column j = value j * GELU(gate j), the gate in weight row N + j
        IEEE: tl.constexpr,  # float32 inputs: full-precision products, not TF32
        UPCAST: tl.constexpr,  # multiply in float32: bfloat16 under the interpreter, whose tl.dot reads the raw
        #   bits of TMA-loaded bfloat16 tiles as integers (Triton 3.9)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,  # the K loop's software-pipelining depth (tiles in flight)
        GROUP_M: tl.constexpr,
    ):
        # Grouped launch order: GROUP_M row tiles walk the column tiles together, so the weight tiles a
        # group reads stay in L2 between its programs.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        row = (first_m + (pid % per_group) % group_m) * BLOCK_M
        col = ((pid % per_group) // group_m) * BLOCK_N

        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # GEGLU only (dead code otherwise)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"  # ignored for 16-bit inputs
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = x_desc.load([row, k])  # rows past M and columns past K load as zeros
            w = w_desc.load([col, k])
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w.T, acc, input_precision=precision)
            if GEGLU:
                w = w_desc.load([N + col, k])
                if UPCAST:
                    w = w.to(tl.float32)
                gate = tl.dot(x, w.T, gate, input_precision=precision)

        cols = col + tl.arange(0, BLOCK_N)
        if Bias is not None:
            acc += tl.load(Bias + cols, mask=cols < N).to(tl.float32)[None, :]
            if GEGLU:
                gate += tl.load(Bias + N + cols, mask=cols < N).to(tl.float32)[None, :]
        if GEGLU:  # exact erf GELU, F.gelu's default
            acc *= _gelu(gate)
        if r_desc is not None:
            acc += r_desc.load([row, col]).to(tl.float32)
        o_desc.store([row, col], acc.to(o_desc.dtype))  # clipped to (M, N)

    _linear_launcher = _triton.Launcher(_linear_kernel)  # repeat launches skip Triton's Python


_CONFIG_ROWS = (1, 4096)  # a row count (M) on each side of `_config`'s thresholds


def _config(m: int, n: int, k: int, geglu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), pinned per shape class instead of autotuned (every
    candidate would be a compile of the cold start). The best of 8 configs at SD1.5's shapes on an H200."""
    if geglu:  # two accumulators per tile
        # From 4096 rows, and at K = 320 (5 K steps: 2 stages beat 3 at 65536 rows, 295.9 against 312.7 us):
        # 128 x 64 tiles of 4 warps. 128 x 128 tiles of 8 warps, the best with libdevice's erf at K = 640 and
        # 1280, slowed by 10-17% with `_gelu`; 128 x 64 with `_gelu` took 234.9 against their 255.8 us at
        # 16384 x 640, and 217.6 against 212.1 at 4096 x 1280.
        if k <= 320 or m >= 4096:
            return 128, 64, 64, 4, 2
        return 128, 64, 32, 4, 4
    if n <= 320:
        return 128, 64, 64, 4, 3
    return (128, 128, 64, 4, 3) if m >= 4096 else (64, 128, 64, 4, 4)


def _linear_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                   geglu: bool) -> Tensor:
    _check_aligned(x=x, weight=weight, residual=residual)
    k = x.shape[-1]
    m = x.numel() // k
    n = _out_width(weight, geglu)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)

    def launch(config: tuple[int, int, int, int, int]) -> None:
        block_m, block_n, block_k, warps, stages = config
        x_desc = TensorDescriptor(x, [m, k], [k, 1], [block_m, block_k])
        w_desc = TensorDescriptor(weight, list(weight.shape), [k, 1], [block_n, block_k])
        r_desc = None if residual is None else TensorDescriptor(residual, [m, n], [n, 1], [block_m, block_n])
        o_desc = TensorDescriptor(out, [m, n], [n, 1], [block_m, block_n])
        grid = (_triton.cdiv(m, block_m) * _triton.cdiv(n, block_n),)
        _linear_launcher[grid](x_desc, w_desc, bias, r_desc, o_desc, m, n, k, GEGLU=geglu,
                               IEEE=x.dtype == torch.float32, UPCAST=_triton.INTERPRET and x.dtype == torch.bfloat16,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, GROUP_M=GROUP_M,
                               num_warps=warps)

    launch(_config(m, n, k, geglu))
    _triton.compile_later(launch, (_config(rows, n, k, geglu) for rows in _CONFIG_ROWS))  # other row counts
    return out


# Registered so torch.compile keeps it in its graphs as one opaque op (fake tensors give the output shape);
# eager calls skip the dispatcher and launch directly.
_linear_op = torch.library.custom_op("fastdiff::triton_linear", mutates_args=())(_linear_launch)


@_linear_op.register_fake
def _(x, weight, bias, residual, geglu):
    return x.new_empty((*x.shape[:-1], _out_width(weight, geglu)))


def check_linear_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                        geglu: bool) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot compute this linear."""
    check_linear_shapes(x, weight, bias, residual, geglu)
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    _triton.check_like(x, weight=weight, bias=bias, residual=residual)
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")
    row_align = _row_align(x)
    for what, size in (("x's last dim K", x.shape[-1]), ("the output width N", _out_width(weight, geglu))):
        if size % row_align:
            raise ValueError(f"{what} = {size} must be a multiple of {row_align} for {x.dtype} (the kernel's TMA "
                             "loads need 16-byte aligned rows); use linear_ref")
    check_triton_device(x)


def _check_aligned(**tensors: Optional[Tensor]) -> None:
    """TMA needs every tensor to start 16-byte aligned. Checked where the kernel launches (not traceable)."""
    for name, t in tensors.items():
        if t is not None and t.data_ptr() % 16:
            raise ValueError(f"{name} must start 16-byte aligned, its address is {t.data_ptr():#x}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
           geglu: bool = False) -> Tensor:
    """x W^T + bias with its epilogue, in one Triton kernel (tensor-core matmul, float32 accumulation).

    x: (..., K) contiguous; weight: (N', K) contiguous, an nn.Linear's; bias: (N',) or None; float16, bfloat16
    or float32, all alike. geglu: weight's rows are [value | gate] (N' = 2N) and the output is
    value * GELU(gate) (exact erf GELU), (..., N). residual: (..., N') contiguous, added to the output.
    K and N must keep rows 16-byte aligned (multiples of 8 in 16-bit dtypes, of 4 in float32). The epilogue
    runs in float32 and rounds once (`linear_ref` rounds the matmul's output first). Returns a new contiguous
    tensor. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_linear_inputs(x, weight, bias, residual, geglu)
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], _out_width(weight, geglu)))
    op = _linear_op if torch.compiler.is_compiling() else _linear_launch
    return op(x, weight, bias, residual, geglu)


def takes(x: Tensor, weight: Tensor, residual: Optional[Tensor] = None, geglu: bool = False) -> bool:
    """Whether the kernel takes these tensors as they are (contiguous, rows 16-byte aligned). It validates nothing
    else: a call it takes may still be refused."""
    row_align = _row_align(x)
    return (x.shape[-1] % row_align == 0 and _out_width(weight, geglu) % row_align == 0 and x.is_contiguous()
            and weight.is_contiguous() and (residual is None or residual.is_contiguous()))


def faster_than_cublas(m: int, k: int) -> bool:
    """Whether `linear` beat cuBLAS + the separate epilogue kernel at an (m x k) input on an H200 at SD1.5's
    transformer shapes (benchmarks/RESULTS.md): from 512 rows up at K <= 1280. Below, cuBLAS'
    small-M kernels win; at K >= 2560 (the MLP's second Linear at the 32x32 level and below) its deeper K loop
    does. The rule for a GPU without linear rows in its tuning table (`fastdiff.tuning.linear_choice`)."""
    return m >= 512 and k <= 1280
