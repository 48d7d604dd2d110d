"""Triton compiles in worker processes, for `compiling_ahead` and the background compiles of `compiling_later`.

A Triton compile starts with a Python front end (the kernel's AST walked into MLIR) that holds the GIL, then runs
MLIR and LLVM passes and ptxas, which mostly do not. Compiled in threads of the process that runs the model, the
front ends take turns with the model's own host work; compiled in worker processes, they take none of it. That
is what lets the variants other sizes will need compile in the background while images run. For the first image
itself the workers measured no gain: on a 16-core H100 host the SD1.5 cold start took 9.1-9.5 s with them and
without them (benchmarks/RESULTS.md), its 48 compiles no longer bounding it. A worker compiles a variant into
Triton's on-disk cache (TRITON_CACHE_DIR, shared by both processes) and builds its C launcher there; the calling
process then loads it from that cache (`JITFunction.preload`, a cache hit).

A variant travels as Triton's own specialization data (the JSON its `jit_cache_hook` receives: signature,
constexprs, attributes, options and the in-memory cache key), captured by running the variant's compile under a
hook that stops it just before compiling (`specialization_data`). A worker never touches the GPU: its Triton driver
is a stand-in that names the calling process's target, so it creates no CUDA context and holds no device memory.
It runs `serve(TARGET_JSON)` in a fresh interpreter: one JSON request per line on stdin, one reply per line on
stdout; it exits when its stdin closes, as it does when the calling process exits.

Whatever goes wrong in a worker (it failed to start, died, or reports an error), the calling process compiles the
variant itself, exactly as without workers: a compile error then surfaces from there, as always.
"""
from __future__ import annotations

import contextvars
import dataclasses
import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import warnings
from typing import Any, Callable, Optional


def _default_processes() -> int:
    """How many worker processes `compiling_ahead` starts: FASTDIFF_COMPILE_PROCESSES when set (0: compile in
    threads; for several fastdiff processes on one host, which would each start their own), else one per core,
    two left for the process that runs the model and its threads waiting on the workers, at most 8; none below
    four cores, where threads alone do as well."""
    setting = os.environ.get("FASTDIFF_COMPILE_PROCESSES", "").strip()
    if setting:
        if not setting.isdigit():
            raise ValueError(f"FASTDIFF_COMPILE_PROCESSES must be a whole number of processes, got {setting!r}")
        return int(setting)
    cores = os.cpu_count() or 1
    return min(8, cores - 2) if cores >= 4 else 0


DEFAULT_PROCESSES = _default_processes()

_capturing: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("fastdiff_capturing", default=None)
_idle: "queue.Queue[Worker]" = queue.Queue()  # started workers, each taken by one compile at a time
_started: list["Worker"] = []
_lock = threading.Lock()
_warned = False
_background = threading.Condition()  # guards _pending: background jobs not finished
_pending = 0


class Worker:
    """One worker process and the pipe to it."""

    def __init__(self, target: Any, cache_dir: str):
        env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
        env.pop("TRITON_INTERPRET", None)
        command = f"import sys; from {__name__} import serve; serve(sys.argv[1])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", command, json.dumps(dataclasses.asdict(target))], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.alive = True

    def compile(self, jit, spec: str) -> Optional[str]:
        """Have the worker compile jit's variant `spec`: None when it did, else why not."""
        if not self.alive:
            return "the worker has exited"
        request = dict(module=jit.fn.__module__, name=jit.fn.__name__, spec=spec)
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (OSError, ValueError) as e:  # a closed pipe
            line, error = "", str(e)
        else:
            error = f"exit status {self.process.poll()}"
        if not line:
            self.alive = False
            _warn_once(f"a Triton compile worker process stopped ({error}); its compiles run in this process")
            return "the worker has exited"
        return json.loads(line).get("error")

    def close(self) -> None:
        self.alive = False
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait(timeout=10)


def start(count: int) -> int:
    """Start worker processes (up to `count` in all, for this process's current Triton target) and return how
    many run. They import torch and Triton in the background (seconds): call it early, before the compiles."""
    from triton import knobs
    from triton.runtime.driver import driver

    with _lock:
        if len(_started) < count:
            target = driver.active.get_current_target()
            if not getattr(knobs.runtime.jit_cache_hook, "captures", False):
                knobs.runtime.jit_cache_hook = _capture_hook(knobs.runtime.jit_cache_hook)
            for _ in range(count - len(_started)):
                worker = Worker(target, knobs.cache.dir)
                _started.append(worker)
                _idle.put(worker)
        return sum(w.alive for w in _started)


def stop() -> None:
    """Stop every worker (they also stop on their own when this process exits)."""
    with _lock:
        while _started:
            _started.pop().close()
        while not _idle.empty():
            _idle.get_nowait()


def running() -> int:
    """Workers started and not known to have stopped."""
    return sum(w.alive for w in _started)


def _compile_on_idle(jit, spec: str) -> Optional[str]:
    """Worker.compile on the next idle worker (waiting for one): None when it compiled, else why not."""
    worker = _idle.get()
    try:
        return worker.compile(jit, spec)
    finally:
        _idle.put(worker)


def compile_in_worker(jit, compile_variant: Callable[[], Any]) -> Optional[Any]:
    """The kernel `compile_variant()` (jit.run(..., warmup=True)) compiles, compiled by a worker and loaded from
    the cache into this process; None when no worker runs or the worker could not compile it (then call
    compile_variant() here). Blocks while the worker compiles, without holding the GIL."""
    if running() == 0:
        return None
    spec = specialization_data(compile_variant)
    if spec is None:  # compiled in this process already
        return None
    if _compile_on_idle(jit, spec) is not None:
        return None
    try:
        return jit.preload(spec)  # Triton's cache has it now: a load, not a compile
    except Exception:  # whatever keeps it from loading, the caller's compile meets (or does not) as ever
        return None


def compile_in_background(captures: list[Callable[[], Optional[tuple[Any, str]]]]) -> None:
    """Have the workers compile, into the cache only and in the background, the variants `captures` give (each
    call: (jit, its specialization data), or None for nothing to compile). Returns at once; daemon threads (which
    never hold up this process's exit) do it: one runs the captures, Python that holds the GIL, one after the
    other, and one per worker hands it what they give and waits for its reply, which does not. So the thread that
    runs the images competes for the GIL with one thread, not with one per worker (with a warm kernel cache the
    workers answer at once, and those would all be capturing). Nothing without workers."""
    global _pending
    if running() == 0 or not captures:
        return
    with _background:
        _pending += len(captures)
    captured: "queue.SimpleQueue[Optional[tuple[Any, str]]]" = queue.SimpleQueue()  # None: no more
    senders = running()

    def done() -> None:
        global _pending
        with _background:
            _pending -= 1
            _background.notify_all()

    def capture_all() -> None:
        try:
            for capture in captures:
                try:
                    item = capture()
                except Exception:  # nothing compiled ahead: its first launch compiles it, as without workers
                    item = None
                if item is None:
                    done()
                else:
                    captured.put(item)
        finally:
            for _ in range(senders):
                captured.put(None)

    def send() -> None:
        while (item := captured.get()) is not None:
            try:
                _compile_on_idle(*item)
            finally:
                done()

    threading.Thread(target=capture_all, name="fastdiff-compile-later", daemon=True).start()
    for _ in range(senders):
        threading.Thread(target=send, name="fastdiff-compile-later-send", daemon=True).start()


def wait_background(timeout: Optional[float] = None) -> bool:
    """Wait until the background compiles (`compile_in_background`) are done; False if `timeout` seconds passed
    first. For measurements that must not see them compete."""
    with _background:
        return _background.wait_for(lambda: _pending == 0, timeout)


def specialization_data(compile_variant: Callable[[], Any]) -> Optional[str]:
    """Triton's specialization data of the variant compile_variant() would compile, captured without compiling
    it (by the hook `start` installs); None when this process has it compiled already (no compile to stop), or
    when another jit_cache_hook replaced that hook since (then compile_variant() compiled it here)."""
    captured: list[str] = []
    token = _capturing.set(captured)
    try:
        compile_variant()
    except Exception:  # data Triton cannot serialize (a function as a constexpr): the caller compiles it here
        return None
    finally:
        _capturing.reset(token)
    return captured[0] if captured else None


def _capture_hook(previous: Optional[Callable]) -> Callable:
    """A jit_cache_hook that, in a thread capturing (`specialization_data`), records the compile and stops it, and
    elsewhere does what `previous` did (other threads compile meanwhile)."""

    def hook(**kwargs):
        captured = _capturing.get()
        if captured is None:
            return previous(**kwargs) if previous is not None else None
        captured.append(kwargs["compile"]["specialization_data"])
        return True  # Triton skips the compile

    hook.captures = True
    return hook


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- the worker -----------------------------------------------------------------------------------------------


class _TargetOnly:
    """The Triton driver a worker compiles with: the calling process's target on device 0, no CUDA call."""

    def __init__(self, target):
        self.target = target
        try:  # builds a variant's C launcher beside it in the cache (best effort: else the loading process does)
            from triton.backends.nvidia.driver import CudaLauncher
            self.launcher_cls = CudaLauncher if target.backend == "cuda" else None
        except ImportError:
            self.launcher_cls = None

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


_hashing: Optional[threading.Thread] = None  # `hash_triton_ahead`'s thread


def hash_triton_ahead() -> None:
    """Compute Triton's cache key (`triton.runtime.cache.triton_key`, which Triton keeps once computed) in a
    thread. Every compile and every load from the on-disk cache needs it, and it hashes Triton's own files, its
    500 MB library among them (1.1 s on a 2-core CPU host): time the first kernel of a process would wait for.
    hashlib and the file reads release the GIL, so the process goes on meanwhile (loading the weights). Once per
    process."""
    global _hashing
    from triton.runtime import cache

    key = getattr(cache, "triton_key", None)  # Triton's internals: nothing to do where it is not
    with _lock:
        if _hashing is None and key is not None:
            _hashing = threading.Thread(target=key, name="fastdiff-triton-key", daemon=True)
            _hashing.start()


def wait_for_triton_key() -> None:
    """Wait for `hash_triton_ahead`'s thread, if one runs: Triton would compute the key again itself (in every
    thread that asks before it is kept)."""
    if _hashing is not None:
        _hashing.join()


def serve(target_json: str) -> None:
    """A worker's loop (see the module docstring); target_json: the GPUTarget to compile for, as JSON."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the replies' own pipe: what the libraries print
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # (C or Python) goes where stderr goes, not into a reply
    sys.stdout = sys.stderr
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import fastdiff.kernels  # noqa: F401  (every kernel module, as the calling process has them)
    from fastdiff.kernels._triton import jit_function

    stand_in = _TargetOnly(GPUTarget(**json.loads(target_json)))
    driver.set_active(stand_in)
    hash_triton_ahead()  # every compile needs it: computed once, before the first request is read
    wait_for_triton_key()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            jit = jit_function(getattr(importlib.import_module(request["module"]), request["name"]))
            kernel = jit.preload(request["spec"])
            if stand_in.launcher_cls is not None:
                try:
                    stand_in.launcher_cls(kernel.src, kernel.metadata)
                except Exception:  # no launcher here (no CUDA driver library): the loading process builds it
                    stand_in.launcher_cls = None
            reply: dict = {}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

