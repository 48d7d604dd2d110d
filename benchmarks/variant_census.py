"""Which Triton kernel variants each image shape compiles, counted on the CPU without a GPU.

    python benchmarks/variant_census.py --arch sd15 --shapes 1x512x512,1x512x768,3x512x512,1x768x768

A shape is batch x height x width in pixels. Triton compiles a kernel once per *variant*: per value of what it
specializes on (each int argument being == 1 and divisible by 16, unless the kernel lists it in
do_not_specialize; each tensor's dtype and 16-byte alignment) and per constexpr the wrappers pick from the
shapes (block sizes, single or split paths). A process that has met one shape compiles, at a new shape, only the
variants that shape adds. This tool lists them:

1. It builds the architecture's UNet and VAE (bench_e2e.ARCHS and VAE, in the dtypes a float16 pipeline runs them)
   in a `FastEngine` with the default `FastConfig`, out of fake CUDA tensors (torch's FakeTensorMode: shapes,
   strides and dtypes, no data; the models are built on the meta device, so there are no weights at all), on a
   CPU-only torch.
2. Per shape, as a pipeline's first image there runs them: `FastEngine.compile_ahead` (the UNet's eager call at
   CFG batch 2B, latents B x 4 x H/8 x W/8, a 2B x 77 context; then, as its `rest`, the VAE decode), then one
   sampling step as the denoiser calls the UNet (the call its CUDA graph captures). Every Triton launch
   (`kernels._triton.Launcher`) is recorded instead of run, as the keys `_triton._variant_compiles` gives it:
   the keys `compiling_ahead` compiles by.
3. It prints, per shape, the launches, the distinct keys and the keys no earlier shape had, grouped by kernel.
   Each new key is compared with what its call site (the module whose forward launched it, the kernel, which
   launch of it there) launched at earlier shapes: which int arguments (by name, with example values) changed
   their == 1 / % 16 specialization, which tensors their alignment, which constexprs their value; a tally per
   kernel, or with --keys one line per distinct change, "@" a module that launches it. A key also holds a tensor
   descriptor's shape and strides, which Triton (3.9) does not specialize on: keys differing only there are one
   Triton compile, counted apart. Keys the sampling step launches that compile_ahead's pass did not meet are
   flagged: they compile inside the first step, one after another. The wrappers run as inside `compiling_ahead`
   (`_triton.compiling()`), so launches they make inside `_triton.compiling_later()` (the variants other sizes of
   a call take) are counted apart, as the background's compiles after the image, and as met by later shapes.
   A summary table ends the report.

What stands in for the GPU (inside `gpu_stand_in`; nothing outside this file is changed):
  - torch.cuda's device queries answer as an H100's (capability 9.0, its name, --sms SMs): fastdiff's tuning
    table for it is read where there is one, else the built-in rules apply, as there;
  - convolutions lay out their output as cuDNN does (channels_last when the input or the weight is);
  - a fake tensor's address is its storage offset in bytes (allocations 16-byte aligned, as the caching
    allocator's are), so views keep their real alignment;
  - ops' "cuda" backend (fastdiff._C's cuBLAS matmul and scheduler step) counts as available, as with the
    extension built for CUDA, and runs as its plain-PyTorch twin: either way no Triton kernel; matmul_attention
    (the VAE's) upcasts instead of asking cuBLAS for float32 scores, which fake tensors lack: no Triton either;
  - indexing, `contiguous` and `copy_` of fake CUDA tensors go through aten's ops (their Python bindings take a
    CUDA device guard, which a CPU-only torch lacks); modules' `.to()` sets parameters' data instead of swapping.
Architectures: SD1.5, SD2.1 (sd21, sd21v) and SDXL (its added conditioning given as zeros, its VAE in float32 as a
float16 pipeline decodes it). Limits: the sampling loop's scheduler step is not run (it takes
fastdiff._C on such a GPU; with the Triton one it would add its own keys), nor the text encoder (no Triton
kernels). torch's own kernels (cuDNN, cuBLAS, SDPA) and their plans are not counted, nor what a compile costs.
The keys are those of this checkout's code, for a GPU with that SM count and Triton's specialization rules.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections import Counter, defaultdict
from typing import Iterator, NamedTuple, Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("variant_census needs Triton's compiled path: unset TRITON_INTERPRET")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
with mock.patch.object(torch.cuda, "is_available", lambda: True):  # bench_e2e's full-size settings, not its CPU ones
    import bench_e2e  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.engine import FastConfig, FastEngine  # noqa: E402
from fastdiff.kernels import _triton  # noqa: E402
from fastdiff.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig  # noqa: E402
from fastdiff.pipeline import vae_dtype_for  # noqa: E402

GPU_NAME = "NVIDIA H100 80GB HBM3"
CAPABILITY = (9, 0)
H100_SMS = 132
CONTEXT_TOKENS = 77
STEPS = 25  # the schedule the sampling step's timestep is a view of (the engine keys time features by it)
ARCHS = ("sd15", "sd21", "sd21v", "sdxl")
PHASES = ("unet", "decode", "step")  # compile_ahead's UNet call, compile_ahead's decode, a sampling step


# ---- a GPU as the fast path sees it, without one -----------------------------------------------------------------

def _fake_data_ptr(original):
    def data_ptr(self: torch.Tensor) -> int:
        if isinstance(self, FakeTensor):
            return self.storage_offset() * self.element_size()
        return original(self)

    return data_ptr


def _cudnn_memory_format(input_: torch.Tensor, weight: torch.Tensor, backend) -> torch.memory_format:
    """cuDNN's output layout for a 2-D convolution: channels_last when the input or the weight is."""
    from torch._prims_common import suggest_memory_format

    if weight.dim() == 4 and torch.channels_last in (suggest_memory_format(input_), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _fake_getitem(t: torch.Tensor, index) -> torch.Tensor:
    """t[index] for ints, slices, None and Ellipsis, through aten's view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in index):
        raise NotImplementedError(f"variant_census indexes fake tensors with ints, slices, None and ..., got {index}")
    dim = 0  # the dim of t the next index applies to
    for position, i in enumerate(index):
        if i is Ellipsis:  # the indices after it take t's last dims
            dim = t.dim() - sum(1 for j in index[position + 1:] if j is not None and j is not Ellipsis)
        elif i is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(i, int):
            t = t.select(dim, i)
        else:
            t = torch.ops.aten.slice.Tensor(t, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
    return t


def _fake_contiguous(t: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=memory_format) else torch.ops.aten.clone.default(
        t, memory_format=memory_format)


def _fake_copy_(t: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    return torch.ops.aten.copy_.default(t, src, non_blocking)


def _apply_setting_data(module: torch.nn.Module, fn, recurse: bool = True) -> torch.nn.Module:
    """nn.Module._apply (`.to()`, `.half()`, `.to_empty()`) as torch did it before swapping tensors: each parameter
    keeps its object and takes fn's result as its data (torch swaps fake parameters instead, which fails: the fake
    mode holds weak references to them); a meta parameter made fake (`to_empty`) is replaced."""
    if recurse:
        for child in module.children():
            _apply_setting_data(child, fn)
    with torch.no_grad():
        for name, param in module._parameters.items():
            if param is None:
                continue
            data = fn(param)
            if torch._has_compatible_shallow_copy_type(param, data):
                param.data = data
            else:
                module._parameters[name] = torch.nn.Parameter(data, param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = fn(buffer)
    return module


def _with_cuda_backend(original):
    def availability(backend: str, device_type: str, op: str = "scheduler_step") -> tuple[bool, str]:
        if backend == "cuda" and device_type == "cuda":
            return True, "fastdiff._C stand-in (its plain-PyTorch twin)"
        return original(backend, device_type, op)

    return availability


@contextlib.contextmanager
def gpu_stand_in(sms: int, record) -> Iterator[None]:
    """Inside: a FakeTensorMode whose CUDA tensors the fast path takes for a GPU's, every Launcher launch going
    to `record(launcher, grid, *args, **meta)` instead of Triton (see the module docstring)."""
    cuda_twins = {(op, "cuda"): ops._load(op, "reference") for op in ops.OPS if "cuda" in ops._IMPLS[op]}
    patches = [
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: CAPABILITY),
        mock.patch.object(torch.cuda, "get_device_name", lambda device=None: GPU_NAME),
        mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False),
        mock.patch.object(torch._C, "_conv_determine_backend_memory_format", _cudnn_memory_format),
        mock.patch.object(torch.Tensor, "data_ptr", _fake_data_ptr(torch.Tensor.data_ptr)),
        # the tensor methods whose Python bindings take a CUDA device guard, which a CPU-only torch has none of
        mock.patch.object(FakeTensor, "__getitem__", _fake_getitem, create=True),
        mock.patch.object(FakeTensor, "contiguous", _fake_contiguous, create=True),
        mock.patch.object(FakeTensor, "copy_", _fake_copy_, create=True),
        mock.patch.object(torch.nn.Module, "_apply", _apply_setting_data),
        mock.patch.object(_triton, "_sm_count", lambda device: sms),
        mock.patch.object(_triton, "compiling", lambda: True),  # the wrappers add what later sizes take
        mock.patch.object(_triton.Launcher, "_launch",
                          lambda launcher, grid, *args, **meta: record(launcher, grid, *args, **meta)),
        mock.patch.object(ops, "availability", _with_cuda_backend(ops.availability)),
        mock.patch.object(ops, "_gemm_writes_float32", lambda: False),  # fake baddbmm lacks out_dtype; no Triton
        mock.patch.dict(ops._impl_cache, cuda_twins),
    ]
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))  # meta modules become fake: non-fake inputs
        yield


# ---- recording launches ------------------------------------------------------------------------------------------

class Census:
    """The variant keys of every Launcher launch of the current shape, per phase and per call site; for each key,
    its kernel and the int arguments of its first launch (example values).

    A call site is the innermost module whose forward made the launch (its qualified name, "unet.down_blocks.0..."),
    the kernel and which of that kernel's launches in that forward it was: a new key is compared with the keys
    its own site launched at earlier shapes."""

    def __init__(self):
        self.phase: Optional[str] = None
        self.jits: dict[int, object] = {}  # id(jit) -> the JITFunction
        self.examples: dict[tuple, dict] = {}  # key -> {arg name: int value} of its first launch
        self.module_names: dict[int, str] = {}  # id(module) -> qualified name
        self.stack: list[tuple[str, Counter]] = []  # modules in their forward: (name, launches per kernel there)
        self.site_order: dict[str, int] = {}  # call site -> when it first launched (for a stable report)
        self.start_shape()

    def start_shape(self) -> None:
        self.launches: Counter = Counter()  # phase -> launches
        self.keys: dict[str, set] = defaultdict(set)  # phase -> keys
        self.site_keys: dict[str, set] = defaultdict(set)  # call site -> keys
        self.key_sites: dict[tuple, list] = defaultdict(list)  # key -> its call sites
        self.outside = Counter()  # launches per kernel outside any module's forward
        self.later: set = set()  # keys launched inside `_triton.compiling_later()`: compiled in the background

    def record(self, launcher: _triton.Launcher, grid, *args, **meta) -> None:
        jit = launcher.jit
        if _triton._later:  # a variant another size of this call takes: the background's, not this image's
            self.jits[id(jit)] = jit
            for key, *_ in _triton._variant_compiles(launcher, args, meta):
                self.later.add(key)
                self.examples.setdefault(key, {name: a for name, a in zip(jit.arg_names, args)
                                               if isinstance(a, int) and not isinstance(a, bool)})
            return
        self.jits[id(jit)] = jit
        self.launches[self.phase] += 1
        module, counts = self.stack[-1] if self.stack else ("engine", self.outside)
        counts[jit.fn.__name__] += 1
        site = f"{module}:{jit.fn.__name__}#{counts[jit.fn.__name__]}"
        self.site_order.setdefault(site, len(self.site_order))
        for key, *_ in _triton._variant_compiles(launcher, args, meta):
            self.keys[self.phase].add(key)
            self.site_keys[site].add(key)
            if site not in self.key_sites[key]:
                self.key_sites[key].append(site)
            self.examples.setdefault(key, {name: a for name, a in zip(jit.arg_names, args)
                                           if isinstance(a, int) and not isinstance(a, bool)})

    @contextlib.contextmanager
    def recording(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    @contextlib.contextmanager
    def tracking(self, **roots: torch.nn.Module) -> Iterator[None]:
        """Inside: every module forward of `roots` (and their submodules, named from the root's keyword) is on
        the stack while it runs."""
        self.module_names = {id(m): name for prefix, root in roots.items()
                             for name, m in root.named_modules(prefix=prefix)}

        def enter(module, args):
            self.stack.append((self.module_names.get(id(module), type(module).__name__), Counter()))

        def leave(module, args, output):
            self.stack.pop()

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                   torch.nn.modules.module.register_module_forward_hook(leave)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# ---- the models and one shape's first image ----------------------------------------------------------------------

def build_models(arch: str) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """`arch`'s UNet in float16 and VAE in the dtype a float16 pipeline decodes in (float32 for SDXL's), on the meta
    device (random init cannot run on fake CUDA tensors here, and values do not matter)."""
    spec = bench_e2e.ARCHS[arch]
    vae_config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in bench_e2e.vae_for(arch).items()})
    with torch.device("meta"):
        return (UNet2DConditionModel(UNetConfig(**spec["unet"])).to(torch.float16),
                AutoencoderKL(vae_config).to(vae_dtype_for(vae_config, torch.float16, bench_e2e.is_sdxl(arch))))


def fast_engine(unet: UNet2DConditionModel, vae: AutoencoderKL) -> FastEngine:
    """The models on fake CUDA storage (inside `gpu_stand_in`) in a FastEngine with the default FastConfig, without
    CUDA graphs (which the recorded calls never reach)."""
    return FastEngine(unet.to_empty(device="cuda"), vae.to_empty(device="cuda"), None, FastConfig(cuda_graphs=False))


def first_image(engine: FastEngine, census: Census, shape: tuple[int, int, int], tag: int) -> None:
    """What the first image of `shape` launches before and while sampling: compile_ahead (the UNet's eager call,
    then the decode as its `rest`), then one sampling step through the denoiser."""
    batch, height, width = shape
    x = torch.zeros(batch, engine.unet.config.in_channels, height // 8, width // 8, device="cuda")  # float32
    context = torch.zeros(2 * batch, CONTEXT_TOKENS, engine.unet.config.cross_attention_dim, device="cuda",
                          dtype=engine.dtype)
    latents = (x / engine.vae.config.scaling_factor).to(next(engine.vae.parameters()).dtype)
    config = engine.unet.config
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and six size and crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = dict(text_embeds=torch.zeros(2 * batch, pooled, device="cuda", dtype=engine.dtype),
                     time_ids=torch.zeros(2 * batch, 6, device="cuda"))

    def rest() -> None:
        census.phase = "decode"
        engine.decode(latents)

    with census.recording("unet"):
        engine.compile_ahead(("variant_census", tag), x, context, rest, **added)
    with census.recording("step"):
        timesteps = torch.linspace(999.0, 0.0, STEPS, device="cuda")
        engine.denoiser(context, cfg=True, **added)(x, timesteps.select(0, 0))


# ---- reading keys ------------------------------------------------------------------------------------------------
# A key (`_triton._variant_compiles`): (id of the JITFunction, one spec per runtime argument (`_specialization`),
# the sorted constexprs). Triton specializes a host tensor descriptor on its dtype and block shape only (3.9's
# native_specialize_impl: "tensordesc<fp16[128, 32]>"), while the key also holds its shape and strides: keys that
# differ there alone are one Triton compile (`compile_key`).

def is_descriptor_spec(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 5 and spec[0] == "tensordesc"


def compile_key(key: tuple) -> tuple:
    """`key` reduced to what Triton compiles by: descriptors to (dtype, block shape)."""
    specs = tuple(spec[:3] if is_descriptor_spec(spec) else spec for spec in key[1])
    return key[0], specs, key[2]


def kernel_name(census: Census, key: tuple) -> str:
    return census.jits[key[0]].fn.__name__


def spec_text(spec) -> str:
    """One runtime argument's part of a key, readable."""
    if spec is None:
        return "None"
    if spec is float:
        return "float"
    if isinstance(spec, tuple) and spec and spec[0] is int:
        width = "" if spec[1] else " i64"
        if len(spec) == 2:
            return "int (not specialized)" + width
        return ("==1" if spec[2] else "%16" if spec[3] else "plain") + width
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], torch.dtype):
        return f"{str(spec[0]).removeprefix('torch.')} {'aligned' if spec[1] else 'UNALIGNED'}"
    return repr(spec)


def descriptor_change(old: tuple, new: tuple) -> str:
    fields = ("kind", "dtype", "block", "shape", "strides")
    return ", ".join(f"{field} {a} -> {b}" for field, a, b in zip(fields, old, new) if a != b)


class Change(NamedTuple):
    """One difference between two keys: a runtime argument's specialization (`label` "P %16 -> plain", `values`
    example values "512 -> 523") or a descriptor's parts, or a constexpr (`label` its name, `values` "64 -> 128")."""
    label: str
    values: str = ""
    constexpr: bool = False

    def text(self, values: Optional[list[str]] = None) -> str:
        values = values or ([self.values] if self.values else [])
        if self.constexpr:
            return f"{self.label} {' / '.join(values)}"
        return self.label + (f" (e.g. {values[0]})" if values else "")


def differences(census: Census, new: tuple, old: tuple) -> list[Change]:
    """What differs from `old` in `new` (keys of one kernel): runtime arguments, by name, and constexprs."""
    names = census.jits[new[0]].arg_names
    out = []
    for i, (a, b) in enumerate(zip(old[1], new[1])):
        if a == b:
            continue
        name = names[i]
        if is_descriptor_spec(a) and is_descriptor_spec(b):
            out.append(Change(f"{name}: {descriptor_change(a, b)}"))
            continue
        values = ""
        if name in census.examples[old] and name in census.examples[new]:
            values = f"{census.examples[old][name]} -> {census.examples[new][name]}"
        out.append(Change(f"{name} {spec_text(a)} -> {spec_text(b)}", values))
    before, after = dict(old[2]), dict(new[2])
    for name in sorted(set(before) | set(after)):
        if before.get(name, "-") != after.get(name, "-"):
            out.append(Change(name, f"{before.get(name, '-')} -> {after.get(name, '-')}", constexpr=True))
    return out


def nearest(census: Census, key: tuple, candidates: set) -> Optional[tuple]:
    """The candidate key of the same kernel that differs from `key` in the fewest places."""
    same = [k for k in candidates if k[0] == key[0]]
    return min(same, key=lambda k: (len(differences(census, key, k)), str(k)), default=None)


FIRST_AT_SITE = Change("first launch at its site")


def explain(census: Census, key: tuple, seen: set, seen_sites: dict) -> list[Change]:
    """How a new key differs from what its call site launched at earlier shapes, or, where the site launches the
    kernel for the first time (a wrapper that switched paths, an op `auto` sends to Triton only at some shapes),
    from the nearest key of its kernel anywhere."""
    earlier = set().union(*(seen_sites.get(site, set()) for site in census.key_sites[key]))
    old = nearest(census, key, earlier)
    first = []
    if old is None:
        old, first = nearest(census, key, seen), [FIRST_AT_SITE]
    if old is None:
        return [Change("kernel not launched before")]
    return first + differences(census, key, old)


def shape_text(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def module_of(site: str) -> str:
    return site.split(":")[0].removeprefix("unet.").removeprefix("vae.")


def print_new_keys(census: Census, new: set, seen: set, seen_sites: dict, per_key: bool) -> None:
    """The new keys grouped by kernel: how many, how many new Triton compiles, and what changed in the compiled
    ones against their sites' earlier keys: tallied (each change, how many keys have it, example values), or
    with `per_key` one line per distinct change with a module that launches it."""
    seen_compiles = {compile_key(k) for k in seen}
    by_kernel: dict[str, list] = defaultdict(list)
    for key in new:
        by_kernel[kernel_name(census, key)].append(key)
    for name in sorted(by_kernel):
        keys = by_kernel[name]
        compiled = [k for k in keys if compile_key(k) in seen_compiles]
        compiles = len({compile_key(k) for k in keys} - seen_compiles)
        phases = "/".join(p for p in PHASES if any(k in census.keys[p] for k in keys))
        same = f", {len(compiled)} differ only in descriptor shapes" if compiled else ""
        print(f"   {name}: +{len(keys)} keys, {compiles} new compiles ({phases}){same}")
        explained = {key: explain(census, key, seen, seen_sites) for key in keys if key not in compiled}
        if per_key:
            lines: dict[str, list] = defaultdict(list)
            for key, changes in explained.items():
                lines["; ".join(c.text() for c in changes)].extend(census.key_sites[key])
            for line, sites in sorted(lines.items()):
                sites = sorted(set(sites), key=census.site_order.__getitem__)
                where = module_of(sites[0]) + (f" +{len(sites) - 1}" if len(sites) > 1 else "")
                print(f"      {line}  @ {where}")
        elif explained:
            tally: dict[str, list[Change]] = defaultdict(list)
            for changes in explained.values():
                for change in changes:
                    tally[change.label].append(change)
            print("      " + "; ".join(
                f"{found[0].text(sorted({c.values for c in found if c.values}))} x{len(found)}"
                for _, found in sorted(tally.items(), key=lambda item: (-len(item[1]), item[0]))))


def print_first_shape(census: Census, keys: set) -> None:
    """The first shape's keys per kernel (all new): keys/Triton compiles."""
    by_kernel: dict[str, list] = defaultdict(list)
    for key in keys:
        by_kernel[kernel_name(census, key)].append(key)
    print("   by kernel (keys/compiles): " + ", ".join(
        f"{name.strip('_').removesuffix('_kernel')} {len(k)}/{len({compile_key(x) for x in k})}"
        for name, k in sorted(by_kernel.items())))


def report_shape(census: Census, shape: tuple[int, int, int], seen: set, seen_sites: dict, per_key: bool) -> dict:
    """Print one shape's launches and new keys; return its summary row."""
    keys = set().union(*census.keys.values())
    new = keys - seen
    new_compiles = {compile_key(k) for k in new} - {compile_key(k) for k in seen}
    late = census.keys["step"] - census.keys["unet"] - census.keys["decode"]
    batch, height, width = shape
    print(f"== {shape_text(shape)}: latents {height // 8}x{width // 8}, UNet batch {2 * batch}")
    print("   launches " + ", ".join(f"{p} {census.launches[p]}" for p in PHASES)
          + " | keys " + ", ".join(f"{p} {len(census.keys[p])}" for p in PHASES)
          + f", {len(keys)} distinct | new keys {len(new)}, new Triton compiles {len(new_compiles)}")
    for key in sorted(late, key=str):
        print(f"   ! compile_ahead misses a key the sampling step launches: {kernel_name(census, key)} "
              f"@ {module_of(census.key_sites[key][0])} {dict(key[2])}")
    if seen:
        print_new_keys(census, new, seen, seen_sites, per_key)
    else:
        print_first_shape(census, new)
    compiles_in = {p: {compile_key(k) for k in census.keys[p]} & new_compiles for p in PHASES}
    later = {compile_key(k) for k in census.later - seen - keys}
    return dict(shape=shape_text(shape), launches=sum(census.launches.values()), keys=len(keys), new=len(new),
                compiles=len(new_compiles), unet=len(compiles_in["unet"] | compiles_in["step"]),
                decode=len(compiles_in["decode"]), late=len(late), later=len(later))


def print_summary(rows: list[dict]) -> None:
    print("\nshape        launches  keys  new keys  new compiles  (UNet  decode)  step-only keys  background   "
          "[new: not met at an earlier shape or in its background; compiles: Triton's, descriptor shapes dropped; "
          "background: compiles for other sizes after the image]")
    for r in rows:
        print(f"{r['shape']:<12} {r['launches']:8d}  {r['keys']:4d}  {r['new']:8d}  {r['compiles']:12d}  "
              f"({r['unet']:4d}  {r['decode']:6d})  {r['late']:14d}  {r['later']:10d}")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in text.split(","):
        batch, height, width = (int(n) for n in part.strip().lower().split("x"))
        if height % 8 or width % 8:
            raise ValueError(f"{part}: height and width must be multiples of 8")
        shapes.append((batch, height, width))
    return shapes


def _has_tuning_table() -> bool:
    from fastdiff import tuning

    return tuning.device_table(0) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=ARCHS)
    parser.add_argument("--shapes", default="1x512x512,1x512x768,3x512x512,1x768x768",
                        help="comma-separated BATCHxHEIGHTxWIDTH, pixels")
    parser.add_argument("--sms", type=int, default=H100_SMS, help="the GPU's SM count (grid sizing rules read it)")
    parser.add_argument("--keys", action="store_true",
                        help="one line per new key's change, with a module launching it, instead of a tally per kernel")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    census = Census()
    unet, vae = build_models(args.arch)
    with gpu_stand_in(args.sms, census.record):
        engine = fast_engine(unet, vae)
        print(f"{args.arch}: UNet and VAE float16, default FastConfig, {args.sms} SMs ({GPU_NAME} stand-in), "
              f"tuning: {'table' if _has_tuning_table() else 'built-in rules'}")
        seen: set = set()
        seen_sites: dict[str, set] = defaultdict(set)
        rows = []
        for i, shape in enumerate(shapes):
            census.start_shape()
            with torch.no_grad(), census.tracking(unet=engine.unet, vae=engine.vae):
                first_image(engine, census, shape, i)
            rows.append(report_shape(census, shape, seen, seen_sites, args.keys))
            seen |= set().union(*census.keys.values()) | census.later
            for site, keys in census.site_keys.items():
                seen_sites[site] |= keys
    print_summary(rows)


if __name__ == "__main__":
    main()
