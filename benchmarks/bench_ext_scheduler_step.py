"""Speed of the fused scheduler step in fastdiff._C against eager PyTorch and a plain copy, on SD latents.

    python benchmarks/bench_ext_scheduler_step.py                   # CUDA when available, else CPU
    python benchmarks/bench_ext_scheduler_step.py --device cpu --json out.json

The step timed is DPM++ 2M with classifier-free guidance, the default SD sampler: it reads x (B, 4, H, W),
model_output (2B, 4, H, W) and prev_x0 (B, 4, H, W), and writes x_next and x0: 6 * B*4*H*W elements. That is
the byte count used for every GB/s figure (each input read once, each output written once).

How CUDA is timed, and why:
  - `graph`: K back-to-back calls captured in one CUDA graph, replayed; time per call = replay time / K.
    This is the GPU's own cost per step (kernel plus the gap between kernels), with the host out of it.
  - `loop`: the same K calls launched eagerly from Python between two CUDA events: what a caller that does
    not use graphs pays, host launch overhead included.
  - `hot`: every call reads the same inputs. SD latents are small (4x64x64 fp16 is 32 KB per sample), so
    these stay in L2 (50-60 MB on H100/H200) and the figure is an L2-speed figure.
  - `rotating`: calls cycle through enough input sets to exceed 3x L2, so inputs come from HBM.
  - Copy bandwidth is measured twice: a copy (clone) moving the SAME byte count under the same hot or
    rotating regime, which is the fair peer for a small step, and a 1 GiB copy, the HBM ceiling.
"""
import argparse
import json
import math
import platform
import statistics
import time

import torch

from fastdiff import _ext, ops
from fastdiff.kernels.scheduler_step import StepCoeffs
from timing import graph_ms

# DPM++ 2M coefficients at a mid-schedule step (sigma 3.0 -> 2.4, previous sigma 3.8), epsilon model in
# k-diffusion's sigma space: x0 = x - sigma eps; only the values matter for speed.
SIGMA, SIGMA_NEXT, SIGMA_PREV = 3.0, 2.4, 3.8
H = math.log(SIGMA / SIGMA_NEXT)
R = math.log(SIGMA_PREV / SIGMA) / H
COEFFS = StepCoeffs(c_x=1.0, c_m=-SIGMA, a_x=SIGMA_NEXT / SIGMA, a_0=-math.expm1(-H) * (1 + 1 / (2 * R)),
                    a_p=math.expm1(-H) / (2 * R))
GUIDANCE = 7.5
BATCHES = (1, 2, 4, 8, 16)
LATENTS = (64, 128)  # 512 px and 1024 px images
STREAMS = 6  # tensors of B*4*H*W elements moved per step: x, uncond, cond, prev_x0 read; x_next, x0 written


def torch_step(x, model_output, coeffs, guidance_scale, prev_x0, noise=None):
    """The same update as eager PyTorch would write it, in the tensors' own dtype (fewest kernels)."""
    uncond, cond = model_output.chunk(2)
    m = uncond + guidance_scale * (cond - uncond)
    x0 = coeffs.c_x * x + coeffs.c_m * m
    return coeffs.a_x * x + coeffs.a_0 * x0 + coeffs.a_p * prev_x0, x0


def triton_step():
    """The Triton kernel when kernels/scheduler_step.py has it and it can run here, else None."""
    try:
        from fastdiff.kernels.scheduler_step import scheduler_step
    except ImportError:
        return None
    return scheduler_step if ops.availability("triton", "cuda")[0] else None


def make_inputs(batch, side, dtype, device):
    shape = (batch, 4, side, side)
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn((2 * batch, 4, side, side), dtype=dtype,
            device=device), torch.randn(shape, dtype=dtype, device=device))


def graph_time_us(calls, reps=20):
    """Median time per call (µs) of `calls` (zero-argument callables) captured back to back in one graph."""
    return graph_ms(calls, reps)[0] * 1e3


def loop_time_us(calls, reps=10):
    """Median time per call (µs) of `calls` launched eagerly back to back, host overhead included."""
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def cuda_rows(dtype, providers, l2_bytes, big_copy_gbs):
    rows = []
    for side in LATENTS:
        for batch in BATCHES:
            n = batch * 4 * side * side
            step_bytes = STREAMS * n * torch.finfo(dtype).bits // 8
            input_bytes = 4 * n * torch.finfo(dtype).bits // 8
            n_sets = max(1, math.ceil(3 * l2_bytes / input_bytes))
            calls = max(50, n_sets)
            sets = [make_inputs(batch, side, dtype, "cuda") for _ in range(n_sets)]
            # A copy moving the same bytes: clone reads half and writes half.
            copy_srcs = [torch.randn(step_bytes // 2 // 2, dtype=torch.float16, device="cuda") for _ in range(n_sets)]
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "latent": f"4x{side}x{side}",
                   "bytes": step_bytes, "input_sets": n_sets, "calls_per_graph": calls}
            for regime, rotate in (("hot", False), ("rot", True)):
                picks = [i % n_sets if rotate else 0 for i in range(calls)]
                row[f"copy_{regime}_us"] = graph_time_us([copy_srcs[j].clone for j in picks])
                for name, fn in providers.items():
                    steps = [lambda fn=fn, s=sets[j]: fn(s[0], s[1], COEFFS, GUIDANCE, s[2]) for j in picks]
                    row[f"{name}_{regime}_us"] = graph_time_us(steps)
                    if regime == "hot":
                        row[f"{name}_loop_us"] = loop_time_us(steps)
            for regime in ("hot", "rot"):
                row[f"fastdiff_{regime}_gbs"] = step_bytes / row[f"fastdiff_{regime}_us"] / 1e3
                row[f"fastdiff_{regime}_pct_copy_same"] = 100 * row[f"copy_{regime}_us"] / row[f"fastdiff_{regime}_us"]
                row[f"fastdiff_{regime}_pct_copy_big"] = 100 * row[f"fastdiff_{regime}_gbs"] / big_copy_gbs
            rows.append(row)
            del sets, copy_srcs
    return rows


def check_agreement(dtype):
    """The timed implementations compute the same thing (max |difference| against the fused kernel)."""
    x, mo, prev = make_inputs(2, 64, dtype, "cuda")
    ours = _ext.scheduler_step(x, mo, COEFFS, GUIDANCE, prev)[0].float()
    return (torch_step(x, mo, COEFFS, GUIDANCE, prev)[0].float() - ours).abs().max().item()


def run_cuda(args):
    props = torch.cuda.get_device_properties(0)
    big = torch.randn(512 * 2**20 // 2, dtype=torch.float16, device="cuda")  # 512 MiB read + 512 MiB written
    big_copy_us = graph_time_us([big.clone for _ in range(10)], reps=10)
    big_copy_gbs = 2 * big.numel() * 2 / big_copy_us / 1e3
    del big
    providers = {"fastdiff": _ext.scheduler_step, "torch": torch_step}
    triton = triton_step()
    if triton is not None:
        providers["triton"] = triton
    import triton as triton_pkg
    env = {"gpu": torch.cuda.get_device_name(), "sm_count": props.multi_processor_count,
           "l2_mb": props.L2_cache_size / 2**20, "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton_pkg.__version__, "triton_step_timed": triton is not None,
           "big_copy_gbs": big_copy_gbs, "coeffs": COEFFS._asdict(), "guidance": GUIDANCE}
    result = {"env": env, "rows": []}
    for dtype in (torch.float32, torch.float16):
        env[f"max_abs_diff_torch_vs_fastdiff_{dtype}"] = check_agreement(dtype)
        result["rows"] += cuda_rows(dtype, providers, props.L2_cache_size, big_copy_gbs)
    return result


def cpu_time_us(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def run_cpu(args):
    from fastdiff.kernels.scheduler_step import scheduler_step_ref

    providers = {"fastdiff": _ext.scheduler_step, "reference": scheduler_step_ref, "torch": torch_step}
    rows = []
    for dtype in (torch.float32,):
        for side in LATENTS:
            for batch in (1, 2, 4):
                x, mo, prev = make_inputs(batch, side, dtype, "cpu")
                n = x.numel()
                row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "latent": f"4x{side}x{side}",
                       "bytes": STREAMS * n * x.element_size()}
                for name, fn in providers.items():
                    row[f"{name}_us"] = cpu_time_us(lambda: fn(x, mo, COEFFS, GUIDANCE, prev), args.reps)
                src = torch.randn(3 * n, dtype=dtype)  # clone reads 3n and writes 3n elements: the step's 6n
                row["copy_same_us"] = cpu_time_us(src.clone, args.reps)
                rows.append(row)
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    return {"env": env, "rows": rows}


def print_cuda(result):
    env = result["env"]
    print(f"\n{env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; "
          f"1 GiB copy: {env['big_copy_gbs']:.0f} GB/s; L2 {env['l2_mb']:.0f} MB")
    print("times in µs per step from CUDA-graph replay; %copy = same-byte copy time / step time; "
          "%big = step GB/s / 1 GiB copy GB/s; loop = eager launches, host included")
    header = (f"{'dtype':8} {'B':>2} {'latent':9} {'KB':>7} | {'hot':>6} {'copy':>6} {'%copy':>6} | "
              f"{'rot':>6} {'copy':>6} {'%copy':>6} {'GB/s':>6} {'%big':>5} | {'torch':>6} {'loop':>6} "
              f"{'x':>5} | {'ours':>5}" + (f" | {'triton':>6}" if env["triton_step_timed"] else ""))
    for dtype in ("float32", "float16"):
        print(header)
        for r in (r for r in result["rows"] if r["dtype"] == dtype):
            line = (f"{r['dtype']:8} {r['batch']:>2} {r['latent']:9} {r['bytes'] / 1e3:>7.0f} | "
                    f"{r['fastdiff_hot_us']:>6.2f} {r['copy_hot_us']:>6.2f} {r['fastdiff_hot_pct_copy_same']:>5.0f}% | "
                    f"{r['fastdiff_rot_us']:>6.2f} {r['copy_rot_us']:>6.2f} {r['fastdiff_rot_pct_copy_same']:>5.0f}% "
                    f"{r['fastdiff_rot_gbs']:>6.0f} {r['fastdiff_rot_pct_copy_big']:>4.0f}% | "
                    f"{r['torch_hot_us']:>6.2f} {r['torch_loop_us']:>6.1f} "
                    f"{r['torch_hot_us'] / r['fastdiff_hot_us']:>4.1f}x | {r['fastdiff_loop_us']:>5.1f}")
            if env["triton_step_timed"]:
                line += f" | {r['triton_hot_us']:>6.2f}"
            print(line)


def print_cpu(result):
    env = result["env"]
    print(f"\nCPU {env['cpu']}, {env['threads']} threads, torch {env['torch']}; median µs per step")
    print(f"{'dtype':8} {'B':>2} {'latent':9} {'fastdiff':>9} {'reference':>9} {'torch':>9} {'copy':>9}")
    for r in result["rows"]:
        print(f"{r['dtype']:8} {r['batch']:>2} {r['latent']:9} {r['fastdiff_us']:>9.1f} {r['reference_us']:>9.1f} "
              f"{r['torch_us']:>9.1f} {r['copy_same_us']:>9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write every figure and the environment here")
    parser.add_argument("--reps", type=int, default=50, help="CPU: timed calls per figure")
    args = parser.parse_args()
    ok, why = _ext.availability(args.device)
    if not ok:
        raise SystemExit(f"fastdiff._C cannot run on {args.device}: {why}")
    torch.manual_seed(0)
    result = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    (print_cuda if args.device == "cuda" else print_cpu)(result)


if __name__ == "__main__":
    main()
