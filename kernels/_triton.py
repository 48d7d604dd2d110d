"""What every Triton kernel module shares: the optional import, interpreter mode, the device check."""
import functools
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from . import _compile_processes

# triton is optional: CUDA builds of torch on Linux bring it, CPU-only installs have none. Without it every
# kernel module still imports (its Triton kernels are defined under `if triton is not None:`), the `<op>_ref`
# twins and fastdiff.ops' reference backend work, and a Triton kernel's call raises NO_TRITON.
try:
    import triton
    from triton import knobs
    from triton.runtime import driver
except ImportError as e:
    triton = knobs = driver = None
    NO_TRITON = (f"the Triton kernels need triton, which does not import here ({e}): install it with "
                 "`pip install triton` (Linux x86_64), or use the `<op>_ref` functions or fastdiff.ops, which run "
                 "on plain PyTorch")
else:
    NO_TRITON = ""

# TRITON_INTERPRET is read when a kernel is defined: set it before importing fastdiff to run on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_device(t: Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    if triton is None:
        raise RuntimeError(NO_TRITON)
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors, got a tensor on {t.device} "
                         "(set TRITON_INTERPRET=1 before importing fastdiff to run them on the CPU interpreter)")


def check_like(x: Tensor, **tensors: Optional[Tensor]) -> None:
    """Every named tensor that is given (not None) must have x's dtype and device; ValueError naming it if not."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")


# (value, device, dtype) -> CONSTANT_ROW_LENGTH copies of value, for `constant_row`. Made once and never
# replaced: a captured CUDA graph keeps reading the buffer it was captured with.
_CONSTANT_ROWS: dict[tuple, Tensor] = {}
CONSTANT_ROW_LENGTH = 8192


def constant_row(value: float, length: int, like: Tensor) -> Optional[Tensor]:
    """(length,) copies of `value` on like's device in like's dtype: what a kernel reads in place of an absent
    optional input, so that calls with and without that input launch one compiled variant (a None pointer is a
    constant Triton compiles a variant for). A view of one buffer per value, device and dtype. None, for the
    caller to pass None instead, past CONSTANT_ROW_LENGTH values and during a CUDA-graph capture that finds no
    buffer (one allocated there would belong to the graph's memory pool)."""
    if length > CONSTANT_ROW_LENGTH:
        return None
    key = (repr(float(value)), like.device, like.dtype)  # repr tells -0.0 from 0.0
    if key not in _CONSTANT_ROWS:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        _CONSTANT_ROWS[key] = torch.full((CONSTANT_ROW_LENGTH,), value, dtype=like.dtype, device=like.device)
    return _CONSTANT_ROWS[key][:length]


def repeat_samples(t: Tensor, samples: int) -> Tensor:
    """[t; t; ...] along dim 0 up to `samples` rows (a multiple of t's), in t's memory layout; t itself when it
    has them already. The reference twins' form of a shared sample repeated over classifier-free guidance's
    rows, which the kernels read in place (sample n % t.shape[0])."""
    return t if t.shape[0] == samples else torch.cat([t] * (samples // t.shape[0]))


def jit_function(kernel):
    """The @triton.jit function under a kernel's @triton.autotune / @triton.heuristics wrappers (tools that
    compile a kernel for a GPU they do not run on need it; not under the interpreter)."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv is a constexpr function, microseconds per call from Python."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (1 for the CPU interpreter): sizes persistent grids."""
    return _sm_count(str(device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 1


class Launcher:
    """A kernel's `kernel[grid](*args, **meta)` that skips Triton's per-call Python on repeated calls.

    Triton's launch path binds the arguments, builds the specialization key, looks up the autotuner's cache
    and evaluates the heuristics in Python on every call: tens of microseconds of host time, against a few
    for a torch C++ op. Eager callers at batch 1 (a diffusers pipeline) are bound by exactly that host time.
    The first call with a given argument signature goes through Triton (compiling and autotuning as usual)
    and records what it chose: the compiled kernel and the constexprs (call-site, autotuned, heuristic).
    Later calls with the same signature call the compiled kernel's launcher with them directly, on the grid
    their own call passes (evaluated with the recorded constexprs when it is a function of them).

    The signature holds every integer argument's value, each tensor's dtype and 16-byte alignment, and the
    call-site constexprs: everything Triton specializes on and the autotune keys and heuristics depend on,
    so a recorded launch is the one Triton would have made. The grid is never part of it: a grid may depend
    on values that are no kernel argument (GroupNorm's and attention's on the batch size), so every call
    brings its own. Runtime arguments must be positional and constexprs keywords (the kernels' signatures
    list runtime arguments first). Under the interpreter, while a launch hook is set (profilers), or inside
    `with Launcher.disabled():` (comparisons, debugging), every call goes through Triton.
    """

    enabled = True

    @staticmethod
    @contextmanager
    def disabled() -> Iterator[None]:
        """Every launch inside the block goes through Triton's own launch path."""
        saved, Launcher.enabled = Launcher.enabled, False
        try:
            yield
        finally:
            Launcher.enabled = saved

    def __init__(self, kernel):
        self.kernel = kernel
        self.jit = None if INTERPRET else jit_function(kernel)
        if self.jit is not None:
            self.jit.pre_run_hooks.append(self._record)
        self._recorded: dict[int, tuple] = {}  # per thread: a compile in another thread runs the same hook
        self._launches: dict[tuple, tuple] = {}

    def _record(self, *args, **kwargs) -> None:
        # The launch Triton is about to make: how many positional (runtime) arguments and the keyword ones,
        # constexprs included. Never the positional values: they are the launch's tensors, and a reference
        # kept here would hold them after the call (1 GB of the VAE decoder's activations at batch 8).
        self._recorded[threading.get_ident()] = len(args), kwargs

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta) -> None:
        if INTERPRET:
            self.kernel[grid](*args, **meta)
            return
        device = driver.active.get_current_device()
        key = (device, *map(_signature, args), *meta.items())
        launch = self._launches.get(key)
        if _compile_pool is not None:  # inside compiling_ahead(): compile what the launch needs, launch nothing
            if launch is None:
                _compile_pool.submit(self, device, args, meta, later=_later)
            return
        hooked = _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)
        if not self.enabled or hooked:
            self.kernel[grid](*args, **meta)
            return
        if launch is None:
            compiled = self.kernel[grid](*args, **meta)
            self._launches[key] = self._recorded_launch(compiled, len(args))
            return
        compiled, constexprs, named_constexprs = launch
        if callable(grid):
            grid = grid({**dict(zip(self.jit.arg_names, args)), **named_constexprs})
        grid_0, grid_1, grid_2 = (*grid, 1, 1)[:3]
        compiled.run(grid_0, grid_1, grid_2, driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constexprs)

    def _recorded_launch(self, compiled, n_args: int) -> tuple:
        """(compiled kernel, its constexpr values in signature order, the same by name) of the launch just made."""
        recorded_args, kwargs = self._recorded.pop(threading.get_ident())
        constexpr_names = self.jit.arg_names[n_args:]
        if recorded_args != n_args or any(i not in self.jit.constexprs for i in range(n_args, len(self.jit.arg_names))):
            raise TypeError(f"{self.jit.fn.__name__}: Launcher needs runtime arguments positional and constexprs "
                            f"as keywords, got {n_args} positional arguments for {self.jit.arg_names}")
        constexprs = {name: kwargs[name] for name in constexpr_names}
        return compiled, tuple(constexprs.values()), constexprs


class _CompilePool:
    """The threads of a `compiling_ahead()` block, the compiles they were given, and the variants to compile
    in the background once they are done (`compiling_later`)."""

    def __init__(self, workers: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastdiff-compile")
        self.futures: list[Future] = []
        self.submitted: set[tuple] = set()  # (device, variant key) compiled by this block: one compile each
        self.later: dict[tuple, Variant] = {}  # (device, variant key) -> variant, for the background

    def submit(self, launcher: Launcher, device: int, args: tuple, meta: dict, later: bool = False) -> None:
        for variant in _variant_compiles(launcher, args, meta):
            key = (device, variant.key)
            if key in self.submitted:
                continue
            if later:
                if key not in _submitted_later:
                    _submitted_later.add(key)
                    self.later[key] = variant
                continue
            # Needed now, even where an earlier call of the block put it down for other sizes: compiled here.
            self.submitted.add(key)
            self.later.pop(key, None)
            self.futures.append(self.executor.submit(_on_device, device, functools.partial(
                _compile_and_load, variant.jit, variant.compile)))

    def wait(self) -> None:
        try:
            for future in self.futures:
                future.result()  # the first compile error surfaces here
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.later:
            _compile_processes.compile_in_background(
                [functools.partial(_on_device, device, functools.partial(_capture, variant.jit, variant.compile))
                 for (device, _), variant in self.later.items()])


_compile_pool: Optional[_CompilePool] = None
_later = False  # inside compiling_later()
_submitted_later: set[tuple] = set()  # (device, variant key) handed to the background already, in any block
COMPILE_WORKERS = 4  # compiling_ahead's thread count without worker processes (see there)
COMPILE_PROCESSES = _compile_processes.DEFAULT_PROCESSES  # compiling_ahead's worker processes (0: none)


def start_compile_processes(processes: Optional[int] = None) -> int:
    """Start `compiling_ahead`'s worker processes now (default COMPILE_PROCESSES), so that they have imported
    torch and Triton (seconds) by the first compile, and Triton's cache key in a thread
    (`_compile_processes.hash_triton_ahead`): `prepare_engine` calls it before the weights load. Returns how many
    workers run; 0 under the interpreter, without Triton or without a GPU."""
    processes = COMPILE_PROCESSES if processes is None else processes
    if INTERPRET or triton is None or not torch.cuda.is_available():
        return 0
    _compile_processes.hash_triton_ahead()
    return _compile_processes.start(processes) if processes > 0 else 0


def compiling() -> bool:
    """Whether launches compile instead of running (inside `compiling_ahead()`)."""
    return _compile_pool is not None


@contextmanager
def compiling_later() -> Iterator[None]:
    """Inside `compiling_ahead()`, the launches of this block are compiled later: by the worker processes, in the
    background once the outer block's own compiles are done, into Triton's on-disk cache only. A kernel's wrapper
    makes them for the variants its call site takes at other sizes (the other side of a size threshold), so that
    the first call of such a size finds them compiled (then loading one costs milliseconds). Without worker
    processes nothing is compiled for them. Outside `compiling_ahead()` the launches run, as ever: use it under
    `if compiling():`."""
    global _later
    saved, _later = _later, True
    try:
        yield
    finally:
        _later = saved


def compile_later(launch: Callable[[Any], None], alternatives: Iterable) -> None:
    """Inside `compiling_ahead()`: launch(a) for each of `alternatives` (the plans, tiles or row counts other sizes
    of the call take; a generator is not even run elsewhere) inside `compiling_later()`. Elsewhere nothing."""
    if compiling():
        with compiling_later():
            for alternative in alternatives:
                launch(alternative)


@contextmanager
def compiling_ahead(workers: Optional[int] = None, processes: Optional[int] = None) -> Iterator[None]:
    """Inside the block, Triton kernels are compiled in parallel instead of launched.

    A Launcher call with an argument signature that has not launched yet does not run: every variant it
    would compile (an autotuned kernel's candidates after pruning, each one) goes to a pool of threads, and
    the call returns at once, its outputs unwritten. Calls of known signatures are skipped as well. Leaving
    the block waits for every compile and re-raises the first error.

    Each thread has a worker process (`fastdiff.kernels._compile_processes`; `processes` of them, default
    COMPILE_PROCESSES, started here unless `start_compile_processes` did) compile its variant, then loads it
    from Triton's cache, on the device, and builds its launcher (`_compile_and_load`). Without worker
    processes the threads (`workers`, default one per CPU, at most COMPILE_WORKERS) compile in this process.
    Run a model's forward inside it on inputs of the shapes to come (its outputs are garbage: drop them), and
    the real forward afterwards finds its kernels compiled and loaded (it still autotunes). Triton's compiler
    releases the GIL for much of its work (MLIR and LLVM passes, ptxas), so threads overlap (11 GroupNorm and
    attention variants took 7.0 s one after the other and 3.8 s on two threads of a 2-core CPU), but its Python
    front end holds it: on a 16-core H200 host the SD1.5 first image's 81 compiles took 6.3-7.0 s on 4 threads
    and on 16 alike, and 16 threads starved the thread running the model (5-6 s to issue its calls against 1.1 s
    with 4). Worker processes take the front ends out of this process; at 48 compiles the H100 cold start took
    as long with them as with threads, and they are what compiles `compiling_later`'s variants in the background
    without taking the images' host time. A nested block joins the outer one. Under the interpreter there is
    nothing to compile and launches run as usual.
    """
    global _compile_pool
    if _compile_pool is not None or INTERPRET or triton is None:
        yield
        return
    running = start_compile_processes(processes)
    pool = _compile_pool = _CompilePool(running or workers or min(COMPILE_WORKERS, os.cpu_count() or 1))
    try:
        yield
    finally:
        _compile_pool = None
        pool.wait()


class Variant(NamedTuple):
    """One compiled variant a launch may need: its key, its kernel's JITFunction, and `compile()`, which
    compiles it without a launch (`jit.run(..., warmup=True)` on stand-ins for the launch's tensors)."""
    key: tuple
    jit: Any
    compile: Callable[[], Any]


def _variant_compiles(launcher: Launcher, args: tuple, meta: dict) -> list[Variant]:
    """A `Variant` for each one `launcher[grid](*args, **meta)` may compile. Launches that differ only in what
    Triton does not specialize on (an int's value beyond == 1 and divisibility by 16, a tensor's address beyond
    16-byte alignment) have the same keys, so a variant is compiled once however many shapes use it. Autotuner
    candidates are pruned and heuristics evaluated here, on the calling thread (pruning reads the autotuner's
    state), and the compiles get stand-ins for the tensors (`_TensorSpec`): a compile waiting in the pool must
    not keep its launch's tensors alive (with the real ones the SD1.5 first image at batch 8 peaked 2.4 GB
    higher on an empty cache)."""
    kernel, jit = launcher.kernel, launcher.jit
    named = {**dict(zip(jit.arg_names, args)), **meta}
    specialized = tuple(_specialization(arg, param.do_not_specialize) for arg, param in zip(args, jit.params))
    standins = tuple(_standin(arg) for arg in args)
    configs = [None]
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = kernel.prune_configs(meta)
        finally:
            kernel.nargs = None
        kernel = kernel.fn
    variants = []
    for config in configs:
        constexprs = {**meta, **(config.all_kwargs() if config is not None else {})}
        wrapper = kernel
        while isinstance(wrapper, triton.runtime.Heuristics):  # what the heuristics would add to the launch
            constexprs.update({name: rule({**named, **constexprs}) for name, rule in wrapper.values.items()})
            wrapper = wrapper.fn
        key = (id(jit), specialized, tuple(sorted(constexprs.items())))
        variants.append(Variant(key, jit, functools.partial(jit.run, *standins, grid=None, warmup=True,
                                                            **constexprs)))
    return variants


def _capture(jit, compile_variant: Callable[[], Any]) -> Optional[tuple[Any, str]]:
    """(jit, Triton's specialization data) of the variant compile_variant() compiles, for a worker process; None
    when it is compiled in this process already."""
    spec = _compile_processes.specialization_data(compile_variant)
    return None if spec is None else (jit, spec)


def _compile_and_load(jit, compile_variant: Callable[[], Any]) -> None:
    """Compile one variant (in a worker process where one runs, else here), then do what its first launch would
    do next: load it on the device and build its launcher. Triton builds a small C launcher module per new
    argument signature with the host's C compiler (about 0.25 s each, kept in the cache directory; a worker
    builds it beside the variant); left to the first launches, on an empty cache those builds took 3.1 s of the
    first SD1.5 image on an H200 host, one after the other on the calling thread."""
    _compile_processes.wait_for_triton_key()
    kernel = _compile_processes.compile_in_worker(jit, compile_variant) or compile_variant()
    if kernel is None or not hasattr(kernel, "_init_handles"):
        return
    try:
        kernel._init_handles()
    except triton.runtime.errors.OutOfResources:
        pass  # a config this GPU cannot run: the kernel keeps the error, and the autotuner skips the config


class _TensorSpec(triton.runtime.jit.MockTensor if triton is not None else object):
    """A tensor argument as a compile sees it: its dtype and its address's 16-byte alignment, nothing held."""

    def __init__(self, t: Tensor):
        super().__init__(t.dtype)
        self.misalignment = t.data_ptr() % 16

    def data_ptr(self) -> int:
        return self.misalignment


def _is_descriptor(arg) -> bool:
    return type(arg).__name__ == "TensorDescriptor"  # triton.tools.tensor_descriptor's, without importing it


def _standin(arg):
    """A runtime argument as a compile gets it: tensors (also a descriptor's) as `_TensorSpec`s."""
    if isinstance(arg, Tensor):
        return _TensorSpec(arg)
    if _is_descriptor(arg):
        return type(arg)(_TensorSpec(arg.base), arg.shape, arg.strides, arg.block_shape, arg.padding)
    return arg


def _specialization(arg, unspecialized: bool):
    """What Triton's compile of a kernel depends on in one runtime argument: its launch signature (`_signature`),
    with an int reduced to what Triton specializes on instead of its value."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        width = -2**31 <= arg < 2**31  # i32 or i64
        return (int, width) if unspecialized else (int, width, arg == 1, arg % 16 == 0)
    return _signature(arg)


def _on_device(device: int, fn: Callable[[], Any]) -> Any:
    with torch.cuda.device(device):  # a new thread starts on device 0
        return fn()


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would do anything (Triton >= 3.5 keeps an empty HookChain when none is set)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _signature(arg):
    """What of one kernel argument a compiled launch depends on (see Launcher)."""
    if isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if _is_descriptor(arg):  # a host-side TMA descriptor: Triton specializes on its tiles and its sizes
        return "tensordesc", arg.base.dtype, tuple(arg.block_shape), tuple(arg.shape), tuple(arg.strides)
    if isinstance(arg, float):
        return float
    if isinstance(arg, bool):
        return bool, arg  # not equal to the int 1 or 0, which Triton types differently
    return arg  # ints (their values) and None


_COMPILE_OPS: list["CompileOp"] = []


class CompileOp:
    """A kernel's host function as the torch.library op that torch.compile calls; eager calls skip it and
    call the launch function directly. It has two registrations:

    opaque     `name`_opaque, a `torch.library.custom_op` over `launch` whose output layout comes from `fake`:
               a compiled graph calls it as one black box (CUDA graphs capture it too). Registered on import.
    traceable  `name`, a `torch.library.triton_op` over `traced` (the launch with each kernel wrapped by
               `torch.library.wrap_triton`): inductor traces into it, autotunes the kernels itself and
               launches them from its generated code, so a compiled graph neither pays the Python dispatcher
               and launcher (~100 us of host time per call) nor loses the buffers around the op to an opaque
               call. Registering one imports torch._inductor and with it torch._dynamo: 4.7 of the 9.6 s that
               `import fastdiff` took on an H200 host (1.2 s on a CPU-only machine), a cost a process that never
               compiles must not pay. So it is registered by `prepare_compile()`, or on import when
               torch._dynamo is imported already (diffusers imports it; so does torch.compile).
    Calls go to the traceable op once it exists, else to the opaque one. Under the interpreter
    (TRITON_INTERPRET=1, CPU tests) there is only the opaque op: those kernels cannot be traced with fake tensors.
    """

    def __init__(self, name: str, launch: Callable, traced: Callable, fake: Callable):
        self.name, self.traced = name, traced
        self.opaque = torch.library.custom_op(f"{name}_opaque", launch, mutates_args=())
        self.opaque.register_fake(fake)
        self.traceable = None
        _COMPILE_OPS.append(self)
        if "torch._dynamo" in sys.modules:
            self.make_traceable()

    def make_traceable(self) -> None:
        if self.traceable is None and triton is not None and not INTERPRET:
            self.traceable = torch.library.triton_op(self.name, self.traced, mutates_args=())

    def __call__(self, *args):
        return (self.opaque if self.traceable is None else self.traceable)(*args)


def prepare_compile() -> None:
    """Register every kernel as a `torch.library.triton_op`, so torch.compile traces into the kernels instead
    of calling them as opaque ops (see CompileOp). Call it before compiling code that uses fastdiff's kernels
    in a process that had not imported torch._dynamo when it imported them; fastdiff does so where it
    compiles (`FastConfig.compile`, `ops.preload`). Idempotent; does nothing under the interpreter."""
    for op in _COMPILE_OPS:
        op.make_traceable()
