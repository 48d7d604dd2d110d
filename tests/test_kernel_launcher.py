"""kernels._triton.Launcher: a repeated launch goes through the compiled kernel's launcher with what Triton's
own launch recorded, and gives the same results, also under CUDA-graph capture.

The CPU tests run the record-and-replay logic against a stand-in for Triton's launch path (the interpreter
never uses the Launcher); the GPU tests run the real kernels.
"""
import contextlib
import importlib
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch

from fastdiff.kernels import _triton
from fastdiff.kernels.attention import attention, attention_ref
from cuda_graphs import capture

attention_module = importlib.import_module("fastdiff.kernels.attention")  # the package exports the function
triton = pytest.importorskip("triton")
tl = triton.language


def _toy_kernel(X, Y, n, scale, BLOCK: tl.constexpr, SILU: tl.constexpr):
    pass  # never compiled: the stand-in below plays Triton's launch


class _FakeCompiled:
    function, packed_metadata = "function", "packed_metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeAutotuned:
    """Triton's `kernel[grid](...)` as the Launcher sees it: the JIT's pre-run hooks get the launch's
    arguments with the autotuned constexpr added, and the call returns the compiled kernel."""

    def __init__(self):
        self.fn = triton.runtime.jit.JITFunction(_toy_kernel)
        self.compiled, self.launches = _FakeCompiled(), []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((grid, args, meta))
            for hook in self.fn.pre_run_hooks:
                hook(*args, **meta, BLOCK=128)
            return self.compiled
        return launch


@pytest.fixture
def toy(monkeypatch):
    """A Launcher over the stand-in kernel, outside the interpreter, on a fake device 0 / stream 7."""
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.setattr(_triton, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 7)))
    kernel = _FakeAutotuned()
    return kernel, _triton.Launcher(kernel)


def _grid(meta):
    return (_triton.cdiv(meta["n"], meta["BLOCK"]),)


def test_repeat_call_runs_the_recorded_launch_with_the_new_pointers(toy):
    kernel, launcher = toy
    x, y = torch.empty(1000), torch.empty(1000)
    launcher[_grid](x, y, 1000, 0.5, SILU=True)
    assert len(kernel.launches) == 1 and not kernel.compiled.runs  # the first call goes through Triton
    x2, y2 = torch.empty(1000), torch.empty(1000)
    launcher[_grid](x2, y2, 1000, 0.25, SILU=True)
    assert len(kernel.launches) == 1
    (run,) = kernel.compiled.runs
    # grid from the recorded BLOCK (ceil(1000 / 128) = 8), stream, handles, no hooks, then every argument
    assert run[:9] == (8, 1, 1, 7, "function", "packed_metadata", None, None, None)
    assert run[9] is x2 and run[10] is y2 and run[11:] == (1000, 0.25, 128, True)


def test_repeat_call_launches_on_its_own_grid(toy):
    """The grid may depend on values that are no kernel argument (GroupNorm's and attention's on the batch
    size): a repeated signature must launch on the grid its own call passes, never on the recorded one."""
    kernel, launcher = toy
    x, y = torch.empty(1000), torch.empty(1000)
    for batch in (1, 3):  # a function of the constexprs and of a value the kernel never sees
        launcher[lambda meta: (batch * _triton.cdiv(meta["n"], meta["BLOCK"]), batch)](x, y, 1000, 0.5, SILU=True)
    launcher[(5,)](x, y, 1000, 0.5, SILU=True)  # a plain tuple
    assert len(kernel.launches) == 1
    grids = [run[:3] for run in kernel.compiled.runs]
    print("replayed grids:", grids)
    assert grids == [(24, 3, 1), (5, 1, 1)]  # ceil(1000 / 128) = 8 programs per batch entry


@pytest.mark.parametrize("change", ["int argument", "dtype", "alignment", "constexpr"])
def test_a_new_signature_goes_through_triton_again(toy, change):
    kernel, launcher = toy
    x, y = torch.empty(1000), torch.empty(1000)
    launcher[_grid](x, y, 1000, 0.5, SILU=True)
    args, meta = [x, y, 1000, 0.5], {"SILU": True}
    if change == "int argument":
        args[2] = 999
    elif change == "dtype":
        args[0] = torch.empty(1000, dtype=torch.float16)
    elif change == "alignment":
        args[0] = torch.empty(1001)[1:]  # 4 bytes past a 16-byte boundary
    else:
        meta["SILU"] = False
    launcher[_grid](*args, **meta)
    assert len(kernel.launches) == 2 and not kernel.compiled.runs


def test_first_launch_keeps_no_reference_to_its_tensors(toy):
    """Recording a launch keeps its constexprs, never its arguments: the tensors of a signature's first launch
    (the VAE decoder's 1 GB activations at batch 8) must be freed when the caller drops them."""
    kernel, launcher = toy
    for disabled in (False, True):
        x, y = torch.empty(1000), torch.empty(1000)
        alive = weakref.ref(x), weakref.ref(y)
        with _triton.Launcher.disabled() if disabled else contextlib.nullcontext():
            launcher[_grid](x, y, 1000 + disabled, 0.5, SILU=True)
        kernel.launches.clear()  # the stand-in's own log of the call holds them too
        del x, y
        assert [ref() for ref in alive] == [None, None], f"disabled={disabled}"


def test_a_compile_in_another_thread_during_a_first_launch_leaves_its_record_alone(toy):
    """A background compile runs the kernel's pre-run hooks too (other constexprs, its own thread) while this
    thread's first launch of a signature is between Triton's hook and the Launcher reading what it recorded."""
    kernel, launcher = toy
    real_getitem = type(kernel).__getitem__

    def getitem_with_a_compile_elsewhere(self, grid):
        launch = real_getitem(self, grid)

        def interleaved(*args, **meta):
            compiled = launch(*args, **meta)  # this thread's record: BLOCK=128, SILU=True
            other = threading.Thread(target=lambda: [hook(*args, SILU=False, BLOCK=64)
                                                     for hook in self.fn.pre_run_hooks])
            other.start()
            other.join()
            return compiled

        return interleaved

    type(kernel).__getitem__ = getitem_with_a_compile_elsewhere
    try:
        x, y = torch.empty(1000), torch.empty(1000)
        launcher[_grid](x, y, 1000, 0.5, SILU=True)
    finally:
        type(kernel).__getitem__ = real_getitem
    launcher[_grid](x, y, 1000, 0.5, SILU=True)  # replays what this thread recorded
    (run,) = kernel.compiled.runs
    assert run[:3] == (8, 1, 1) and run[-2:] == (128, True)


def test_disabled_launcher_always_goes_through_triton(toy):
    kernel, launcher = toy
    x, y = torch.empty(64), torch.empty(64)
    with _triton.Launcher.disabled():
        for _ in range(3):
            launcher[_grid](x, y, 64, 0.5, SILU=False)
    assert len(kernel.launches) == 3 and not kernel.compiled.runs
    launcher[_grid](x, y, 64, 0.5, SILU=False)  # enabled again: records
    launcher[_grid](x, y, 64, 0.5, SILU=False)
    assert len(kernel.launches) == 4 and len(kernel.compiled.runs) == 1


def test_runtime_argument_given_as_keyword_is_refused(toy):
    _, launcher = toy
    with pytest.raises(TypeError, match="runtime arguments positional"):
        launcher[_grid](torch.empty(64), torch.empty(64), 64, scale=0.5, SILU=False)


# ------------------------------------------------------------------- compiling_ahead (CPU stand-ins)


class _FakeJIT:
    """Stands in for a kernel's `run(*args, grid=, warmup=, **constexprs)`: records what it is asked to compile,
    from which thread, and can fail like a compile error."""

    def __init__(self, fail: bool = False):
        self.compiles, self.loaded, self.fail = [], [], fail

    def run(self, *args, grid, warmup, **meta):
        assert warmup, "compiling ahead must never launch"
        if self.fail:
            raise RuntimeError("PassManager::run failed")
        self.compiles.append((args, meta, threading.current_thread().name))
        return _FakeKernel(self)


class _FakeKernel:
    """A compiled kernel as `jit.run(warmup=True)` returns it: `_init_handles` loads it and builds its launcher;
    a config over the GPU's shared memory raises OutOfResources there."""

    def __init__(self, jit: _FakeJIT, out_of_resources: bool = False):
        self.jit, self.out_of_resources = jit, out_of_resources

    def _init_handles(self):
        self.jit.loaded.append(threading.current_thread().name)
        if self.out_of_resources:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")


@pytest.fixture
def ahead(monkeypatch):
    """Outside the interpreter, on device -1 (torch.cuda.device's no-op index: the pool's threads run here)."""
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.setattr(_triton, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: -1, get_current_stream=lambda device: 7)))


def test_compiling_ahead_compiles_each_variant_once_and_launches_nothing(ahead):
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    launcher.jit.run = (fake := _FakeJIT()).run  # a plain (not autotuned) kernel: one compile per variant
    x, y = torch.empty(1000), torch.empty(1000)
    with _triton.compiling_ahead(workers=2):
        launcher[_grid](x, y, 1000, 0.5, SILU=True)
        launcher[_grid](torch.empty(1000), torch.empty(1000), 1000, 0.25, SILU=True)  # same signature
        launcher[_grid](x, y, 1003, 0.5, SILU=True)  # a new signature, the same variant (neither divisible by 16)
        launcher[_grid](x, y, 1024, 0.5, SILU=True)  # a new variant: divisible by 16
        launcher[_grid](x, y, 1024, 0.5, SILU=False)  # a new variant: another constexpr
    assert not kernel.launches, "a launch ran inside compiling_ahead()"
    compiled = sorted((c[0][2], c[1]["SILU"]) for c in fake.compiles)
    print("compiled:", compiled, {c[2] for c in fake.compiles})
    assert compiled in ([(1000, True), (1024, False), (1024, True)], [(1003, True), (1024, False), (1024, True)])
    assert all(c[2].startswith("fastdiff-compile") for c in fake.compiles)
    launcher[_grid](x, y, 1000, 0.5, SILU=True)  # after the block: launches as usual
    assert len(kernel.launches) == 1


def test_compiling_ahead_loads_each_compiled_variant_in_the_pool(ahead):
    """A compiled variant is also loaded and its launcher built (a C compile per new signature) by the pool's
    threads, not by the first launch; a config the GPU cannot run is left for the autotuner to skip."""
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    fake = _FakeJIT()
    too_big = {"SILU": False}

    def run(*args, grid, warmup, **meta):
        compiled = fake.run(*args, grid=grid, warmup=warmup, **meta)
        compiled.out_of_resources = meta == too_big
        return compiled

    launcher.jit.run = run
    x, y = torch.empty(1000), torch.empty(1000)
    with _triton.compiling_ahead(workers=2):
        launcher[_grid](x, y, 1000, 0.5, SILU=True)
        launcher[_grid](x, y, 1024, 0.5, SILU=True)
        launcher[_grid](x, y, 1024, 0.5, SILU=False)  # raises OutOfResources when loaded: no error here
    print("loaded on:", fake.loaded)
    assert len(fake.loaded) == 3 and all(name.startswith("fastdiff-compile") for name in fake.loaded)


def test_compiling_ahead_keeps_no_tensor_alive_while_a_compile_waits(ahead):
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    fake, started = _FakeJIT(), threading.Event()

    def slow_run(*args, grid, warmup, **meta):
        started.wait(5)
        fake.run(*args, grid=grid, warmup=warmup, **meta)

    launcher.jit.run = slow_run
    with _triton.compiling_ahead(workers=1):
        x, y = torch.empty(1000), torch.empty(1001)[1:]  # y: 4 bytes past a 16-byte boundary
        alive = weakref.ref(x)
        launcher[_grid](x, y, 1000, 0.5, SILU=True)
        del x
        assert alive() is None, "the waiting compile holds the launch's tensor"
        started.set()
    ((args, _, _),) = fake.compiles
    print("compiled with:", [(type(a).__name__, getattr(a, "dtype", None)) for a in args[:2]])
    assert all(isinstance(a, _triton._TensorSpec) and a.dtype == torch.float32 for a in args[:2])
    assert (args[0].data_ptr(), args[1].data_ptr()) == (0, 4)


def test_compiling_ahead_compiles_every_candidate_the_autotuner_keeps(ahead):
    def keep_wide_blocks(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK"] >= named_args["n"] // 8]

    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 2), (128, 4), (256, 8))]
    kernel = triton.autotune(configs=configs, key=["n"], prune_configs_by={"early_config_prune": keep_wide_blocks})(
        triton.runtime.jit.JITFunction(_toy_kernel))
    launcher = _triton.Launcher(kernel)
    launcher.jit.run = (fake := _FakeJIT()).run
    with _triton.compiling_ahead(workers=2):
        launcher[_grid](torch.empty(1000), torch.empty(1000), 1000, 0.5, SILU=False)
    compiled = sorted((c[1]["BLOCK"], c[1]["num_warps"]) for c in fake.compiles)
    print("compiled candidates:", compiled)
    assert compiled == [(128, 4), (256, 8)]  # 64 < 1000 // 8 was pruned
    assert kernel.nargs is None  # the autotuner's state is left as a launch leaves it


def test_compiling_ahead_reraises_a_compile_error_when_the_block_ends(ahead):
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    launcher.jit.run = _FakeJIT(fail=True).run
    with pytest.raises(RuntimeError, match="PassManager"):
        with _triton.compiling_ahead(workers=1):
            launcher[_grid](torch.empty(64), torch.empty(64), 64, 0.5, SILU=False)
    assert _triton._compile_pool is None  # the next block starts clean


@pytest.fixture
def background(ahead, monkeypatch):
    """A launcher of a fake kernel (its compiles in `.fake`), and `.handed`: the lists of compiles
    `compile_in_background` is given, with no variant handed to the background before."""
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    launcher.jit.run = (fake := _FakeJIT()).run
    handed: list = []
    monkeypatch.setattr(_triton._compile_processes, "compile_in_background", handed.append)
    monkeypatch.setattr(_triton, "_submitted_later", set())
    return SimpleNamespace(kernel=kernel, launcher=launcher, fake=fake, handed=handed)


def test_compiling_later_hands_its_variants_to_the_background_once_the_blocks_own_compiles_are_done(
        background, monkeypatch):
    kernel, launcher, fake, handed = background.kernel, background.launcher, background.fake, background.handed
    x, y = torch.empty(1024), torch.empty(1024)
    with _triton.compiling_ahead(workers=1):
        assert _triton.compiling()
        launcher[_grid](x, y, 1024, 0.5, SILU=True)
        with _triton.compiling_later():
            launcher[_grid](x, y, 1024, 0.5, SILU=True)  # compiled in this block already: not again
            launcher[_grid](x, y, 1024, 0.5, SILU=False)  # another size's variant
        assert not handed, "the background got work before the block's own compiles were done"
    assert not _triton.compiling()
    assert [c[1]["SILU"] for c in fake.compiles] == [True]  # the later variant was not compiled in the block
    ((later,),) = handed
    captured = []
    monkeypatch.setattr(_triton._compile_processes, "specialization_data", lambda compile_variant: captured.append(
        compile_variant.keywords["SILU"]) or "spec")
    assert later() == (launcher.jit, "spec") and captured == [False]  # what a worker then compiles
    with _triton.compiling_ahead(workers=1), _triton.compiling_later():
        launcher[_grid](x, y, 1024, 0.5, SILU=False)  # handed to the background before: not again
    assert len(handed) == 1
    with _triton.compiling_later():  # outside compiling_ahead: launches run
        launcher[_grid](x, y, 1024, 0.5, SILU=False)
    assert len(kernel.launches) == 1


def test_a_variant_put_down_for_later_and_then_needed_now_compiles_in_the_block(background):
    """One call's other sizes may be what a later call of the same block takes (a LayerNorm's two rows per
    program, at a site with more rows): that variant compiles with the block's own, not in the background."""
    launcher, fake, handed = background.launcher, background.fake, background.handed
    x, y = torch.empty(1024), torch.empty(1024)
    with _triton.compiling_ahead(workers=1):
        launcher[_grid](x, y, 1024, 0.5, SILU=True)
        with _triton.compiling_later():
            launcher[_grid](x, y, 1024, 0.5, SILU=False)  # the first call's other size
        launcher[_grid](x, y, 1024, 0.5, SILU=False)  # a later call takes it
    print("compiled in the block:", [c[1]["SILU"] for c in fake.compiles], "handed on:", handed)
    assert sorted(c[1]["SILU"] for c in fake.compiles) == [False, True]
    assert handed == [], "the background got a variant the block compiled"


def test_compiling_ahead_under_the_interpreter_launches_as_usual(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", True)
    kernel = _FakeAutotuned()
    launcher = _triton.Launcher(kernel)
    with _triton.compiling_ahead():
        launcher[_grid](torch.empty(64), torch.empty(64), 64, 0.5, SILU=False)
    assert len(kernel.launches) == 1


# ------------------------------------------------------------------------------------------------ GPU


def _qkv(seq_q=333, seq_kv=77, head_dim=40, dtype=torch.float16):
    return [torch.randn(2, 8, s, head_dim, device="cuda", dtype=dtype) for s in (seq_q, seq_kv, seq_kv)]


class _CountingWrites(dict):
    """A Launcher's per-thread record that counts what Triton's launch path writes into it."""
    writes = 0

    def __setitem__(self, key, value):
        self.writes += 1
        super().__setitem__(key, value)


@pytest.mark.gpu
def test_repeated_launch_skips_triton_and_matches_its_launch(monkeypatch):
    launcher = attention_module._attention_launcher
    q, k, v = _qkv()
    with _triton.Launcher.disabled():
        through_triton = attention(q, k, v)
    first = attention(q, k, v)  # records this signature
    record = _CountingWrites()
    monkeypatch.setattr(launcher, "_recorded", record)
    repeated = attention(q, k, v)
    torch.cuda.synchronize()
    assert record.writes == 0, "the repeated call went through Triton's launch path"
    err = (repeated.float() - attention_ref(q, k, v).float()).abs().max().item()
    print(f"max abs error of the repeated launch vs reference: {err:.3e}")
    assert torch.equal(repeated, through_triton) and torch.equal(first, through_triton)
    assert err < 1e-2


@pytest.mark.gpu
def test_new_signature_is_recorded_not_reused():
    launcher = attention_module._attention_launcher
    q, k, v = _qkv(seq_q=200)
    attention(q, k, v)
    entries = len(launcher._launches)
    q2, k2, v2 = _qkv(seq_q=201)  # another grid and Sq
    out = attention(q2, k2, v2)
    assert len(launcher._launches) == entries + 1
    err = (out.float() - attention_ref(q2, k2, v2).float()).abs().max().item()
    print(f"max abs error at a new length: {err:.3e}")
    assert err < 1e-2
    # A misaligned view (offset by one element) must not reuse the aligned launch.
    buf = torch.randn(2 * 8 * 200 * 40 + 1, device="cuda", dtype=torch.float16)
    q3 = buf[1:].view(2, 8, 200, 40)
    out3 = attention(q3, k, v)
    err3 = (out3.float() - attention_ref(q3, k, v).float()).abs().max().item()
    print(f"max abs error with a misaligned q: {err3:.3e}")
    assert err3 < 1e-2


@pytest.mark.gpu
def test_a_new_batch_size_with_an_old_signature_normalizes_and_attends_every_sample():
    """GroupNorm's grids (both strategies, both layouts) and attention's grid grow with the batch, which is
    no kernel argument: the batch-1 launch's signature recurs at batch 3 and must not bring its grid along."""
    group_norm_module = importlib.import_module("fastdiff.kernels.group_norm")
    for shape, layout in (((1, 64, 16, 16), torch.contiguous_format), ((1, 64, 16, 16), torch.channels_last),
                          ((1, 320, 64, 64), torch.contiguous_format), ((1, 320, 64, 64), torch.channels_last)):
        weight, bias = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
        for batch in (1, 3):
            x = torch.randn(batch, *shape[1:], device="cuda", dtype=torch.float16).contiguous(memory_format=layout)
            out = group_norm_module.group_norm(x, 32, weight, bias, 1e-5, "silu").float()
            ref = group_norm_module.group_norm_ref(x.float(), 32, weight.float(), bias.float(), 1e-5, "silu")
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"group_norm {(batch, *shape[1:])} {layout}: rel err {err:.2e}")
            assert err < 1e-2
    for batch in (1, 3):
        q = torch.randn(batch, 8, 4096, 40, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(batch, 8, 77, 40, device="cuda", dtype=torch.float16) for _ in range(2))
        out = attention(q, k, v).float()
        ref = attention_ref(q.float(), k.float(), v.float())
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"attention batch {batch}: rel err {err:.2e}")
        assert err < 1e-2


@pytest.mark.gpu
def test_repeated_launch_under_cuda_graph_capture():
    q, k, v = _qkv()
    graph, out = capture(lambda: attention(q, k, v))  # records outside the capture (may compile, autotune)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        err = (out.float() - attention_ref(q, k, v).float()).abs().max().item()
        print(f"max abs error of a replayed graph: {err:.3e}")
        assert err < 1e-2


def test_constant_row_is_a_view_of_one_buffer_per_value_device_and_dtype(monkeypatch):
    monkeypatch.setattr(_triton, "_CONSTANT_ROWS", {})
    like = torch.ones(3, dtype=torch.float16)
    zeros, again = _triton.constant_row(0.0, 320, like), _triton.constant_row(0.0, 640, like)
    negative = _triton.constant_row(-0.0, 320, like)
    assert zeros.shape == (320,) and again.shape == (640,) and zeros.data_ptr() == again.data_ptr()
    assert zeros.dtype == torch.float16 and not zeros.any()
    assert negative.data_ptr() != zeros.data_ptr() and torch.signbit(negative).all()  # -0.0, kept apart
    assert (like + negative[:3]).equal(like) and torch.signbit(torch.tensor(-0.0) + negative[0])
    assert _triton.constant_row(0.0, 320, like.float()).dtype == torch.float32
    assert _triton.constant_row(0.0, _triton.CONSTANT_ROW_LENGTH + 1, like) is None  # the caller passes None


# ------------------------------------------------------- what other sizes of a call launch (compiling_later)


@pytest.fixture
def launches(monkeypatch):
    """Every Launcher launch recorded as (kernel name, its constexprs, whether inside compiling_later()) instead of
    run, with the kernels' wrappers told they are compiling ahead."""
    made = []

    def record(launcher, grid, *args, **meta):
        made.append((launcher.kernel.fn.__name__, meta, _triton._later))

    monkeypatch.setattr(_triton.Launcher, "_launch", record)
    monkeypatch.setattr(_triton, "compiling", lambda: True)
    return made


def test_a_channels_last_group_norm_adds_the_single_and_both_split_plans_for_later(launches):
    from fastdiff.kernels import group_norm

    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    group_norm(x, 32, activation="silu")
    now = [name for name, _, later in launches if not later]
    later = {(name, meta.get("ROWS"), meta.get("num_warps")) for name, meta, is_later in launches if is_later}
    print("now:", now, "later:", sorted(later))
    assert now == ["_group_norm_single_cl_kernel"]  # 2 x 4 x 64 elements per group: the single launch
    assert ("_group_norm_single_cl_kernel", 2048, 8) in later  # the same variant as now: deduplicated later
    assert {("_group_norm_stats_kernel", 128, 8), ("_group_norm_stats_kernel", 64, 4)} <= later  # CL_CONFIGS' tiles
    assert {("_group_norm_apply_kernel", 128, 8), ("_group_norm_apply_kernel", 64, 4)} <= later


def test_a_summing_producer_adds_every_producer_config_for_later(launches):
    from fastdiff.kernels import residual_add_sums
    from fastdiff.kernels.group_sums import PRODUCER_CONFIGS

    y = torch.randn(2, 64, 32, 32).to(memory_format=torch.channels_last)
    residual_add_sums(y, y, num_groups=32)
    later = {meta["num_warps"] for name, meta, is_later in launches if is_later}
    assert [is_later for _, _, is_later in launches].count(False) == 1
    assert later == {warps for _, (_, _, warps) in PRODUCER_CONFIGS}


def test_a_linear_adds_the_tiles_of_both_row_classes_for_later(launches):
    from fastdiff.kernels.linear import linear

    linear(torch.randn(2, 77, 640), torch.randn(640, 640))
    now = [meta["BLOCK_M"] for _, meta, is_later in launches if not is_later]
    later = {meta["BLOCK_M"] for _, meta, is_later in launches if is_later}
    assert now == [64] and later == {64, 128}


def test_a_layer_norm_adds_every_rows_per_program_its_width_allows_for_later(launches):
    from fastdiff.kernels import layer_norm
    from fastdiff.kernels.layer_norm import TILE

    layer_norm(torch.randn(2, 77, 640), torch.ones(640), torch.zeros(640))
    later = sorted(meta["BLOCK_M"] for _, meta, is_later in launches if is_later)
    assert later == [1 << i for i in range((TILE // 1024).bit_length())]  # 1, 2, 4 rows of 1024 columns


@pytest.mark.parametrize("height, summed_now", [(32, True), (16, False)])  # group_sums.MIN_PIXELS: 32 x 32
def test_a_residual_add_for_a_group_norm_adds_the_other_side_of_the_summing_threshold_for_later(
        launches, monkeypatch, height, summed_now):
    from fastdiff import ops

    monkeypatch.setattr(ops, "resolve", lambda op, device_type: "triton")  # auto's choice on a GPU
    y = torch.randn(2, 64, height, height).to(memory_format=torch.channels_last)
    ops.residual_add_sums(y, y, num_groups=32)
    now = {name for name, _, is_later in launches if not is_later}
    later = {name for name, _, is_later in launches if is_later}
    summing, plain = "_summed_output_kernel", "_residual_add_kernel"
    assert (now, later >= {plain if summed_now else summing}) == ({summing if summed_now else plain}, True)
