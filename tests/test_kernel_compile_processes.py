"""`compiling_ahead`'s worker processes (fastdiff.kernels._compile_processes), on the CPU: Triton compiles for a
GPU target without one (its front end, MLIR, LLVM and ptxas run on the host), so a worker compiles a real kernel
variant for an H100 here, and the calling process loads it from the cache without compiling. Each test runs in a
fresh interpreter without TRITON_INTERPRET (the suite's kernels are the interpreter's), with a stand-in Triton
driver naming the H100's target in place of a CUDA device."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PRELUDE = """
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from fastdiff.kernels import _compile_processes, _triton
from fastdiff.kernels.residual_add import _residual_add_launcher

driver.set_active(_compile_processes._TargetOnly(GPUTarget("cuda", 90, 32)))
x = torch.empty(2, 320, 64, 64, dtype=torch.float16)
args = (x, x, None, None, x, 1, 320 * 64 * 64, 320, 64 * 64)
((_, jit, compile_variant),) = _triton._variant_compiles(_residual_add_launcher, args,
                                                         dict(CHANNELS_LAST=False, BLOCK=1024))
"""


def _run(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    return done.stdout


def test_a_worker_compiles_a_variant_that_this_process_then_loads_from_the_cache_without_compiling(tmp_path):
    out = _run("""
from triton.compiler.compiler import ASTSource
assert _compile_processes.start(1) == 1
spec = _compile_processes.specialization_data(compile_variant)
assert spec is not None and "_residual_add_kernel" in spec, spec
def no_compile_here(*args, **kwargs):
    raise AssertionError("the calling process compiled")
real, ASTSource.make_ir = ASTSource.make_ir, no_compile_here
kernel = _compile_processes.compile_in_worker(jit, compile_variant)
print("kernel", type(kernel).__name__, kernel.metadata.name, kernel.metadata.target)
assert kernel.metadata.target.arch == 90
assert compile_variant() is kernel  # Triton's in-memory cache holds it: a launch finds it compiled
ASTSource.make_ir = real
_compile_processes.stop()
assert _compile_processes.running() == 0
""", tmp_path)
    assert "kernel CompiledKernel _residual_add_kernel" in out


def test_tritons_cache_key_is_computed_once_in_a_thread_ahead_of_the_first_compile(tmp_path):
    _run("""
from triton.runtime import cache
assert cache.triton_key.cache_info().currsize == 0  # nothing asked for it yet
_compile_processes.hash_triton_ahead()
thread = _compile_processes._hashing
assert thread is not None and thread.daemon
_compile_processes.hash_triton_ahead()
assert _compile_processes._hashing is thread  # once per process
_compile_processes.wait_for_triton_key()
assert not thread.is_alive()
key = cache.triton_key()
info = cache.triton_key.cache_info()
assert info.misses == 1 and info.hits == 1, info  # computed by the thread, kept for every compile after it
""", tmp_path)


def test_a_variant_a_worker_cannot_compile_is_compiled_by_the_calling_process(tmp_path):
    out = _run("""
import warnings
assert _compile_processes.start(1) == 1
worker = _compile_processes._started[0]
worker.process.kill(); worker.process.wait()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert _compile_processes.compile_in_worker(jit, compile_variant) is None
print("warned:", [str(w.message) for w in caught])
assert any("stopped" in str(w.message) for w in caught)
kernel = compile_variant()  # what _compile_and_load does then
print("kernel", type(kernel).__name__)
""", tmp_path)
    assert "kernel CompiledKernel" in out


def test_capturing_a_variant_compiles_nothing_and_other_threads_compile_as_usual(tmp_path):
    _run("""
import threading
assert _compile_processes.start(1) == 1
assert _compile_processes.specialization_data(compile_variant) is not None
assert not jit.device_caches[0][0], "capturing compiled"
result = []
thread = threading.Thread(target=lambda: result.append(compile_variant()))  # no capture in this thread
thread.start(); thread.join()
assert type(result[0]).__name__ == "CompiledKernel"
assert _compile_processes.specialization_data(compile_variant) is None  # compiled here now: nothing to capture
_compile_processes.stop()
""", tmp_path)


def test_a_background_compile_lands_in_the_cache_for_a_later_call_to_load(tmp_path):
    _run("""
import functools
from triton.compiler.compiler import ASTSource
assert _compile_processes.start(1) == 1
_compile_processes.compile_in_background([functools.partial(_triton._capture, jit, compile_variant)])
assert _compile_processes.wait_background(timeout=300)
assert not jit.device_caches[0][0], "the background compiled in this process"
def no_compile_here(*args, **kwargs):
    raise AssertionError("the calling process compiled")
ASTSource.make_ir = no_compile_here
kernel = _compile_processes.compile_in_worker(jit, compile_variant)  # the worker finds it compiled; this loads it
assert type(kernel).__name__ == "CompiledKernel"
""", tmp_path)


def test_background_captures_run_in_one_thread_and_a_failing_one_skips_only_itself(monkeypatch):
    """compile_in_background: every capture runs, one after the other in a single thread (the GIL-holding part:
    the images' thread competes with that one alone), a capture that raises or gives None is skipped, and each
    worker gets what the others give; wait_background then returns."""
    import queue
    import threading

    from fastdiff.kernels import _compile_processes

    class FakeWorker:
        alive = True

        def __init__(self):
            self.compiled = []

        def compile(self, jit, spec):
            self.compiled.append((jit, spec))

    workers = [FakeWorker(), FakeWorker()]
    idle = queue.Queue()
    for worker in workers:
        idle.put(worker)
    monkeypatch.setattr(_compile_processes, "_started", workers)
    monkeypatch.setattr(_compile_processes, "_idle", idle)
    threads = []

    def capture(result):
        def run():
            threads.append(threading.get_ident())
            if isinstance(result, Exception):
                raise result
            return result
        return run

    results = [("jit", "a"), RuntimeError("no device"), None, ("jit", "b"), ("jit", "c")]
    _compile_processes.compile_in_background([capture(r) for r in results])
    assert _compile_processes.wait_background(timeout=30)
    assert len(threads) == 5 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert sorted(item for w in workers for item in w.compiled) == [("jit", "a"), ("jit", "b"), ("jit", "c")]


@pytest.mark.parametrize("setting, expected", [("0", 0), ("3", 3), (" 12 ", 12), ("", None)])
def test_fastdiff_compile_processes_sets_the_number_of_workers(monkeypatch, setting, expected):
    from fastdiff.kernels import _compile_processes

    monkeypatch.setenv("FASTDIFF_COMPILE_PROCESSES", setting)
    cores = os.cpu_count() or 1
    default = min(8, cores - 2) if cores >= 4 else 0
    assert _compile_processes._default_processes() == (default if expected is None else expected)


@pytest.mark.parametrize("setting", ["many", "-1", "2.5"])
def test_a_malformed_fastdiff_compile_processes_is_one_error_naming_it(monkeypatch, setting):
    from fastdiff.kernels import _compile_processes

    monkeypatch.setenv("FASTDIFF_COMPILE_PROCESSES", setting)
    with pytest.raises(ValueError, match=f"FASTDIFF_COMPILE_PROCESSES must be a whole number.*{setting}"):
        _compile_processes._default_processes()
