"""The one dispatcher: which implementation runs each op, decided in one place.

The engine's fused modules (`fastdiff.engine`) and the samplers call `ops.attention`, `ops.group_norm`,
`ops.geglu`, `ops.linear`, `ops.matmul`, `ops.layer_norm`, `ops.add_layer_norm`, `ops.residual_add`,
`ops.conv2d`, `ops.subpixel_shuffle`, `ops.channel_cat`, `ops.residual_add_sums`, `ops.channel_cat_sums` and
`ops.scheduler_step` and never branch on the backend. Each op has up to three implementations:

    reference  plain PyTorch (`fastdiff.kernels.<op>.<op>_ref`), any device; the oracle for every test
    triton     `fastdiff.kernels.<op>.<op>`: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)
    cuda       `fastdiff._C` (csrc/): scheduler_step, whose C++ half runs on CPU tensors too, and matmul
               (cuBLAS without a workspace, CUDA tensors only)

`auto` (the default, or FASTDIFF_BACKEND) picks per op and per device, fastest first; `fastdiff info`
prints the choice. `set_backend("triton")` forces every op; `set_backend("cuda", op="scheduler_step")`
forces one. Attention has more implementations than backends (torch's SDPA, `matmul_attention` for very wide
heads): `attention_impl` picks one per attention module, by head size.
"""
import functools
import importlib
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff import tuning

# scheduler_step's coefficients and its input checks, which the samplers build and run before the op
from fastdiff.kernels.scheduler_step import StepCoeffs, check_step_inputs  # noqa: F401

BACKENDS = ("auto", "reference", "triton", "cuda")

# op -> backend -> (module, function). Modules are imported only when first used.
_IMPLS = {
    "attention": {
        "reference": ("fastdiff.kernels.attention", "attention_ref"),
        "triton": ("fastdiff.kernels.attention", "attention"),
    },
    "group_norm": {
        "reference": ("fastdiff.kernels.group_norm", "group_norm_ref"),
        "triton": ("fastdiff.kernels.group_norm", "group_norm"),
    },
    "geglu": {
        "reference": ("fastdiff.kernels.geglu", "geglu_ref"),
        "triton": ("fastdiff.kernels.geglu", "geglu"),
    },
    "linear": {
        "reference": ("fastdiff.kernels.linear", "linear_ref"),
        "triton": ("fastdiff.kernels.linear", "linear"),
    },
    "matmul": {
        "reference": ("fastdiff.kernels.matmul", "matmul_ref"),
        "cuda": ("fastdiff._ext", "matmul"),
    },
    "layer_norm": {
        "reference": ("fastdiff.kernels.layer_norm", "layer_norm_ref"),
        "triton": ("fastdiff.kernels.layer_norm", "layer_norm"),
    },
    "add_layer_norm": {
        "reference": ("fastdiff.kernels.layer_norm", "add_layer_norm_ref"),
        "triton": ("fastdiff.kernels.layer_norm", "add_layer_norm"),
    },
    "residual_add": {
        "reference": ("fastdiff.kernels.residual_add", "residual_add_ref"),
        "triton": ("fastdiff.kernels.residual_add", "residual_add"),
    },
    "conv2d": {
        "reference": ("fastdiff.kernels.conv2d", "conv2d_ref"),
        "triton": ("fastdiff.kernels.conv2d", "conv2d"),
    },
    "channel_cat": {
        "reference": ("fastdiff.kernels.channel_cat", "channel_cat_ref"),
        "triton": ("fastdiff.kernels.channel_cat", "channel_cat"),
    },
    "residual_add_sums": {
        "reference": ("fastdiff.kernels.group_sums", "residual_add_sums_ref"),
        "triton": ("fastdiff.kernels.group_sums", "residual_add_sums"),
    },
    "channel_cat_sums": {
        "reference": ("fastdiff.kernels.group_sums", "channel_cat_sums_ref"),
        "triton": ("fastdiff.kernels.group_sums", "channel_cat_sums"),
    },
    "subpixel_shuffle": {
        "reference": ("fastdiff.kernels.subpixel", "subpixel_shuffle_ref"),
        "triton": ("fastdiff.kernels.subpixel", "subpixel_shuffle"),
    },
    "scheduler_step": {
        "reference": ("fastdiff.kernels.scheduler_step", "scheduler_step_ref"),
        "triton": ("fastdiff.kernels.scheduler_step", "scheduler_step"),
        "cuda": ("fastdiff._ext", "scheduler_step"),
    },
}
OPS = tuple(_IMPLS)

# auto's order of preference, per device type; the first available wins. scheduler_step prefers fastdiff._C
# on CUDA because the sampling loop launches it eagerly: ~9 us of host time per call against 67-113 us for the
# Triton kernel as measured before kernels._triton.Launcher cut Triton's per-call Python (GPU time 1.4 vs
# 1.25 us, fp16 B=1, H200; benchmarks/RESULTS.md; not re-measured since). Under a captured CUDA
# graph host time vanishes and Triton is the (slightly) faster one. On CPU the C++ step is 4-60x the reference.
_AUTO_ORDER = {
    "cuda": {"attention": ("triton", "reference"), "group_norm": ("triton", "reference"),
             "geglu": ("triton", "reference"), "linear": ("triton", "reference"),
             "matmul": ("cuda", "reference"),
             "layer_norm": ("triton", "reference"), "add_layer_norm": ("triton", "reference"),
             "residual_add": ("triton", "reference"),
             "conv2d": ("triton", "reference"), "subpixel_shuffle": ("triton", "reference"),
             "channel_cat": ("triton", "reference"),
             "residual_add_sums": ("triton", "reference"), "channel_cat_sums": ("triton", "reference"),
             "scheduler_step": ("cuda", "triton", "reference")},
    "cpu": {"attention": ("reference",), "group_norm": ("reference",), "geglu": ("reference",),
            "linear": ("reference",), "matmul": ("reference",), "layer_norm": ("reference",),
            "add_layer_norm": ("reference",),
            "residual_add": ("reference",),
            "conv2d": ("reference",), "subpixel_shuffle": ("reference",), "channel_cat": ("reference",),
            "residual_add_sums": ("reference",), "channel_cat_sums": ("reference",),
            "scheduler_step": ("cuda", "reference")},
}

_env_backend = os.environ.get("FASTDIFF_BACKEND", "auto")
if _env_backend not in BACKENDS:
    raise ValueError(f"FASTDIFF_BACKEND must be one of {BACKENDS}, got {_env_backend!r}")
_chosen: dict[str, str] = {op: _env_backend if _env_backend in _IMPLS[op] or _env_backend == "auto" else "auto"
                           for op in OPS}


def set_backend(name: str, op: Optional[str] = None) -> None:
    """Force `name` for one op, or for every op when `op` is None ("auto" restores the default)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    ops = OPS if op is None else (op,)
    for o in ops:
        if o not in _IMPLS:
            raise ValueError(f"op must be one of {OPS}, got {o!r}")
        if name != "auto" and name not in _IMPLS[o]:
            raise ValueError(f"backend {name!r} does not implement {o!r}; it has {sorted(_IMPLS[o])}"
                             + ("" if op else f" (force one op instead: set_backend({name!r}, op=...))"))
    for o in ops:
        _chosen[o] = name


def get_backend(op: str) -> str:
    """The backend setting of `op` ("auto" or a forced name)."""
    return _chosen[op]


@contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Temporarily force a backend: `with ops.use_backend("reference"): ...`."""
    saved = dict(_chosen)
    set_backend(name, op)
    try:
        yield
    finally:
        _chosen.update(saved)


def availability(backend: str, device_type: str, op: str = "scheduler_step") -> tuple[bool, str]:
    """Whether `backend` can run `op` on `device_type` here, and why not (only the cuda backend's answer
    depends on the op: fastdiff._C has two, with different needs)."""
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install raising anything
            return False, f"triton does not import: {e}"
        if device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return True, f"triton {triton.__version__}" + (" (interpreter)" if device_type != "cuda" else "")
        return False, f"triton runs on CUDA tensors, or on {device_type} only under TRITON_INTERPRET=1"
    if backend == "cuda":
        from fastdiff import _ext

        return _ext.availability(device_type, op)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_impl_cache: dict[tuple[str, str], Callable] = {}
_module_cache: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    """importlib.import_module, cached: torch.compile cannot trace import_module (each call would break the
    graph), but it traces a dict hit."""
    if name not in _module_cache:
        _module_cache[name] = importlib.import_module(name)
    return _module_cache[name]


def _load(op: str, backend: str) -> Callable:
    key = (op, backend)
    if key not in _impl_cache:
        module, name = _IMPLS[op][backend]
        _impl_cache[key] = getattr(_module(module), name)
    return _impl_cache[key]


def preload(op: Optional[str] = None) -> None:
    """Import every implementation of `op` (of every op when None) now, and register the Triton kernels as
    ops torch.compile traces into (`fastdiff.kernels.prepare_compile`). The first call of an op
    imports it, which torch.compile cannot trace: code that is about to be compiled calls this first, or its
    graph breaks at each op for good."""
    for o in OPS if op is None else (op,):
        for backend in _IMPLS[o]:
            _load(o, backend)  # attention's also caches the kernel module that _triton_attention_fits reads
    _module("fastdiff.kernels._triton").prepare_compile()


def resolve(op: str, device_type: str) -> str:
    """The backend `op` runs on for tensors of `device_type`; raises if a forced one cannot run there."""
    name = _chosen[op]
    if name != "auto":
        ok, why = availability(name, device_type, op)
        if not ok:
            raise RuntimeError(f"backend {name!r} was forced for {op} but cannot run on {device_type}: {why}")
        return name
    for candidate in _AUTO_ORDER.get(device_type, _AUTO_ORDER["cpu"])[op]:
        if availability(candidate, device_type, op)[0]:
            return candidate
    return "reference"


def _triton_attention_fits(q: Tensor) -> bool:
    """Whether q's shape is inside the Triton kernel's limits (head dim 16..256, B*H grid). The VAE's single
    512-wide head is not, nor are toy models' tiny heads: under `auto` those run on the reference path."""
    kernel = _module("fastdiff.kernels.attention")  # the module; the package exports the function
    return (kernel.MIN_HEAD_DIM <= q.shape[-1] <= kernel.MAX_HEAD_DIM
            and q.shape[0] * q.shape[1] <= kernel.MAX_GRID_Y)


def _triton_conv2d_prefers(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    """Whether the split-K Triton convolution is the faster choice for this call (few output pixels, a long
    reduction: `fastdiff.kernels.conv2d.prefers_split_k`); under `auto` other convolutions run on the
    reference (cuDNN)."""
    return _module("fastdiff.kernels.conv2d").prefers_split_k(x, weight, stride, padding)


def _auto_linear(x: Tensor, weight: Tensor, residual: Optional[Tensor], geglu: bool) -> tuple[str, bool]:
    """(implementation, whether the tuning table chose it) of a linear under `auto`: "triton" where the kernel
    takes the call's tensors and is the faster choice for it, as the device's tuning table measured
    (`fastdiff.tuning.linear_choice`) or else (and while torch.compile traces) by the built-in rule
    (`fastdiff.kernels.linear.faster_than_cublas`); "cublas" elsewhere."""
    kernel = _module("fastdiff.kernels.linear")
    if not kernel.takes(x, weight, residual, geglu):
        return "cublas", False
    epilogue = "geglu" if geglu else "none" if residual is None else "residual"
    choice = None if torch.compiler.is_compiling() else tuning.linear_choice(x, weight, epilogue)
    if choice is not None:
        return choice, True
    k = x.shape[-1]
    return ("triton" if kernel.faster_than_cublas(x.numel() // max(k, 1), k) else "cublas"), False


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v. q: (B, H, Sq, D); k, v: (B, H, Skv, D) -> (B, H, Sq, D). The Triton kernel
    launches with the config the device's tuning table gives the call (`fastdiff.tuning`), else its default."""
    backend = resolve("attention", q.device.type)
    if backend == "triton" and _chosen["attention"] == "auto" and not _triton_attention_fits(q):
        backend = "reference"
    choice = _tuned(q, k) if backend == "triton" else None
    if choice is not None:
        return _load("attention", backend)(q, k, v, scale, config=choice[1])
    return _load("attention", backend)(q, k, v, scale)


def _tuned(q: Tensor, k: Tensor) -> Optional[tuple[str, tuple[int, int, int, int]]]:
    """The tuning table's (impl, config) for attention over q and k; None without a table, and while
    torch.compile traces (inductor tunes the kernels it compiles itself)."""
    if torch.compiler.is_compiling():
        return None
    return tuning.attention_choice(q, k)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """torch's scaled_dot_product_attention with `ops.attention`'s signature. q: (B, H, Sq, D); k, v:
    (B, H, Skv, D), any strides with the head dim contiguous -> (B, H, Sq, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# matmul_attention's float32 scores per block: 16 MB, 1024 queries x 4096 keys (the VAE's 64x64 map). On an H200
# (CUDA-graph replays, 1x1x4096x512 fp16) 1024 rows took 168 us, 2048 rows 146 us with 24 MB more scores alive.
# A batch-1 image peaked at 2717 MB with either (diffusers eager: 2725 MB): the smaller block keeps the VAE's
# attention well under that peak for 0.02 ms per image.
MATMUL_ATTENTION_SCORES = 1024 * 4096


@functools.cache
def _gemm_writes_float32() -> bool:
    """Whether this torch has baddbmm's `out_dtype` overload (half inputs, float32 output; recent versions)."""
    return "dtype_out" in torch.ops.aten.baddbmm.overloads()


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Attention as a GEMM into float32 scores, a softmax in place and a GEMM, per (batch, head) and block of
    queries (at most MATMUL_ATTENTION_SCORES scores); `ops.attention`'s signature, any head dim. For heads past the
    flash kernels' widths, the VAE's one head of 512, where torch SDPA takes its memory-efficient kernel: at
    1x1x4096x512 fp16 on an H200, 168 against 334 us, and 1337 against 2005 us at batch 8, with the same error
    against a float64 reference (4.6e-4 against SDPA's 4.55e-4, 1.00e-3 against 0.99e-3 at larger logits).
    The probabilities are rounded to v's dtype for the second GEMM, as the flash kernels do."""
    B, H, Sq, D = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    q3, k3, v3 = q.reshape(B * H, Sq, D), k.reshape(B * H, Skv, D), v.reshape(B * H, Skv, Dv)
    out = q.new_empty(B * H, Sq, Dv)
    rows = max(1, min(Sq, MATMUL_ATTENTION_SCORES // Skv))
    scores = torch.empty(1, rows, Skv, device=q.device, dtype=torch.float32)  # reused by every block
    # cuBLAS writes float32 scores from half inputs; elsewhere (the CPU, an older torch) the inputs are upcast
    half_scores = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _gemm_writes_float32()
    for b in range(B * H):
        kt = k3[b:b + 1].transpose(1, 2)
        for i in range(0, Sq, rows):
            qi = q3[b:b + 1, i:i + rows]
            s = scores[:, :qi.shape[1]]
            if half_scores:
                torch.baddbmm(s, qi, kt, beta=0, alpha=scale, out_dtype=torch.float32, out=s)
            else:
                torch.baddbmm(s, qi.float(), kt.float(), beta=0, alpha=scale, out=s)
            torch.softmax(s, -1, out=s)
            torch.bmm(s.to(v.dtype), v3[b:b + 1], out=out[b:b + 1, i:i + rows])
    return out.view(B, H, Sq, Dv)


# The built-in rules of "auto", where no tuning table covers a call (`fastdiff.tuning`). At head dim 40:
# fastdiff's kernel from this many (batch * heads) on, SDPA below. On an H200 the SD1.5 UNet step with fastdiff's
# kernel at the 64x64 level was 1.3% faster at CFG batch 16 (8 x 8 heads = 128) and 0.8% slower at CFG batch 2 (16)
# than with SDPA there.
AUTO_MIN_BATCH_HEADS = 64
# Above this head dim: fastdiff's kernel. At SD1.5's head dim 160 (the 16x16 and 8x8 levels, 256 and 64 tokens) it
# took 7.4 us against SDPA's 10.5 (cuDNN's kernel) at 2x8x256x160 on an H200, and the UNet step 5.869 against
# 5.887 ms at CFG batch 2 (no change at 8 and 16). At head dim 80 SDPA is faster (18.3 vs 19.7 us).
AUTO_TRITON_ABOVE_HEAD_DIM = 128


def _auto_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """"auto" self-attention within the Triton kernel's head dims: the implementation the device's tuning table
    measured faster for the call's shape, else the built-in rules above."""
    choice = _tuned(q, k)
    if choice is not None:
        use_kernel = choice[0] == "fastdiff"
    elif _module("fastdiff.kernels.attention").has_spare_column(q.shape[-1]):
        use_kernel = q.shape[0] * q.shape[1] >= AUTO_MIN_BATCH_HEADS
    else:
        use_kernel = q.shape[-1] > AUTO_TRITON_ABOVE_HEAD_DIM
    if use_kernel:
        return attention(q, k, v, scale)
    if choice is not None:  # the kernel the table gives other sizes of this call
        _compile_later(attention, q, k, v, scale)
    return sdpa_attention(q, k, v, scale)


def _compile_later(fn: Callable[..., Any], *args) -> None:
    """Before the first image of a shape (inside `fastdiff.kernels.compiling_ahead`): fn(*args), what another size
    of this call runs, launched for the compile workers to compile in the background (`compiling_later`), so that
    that size finds its kernels compiled. Elsewhere nothing."""
    _module("fastdiff.kernels._triton").compile_later(lambda call: call(*args), [fn])


def attention_impl(preference: str, head_dim: int) -> Callable[..., Tensor]:
    """The attention function (`attention`'s signature) for one attention module of head size `head_dim`:
    "fastdiff" is `attention` (the Triton kernel where the backend picks it), "sdpa" torch's SDPA, "matmul"
    `matmul_attention`, and "auto" `matmul_attention` past the kernel's widest head, else per call what the
    device's tuning table measured faster (`_auto_attention`)."""
    if preference == "auto":
        if head_dim > _module("fastdiff.kernels.attention").MAX_HEAD_DIM:
            preference = "matmul"
        else:
            return _auto_attention
    impls = {"fastdiff": attention, "sdpa": sdpa_attention, "matmul": matmul_attention}
    if preference not in impls:
        raise ValueError(f"attention preference must be one of {['auto', *impls]}, got {preference!r}")
    return impls[preference]


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None, offset: Optional[Tensor] = None,
               sums: Optional[Tensor] = None) -> Tensor:
    """GroupNorm over x + offset[:, :, None, ...] (offset: (N, C) or None; x: (N, C, *spatial)), then
    `activation` (None or "silu"); sums: x's statistics from the kernel that wrote it (`residual_add_sums`,
    `channel_cat_sums`), which spare the Triton kernel its statistics pass. See `fastdiff.kernels.group_norm`."""
    fn = _load("group_norm", resolve("group_norm", x.device.type))
    return fn(x, num_groups, weight, bias, eps, activation, offset, sums)


def geglu(h: Tensor) -> Tensor:
    """value * GELU(gate) (exact erf GELU) of a GEGLU projection's output. h: (..., 2N) = [value | gate]
    -> (..., N) in h's dtype; see `fastdiff.kernels.geglu` (`FastConfig.fuse_geglu`)."""
    return _load("geglu", resolve("geglu", h.device.type))(h)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
           geglu: bool = False) -> Tensor:
    """F.linear(x, weight, bias), then value * GELU(gate) of its two halves (geglu) or + residual; on the
    Triton backend one kernel with that epilogue. x: (..., K); weight: (N', K) -> (..., N'), or (..., N' / 2)
    with geglu. Under `auto` the Triton kernel runs where it is the faster choice and its inputs fit it
    (`_auto_linear`); other calls run F.linear, then the epilogue (GEGLU through `geglu`'s backend).
    See `fastdiff.kernels.linear`."""
    backend = resolve("linear", x.device.type)
    if backend == "triton" and _chosen["linear"] == "auto":
        impl, tuned = _auto_linear(x, weight, residual, geglu)
        if impl == "cublas":
            if tuned:  # the kernel the table gives other sizes of this call
                _compile_later(_load("linear", backend), x, weight, bias, residual, geglu)
            h = F.linear(x, weight, bias)  # cuBLAS, then the epilogue on its own (GEGLU: its Triton pass)
            if geglu:
                return _load("geglu", resolve("geglu", x.device.type))(h)
            return h if residual is None else residual + h
    return _load("linear", backend)(x, weight, bias, residual, geglu)


def matmul(x: Tensor, weight: Tensor, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """x @ weight^T, an nn.Linear's weight without its bias: x (..., K), weight (N, K) -> (..., N). With `out`
    ((..., N), contiguous) the product is written there, or added onto it when `accumulate`, and out is
    returned. Under `auto` float16/bfloat16 CUDA tensors go to fastdiff._C's cuBLAS call without a workspace
    (no memset before its kernels in a captured graph; `fastdiff.kernels.matmul`), the rest to torch."""
    backend = resolve("matmul", x.device.type)
    if backend == "cuda" and _chosen["matmul"] == "auto" and (x.dtype not in (torch.float16, torch.bfloat16)
                                                              or torch.compiler.is_compiling()):
        backend = "reference"  # float32: torch's GEMM, under torch's TF32 settings; traced: a GEMM inductor sees
    return _load("matmul", backend)(x, weight, out, accumulate)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of x: (..., C); see `fastdiff.kernels.layer_norm`."""
    return _load("layer_norm", resolve("layer_norm", x.device.type))(x, weight, bias, eps)


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, residual_bias: Optional[Tensor] = None,
                   stream_bias: Optional[Tensor] = None, copies: int = 1) -> tuple[Tensor, Tensor]:
    """s = x + residual (+ residual_bias, the bias residual's Linear left out; in x's dtype) and LayerNorm(s)
    over the last dim, one pass on the Triton backend. x, residual: (..., C) -> (s + stream_bias, LayerNorm(s)),
    each written `copies` times along dim 0 ([s; s; ...]); see `fastdiff.kernels.layer_norm`."""
    return _load("add_layer_norm", resolve("add_layer_norm", x.device.type))(x, residual, weight, bias, eps,
                                                                              residual_bias, stream_bias, copies)


def residual_add(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
                 x_bias: Optional[Tensor] = None) -> Tensor:
    """x + x_bias + y + bias (biases [None, :, None, ...]), one pass on the Triton backend: y is a conv's output
    computed without its bias, x the residual (x_bias: the bias its skip conv left out). x, y: (N, C, *spatial),
    same layout, or x with a divisor of y's N samples, repeated over them; bias, x_bias: (C,) or None; out: where
    to write (y's shape, dtype and strides; may be x or y), else a new tensor. x None: y + bias alone (a conv's
    bias in a vectorized pass); see `fastdiff.kernels.residual_add`."""
    return _load("residual_add", resolve("residual_add", y.device.type))(x, y, bias, out, x_bias)


def conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """F.conv2d(x, weight, None, stride, padding): no bias, groups 1, int stride and padding. x: (N, Cin, H, W),
    weight: (Cout, Cin, KH, KW) -> (N, Cout, OH, OW). The Triton backend is a split-K implicit GEMM for
    convolutions with few output pixels (SD1.5's 8x8 level), channels_last tensors only; under `auto` it runs
    only where `fastdiff.kernels.conv2d.prefers_split_k` says so, other calls on the reference. See
    `fastdiff.kernels.conv2d`."""
    backend = resolve("conv2d", x.device.type)
    if backend == "triton" and _chosen["conv2d"] == "auto" and not _triton_conv2d_prefers(x, weight, stride, padding):
        backend = "reference"
    return _load("conv2d", backend)(x, weight, stride, padding)


def channel_cat(x: Tensor, skip: Tensor) -> Tensor:
    """torch.cat([x, skip], dim=1) of (N, C1, H, W) and (N, C2, H, W), or of a skip with a divisor of N samples
    repeated over x's; see `fastdiff.kernels.channel_cat`. The Triton kernel takes channels_last maps only:
    others go to the reference under auto."""
    backend = resolve("channel_cat", x.device.type)
    if backend == "triton" and _chosen["channel_cat"] == "auto" and not (
            x.dim() == 4 and skip.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and skip.is_contiguous(memory_format=torch.channels_last)):
        backend = "reference"
    return _load("channel_cat", backend)(x, skip)


def _triton_sums_pay(out_like: Tensor, *inputs: Optional[Tensor], plain: Callable[[], Any],
                     summing: Callable[[], Any]) -> bool:
    """Whether the Triton producer takes these inputs (channels_last maps) and summing pays at this size
    (`fastdiff.kernels.group_sums.pays`). Where it takes them, what other sizes run instead, `plain()` or
    `summing()`, is compiled for later (`_compile_later`)."""
    maps = all(t is None or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) for t in inputs)
    pays = maps and _module("fastdiff.kernels.group_sums").pays(out_like)
    if maps:
        _compile_later(plain if pays else summing)
    return pays


def residual_add_sums(x: Optional[Tensor], y: Tensor, bias: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                      num_groups: int = 32) -> tuple[Tensor, Optional[Tensor]]:
    """`residual_add(x, y, bias, x_bias=x_bias)` and the statistics of its output for the GroupNorm of
    `num_groups` groups that reads it next (`group_norm(..., sums=)`): (out, sums or None). One kernel on the
    Triton backend. Under auto, calls that kernel does not take (not channels_last) or where summing does not
    pay (small maps) run the plain `residual_add` and return no sums: the norm then computes its own. See
    `fastdiff.kernels.group_sums`."""
    backend = resolve("residual_add_sums", y.device.type)
    plain = functools.partial(residual_add, x, y, bias, x_bias=x_bias)
    summing = functools.partial(_load("residual_add_sums", backend), x, y, bias, x_bias, num_groups)
    if backend == "triton" and _chosen["residual_add_sums"] == "auto" and not _triton_sums_pay(
            y, x, y, plain=plain, summing=summing):
        return plain(), None
    return summing()


def channel_cat_sums(x: Tensor, skip: Tensor, num_groups: int = 32) -> tuple[Tensor, Optional[Tensor]]:
    """`channel_cat(x, skip)` and the statistics of its output for the GroupNorm that reads it next, as
    `residual_add_sums`."""
    backend = resolve("channel_cat_sums", x.device.type)
    plain = functools.partial(channel_cat, x, skip)
    summing = functools.partial(_load("channel_cat_sums", backend), x, skip, num_groups)
    if backend == "triton" and _chosen["channel_cat_sums"] == "auto" and not _triton_sums_pay(
            x, x, skip, plain=plain, summing=summing):
        return plain(), None
    return summing()


def subpixel_shuffle(y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The four phases of a 2x2 convolution's output (B, 4C, H + 1, W + 1) put in place, plus the bias:
    (B, C, 2H, 2W), which is the 3x3 convolution of x's nearest 2x upsampling when the 2x2 weights are
    `fastdiff.kernels.subpixel.subpixel_weight` of its weights; see that module."""
    return _load("subpixel_shuffle", resolve("subpixel_shuffle", y.device.type))(y, bias)


def scheduler_step(x: Tensor, model_output: Tensor, coeffs, guidance_scale: Optional[float] = None,
                   prev_x0: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Fused CFG combine + solver step; see `fastdiff.kernels.scheduler_step`. Returns (x_next, x0)."""
    fn = _load("scheduler_step", resolve("scheduler_step", x.device.type))
    return fn(x, model_output, coeffs, guidance_scale, prev_x0, noise)
