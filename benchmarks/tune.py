"""Write this GPU's tuning table: the measured choices `fastdiff.tuning` gives the fast path.

    python benchmarks/tune.py [--out fastdiff/assets/tuning] [--quick] [--log ROWS.jsonl]
    python benchmarks/tune.py --rechoose fastdiff/assets/tuning/sm_90.json

On one CUDA GPU, for the calls the Stable Diffusion UNets make at the sizes users run (SD1.x, SD2.x and SDXL per
level with attention, 512x512 to 1024x1024, CFG batch 2, 8 and 16, float16):
  - every attention call (self- and cross-attention, in the fused projections' layouts the engine gives them):
    torch's SDPA and each of the Triton kernel's candidate configs (`fastdiff.kernels.attention.candidate_configs`);
    then one config per head dim and set of candidates and, per call, the faster implementation with it
    (`fastdiff.tuning.choose`);
  - every transformer linear with an epilogue (the GEGLU projection, the MLP's output linear and proj_out with
    their residual add): `fastdiff.kernels.linear` against cuBLAS and the epilogue as its own pass, as `ops.linear`
    runs either; per call the faster (`fastdiff.tuning.choose_linears`).
The rows replace this GPU model's table in `sm_<major><minor>.json` (other models' tables are kept), with the GPU,
versions, date and this command.
Timing: CUDA-graph replay of back-to-back calls over input sets rotated past the L2 cache (benchmarks/timing.py),
median of the replays. --quick: CFG batch 2 only. --log: every measured call is appended to ROWS.jsonl as it
completes, and calls already there (from an interrupted run on this GPU) are not measured again. --rechoose:
apply `fastdiff.tuning.choose` again to a table's recorded timings, on any machine.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from conftest import input_sets  # noqa: E402
from timing import graph_ms  # noqa: E402

from fastdiff import ops, tuning  # noqa: E402

attention_module = importlib.import_module("fastdiff.kernels.attention")  # the package exports the function
linear_module = importlib.import_module("fastdiff.kernels.linear")

DTYPE = torch.float16
CONTEXT_TOKENS = 77
# (family, heads per attention level, channels per attention level, levels with attention (0 = full latent
# size), sizes (height, width) in pixels)
FAMILIES = [
    ("sd1", (8, 8, 8, 8), (320, 640, 1280, 1280), (0, 1, 2, 3), [(512, 512), (512, 768), (768, 768), (1024, 1024)]),
    ("sd2", (5, 10, 20, 20), (320, 640, 1280, 1280), (0, 1, 2, 3), [(512, 512), (512, 768), (768, 768), (1024, 1024)]),
    ("sdxl", (5, 10, 20), (320, 640, 1280), (1, 2), [(768, 768), (1024, 1024), (832, 1216)]),
]
CFG_BATCHES = (2, 8, 16)


def attention_calls(cfg_batches) -> list[tuple[int, int, int, int, int]]:
    """(head_dim, heads, batch, seq_q, seq_kv) of every attention call, self (seq_kv = seq_q) and cross
    (seq_kv = 77), one per (head_dim, batch * heads, seq_q, seq_kv), least work first."""
    calls = {}
    for _, heads, channels, levels, sizes in FAMILIES:
        for (height, width), level, batch in ((s, lv, b) for s in sizes for lv in levels for b in cfg_batches):
            tokens = (height // 8 >> level) * (width // 8 >> level)
            h, d = heads[level], channels[level] // heads[level]
            for seq_kv in (tokens, CONTEXT_TOKENS):
                calls.setdefault((d, batch * h, tokens, seq_kv), (d, h, batch, tokens, seq_kv))
    return sorted(calls.values(), key=lambda c: c[0] * c[1] * c[2] * c[3] * c[4])


def linear_calls(cfg_batches) -> list[tuple[int, int, int, str]]:
    """(m, k, n, epilogue) of every transformer linear with an epilogue, per level with attention (C channels, m =
    batch * tokens): the GEGLU projection (C -> 2 * 4C, "geglu"), the MLP's output linear (4C -> C) and proj_out
    (C -> C), both "residual"; one per shape, least work first."""
    calls = set()
    for _, _, channels, levels, sizes in FAMILIES:
        for (height, width), level, batch in ((s, lv, b) for s in sizes for lv in levels for b in cfg_batches):
            m, c = batch * (height // 8 >> level) * (width // 8 >> level), channels[level]
            calls |= {(m, c, 8 * c, "geglu"), (m, 4 * c, c, "residual"), (m, c, c, "residual")}
    return sorted(calls, key=lambda call: call[0] * call[1] * call[2])


def make_inputs(head_dim: int, heads: int, batch: int, seq_q: int, seq_kv: int) -> tuple:
    """q, k, v as the engine's fused projections give them: self-attention views of one (B, S, 3, H, D) buffer,
    cross-attention q from (B, S, H * D) and k, v views of a (B, 77, 2, H, D) buffer."""
    if seq_q == seq_kv:
        qkv = torch.randn(batch, seq_q, 3, heads, head_dim, device="cuda", dtype=DTYPE)
        return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", dtype=DTYPE).transpose(1, 2)
    kv = torch.randn(batch, seq_kv, 2, heads, head_dim, device="cuda", dtype=DTYPE)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def time_us(fn, sets: list[tuple]) -> float:
    calls = [(lambda s=sets[i % len(sets)]: fn(*s)) for i in range(max(4, len(sets)))]
    return graph_ms(calls, replays=7)[0] * 1e3


def measure(call: tuple[int, int, int, int, int]) -> dict:
    head_dim, heads, batch, seq_q, seq_kv = call
    nbytes = 2 * batch * heads * (2 * seq_q + 2 * seq_kv) * head_dim
    sets = [make_inputs(*call) for _ in range(input_sets(nbytes))]
    us = {"sdpa": time_us(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), sets)}
    for config in attention_module.candidate_configs(DTYPE, seq_kv, head_dim):
        us[",".join(map(str, config))] = time_us(
            lambda q, k, v, c=config: attention_module.attention(q, k, v, config=c), sets)
    return {"head_dim": head_dim, "seq_q": seq_q, "seq_kv": seq_kv, "batch_heads": batch * heads,
            "dtype": str(DTYPE).removeprefix("torch."), "us": {k: round(v, 2) for k, v in us.items()}}


def measure_linear(call: tuple[int, int, int, str]) -> dict:
    """The Triton linear and cuBLAS + the epilogue pass (GEGLU's Triton kernel, or the eager residual add) on one
    call: x (m, k), an nn.Linear's weight (n, k) and bias, the residual (m, n)."""
    m, k, n, epilogue = call
    geglu = epilogue == "geglu"
    width = n // 2 if geglu else n
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(DTYPE)
    bias = (torch.randn(n, device="cuda") * 0.1).to(DTYPE)
    sets = [(torch.randn(m, k, device="cuda", dtype=DTYPE),
             None if geglu else torch.randn(m, width, device="cuda", dtype=DTYPE))
            for _ in range(input_sets(2 * (m * k + m * width)))]

    def cublas(x, residual):
        h = F.linear(x, weight, bias)
        return ops.geglu(h) if geglu else residual + h

    us = {"triton": time_us(lambda x, residual: linear_module.linear(x, weight, bias, residual, geglu), sets),
          "cublas": time_us(cublas, sets)}
    return {"m": m, "k": k, "n": n, "epilogue": epilogue, "dtype": str(DTYPE).removeprefix("torch."),
            "us": {name: round(t, 2) for name, t in us.items()}}


def measured_row(key: dict, measure_call: Callable[[], dict], log: Path | None) -> dict:
    """measure_call(), or the row `log` holds under `key` (the GPU, the op and the call) from an earlier run on this
    GPU; new rows are appended."""
    if log is not None and log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in key.items()):
                return entry["row"]
    row = measure_call()
    if log is not None:
        with log.open("a") as f:
            f.write(json.dumps(dict(key, row=row)) + "\n")
    return row


def rechoose(path: Path) -> None:
    """Run `fastdiff.tuning.choose` and `choose_linears` again over the timings every device's table in `path` holds
    (no GPU needed)."""
    tables = json.loads(path.read_text())
    for table in tables["devices"].values():
        tuning.choose(table["attention"])
        tuning.choose_linears(table.get("linear", []))
    path.write_text(json.dumps(tables, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=tuning.TABLES)
    parser.add_argument("--quick", action="store_true", help="CFG batch 2 only")
    parser.add_argument("--log", type=Path, help="append measured calls here; reuse the ones already there")
    parser.add_argument("--rechoose", type=Path, metavar="TABLE",
                        help="only choose again from the timings TABLE holds (after a change to `choose`; no GPU)")
    args = parser.parse_args()
    if args.rechoose is not None:
        rechoose(args.rechoose)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tune.py measures a GPU and torch sees none")
    import triton

    name = torch.cuda.get_device_name()
    cfg_batches = (2,) if args.quick else CFG_BATCHES
    rows = [measured_row(dict(gpu=name, op="attention", head_dim=d, seq_q=sq, seq_kv=skv, batch_heads=b * h),
                         lambda call=(d, h, b, sq, skv): measure(call), args.log)
            for d, h, b, sq, skv in attention_calls(cfg_batches)]
    tuning.choose(rows)
    linears = [measured_row(dict(gpu=name, op="linear", m=m, k=k, n=n, epilogue=epilogue),
                            lambda call=(m, k, n, epilogue): measure_linear(call), args.log)
               for m, k, n, epilogue in linear_calls(cfg_batches)]
    tuning.choose_linears(linears)
    for row in rows:
        sdpa, ours = row["us"]["sdpa"], row["us"][",".join(map(str, row["config"]))]
        print(f"D{row['head_dim']:<4} BH {row['batch_heads']:<4} {row['seq_q']:>6} x {row['seq_kv']:<6} sdpa "
              f"{sdpa:9.1f} us  fastdiff {ours:9.1f} us {tuple(row['config'])} -> {row['impl']} ({sdpa / ours:.2f}x)")
    path = args.out / tuning.table_path(torch.cuda.get_device_capability()).name
    devices = json.loads(path.read_text())["devices"] if path.exists() else {}
    devices[name] = {
        "measured": {"gpu": name, "torch": torch.__version__, "triton": triton.__version__,
                     "date": datetime.date.today().isoformat(),
                     "command": "python benchmarks/tune.py" + (" --quick" if args.quick else "")},
        "attention": rows,
        "linear": linears,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"devices": devices}, indent=1) + "\n")
    for row in linears:
        print(f"linear {row['epilogue']:<8} {row['m']:>6} x {row['k']:<5} -> {row['n']:<6} cublas "
              f"{row['us']['cublas']:9.1f} us  triton {row['us']['triton']:9.1f} us -> {row['impl']} "
              f"({row['us']['cublas'] / row['us']['triton']:.2f}x)")
    wins = sum(r["impl"] == "fastdiff" for r in rows)
    print(f"{path}: {name}, {len(rows)} attention rows, fastdiff's kernel faster at {wins}; median row "
          f"{statistics.median(r['us']['sdpa'] for r in rows):.1f} us for SDPA; {len(linears)} linear rows, the "
          f"Triton linear faster at {sum(r['impl'] == 'triton' for r in linears)}")


if __name__ == "__main__":
    main()
