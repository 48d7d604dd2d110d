"""Print the kernel benchmarks side by side: fastdiff against torch per shape, from pytest-benchmark's JSON;
then, for ops that also time forced variants (providers `fastdiff_<variant>`, e.g. GroupNorm's single and
split strategies) or other torch calls (`torch_<name>`, e.g. residual_add's one-pass floor `x + y`), each
one's ms and speedup over torch.

    python benchmarks/summarize_kernels.py bench.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)  # (op, shape, layout, dtype) -> provider -> extra_info
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], info["shape"], info.get("layout", ""), info["dtype"].removeprefix("torch."))
        rows[key][info["provider"]] = info
    first = data["benchmarks"][0]["extra_info"]
    print(f"{first['gpu']}, torch {first['torch']}, triton {first['triton']}; "
          f"1 GiB copy {first.get('big_copy_gbs', 0):.0f} GB/s. ms = median per call (CUDA graph, rotating inputs)")
    print(f"{'op':16} {'shape':22} {'layout':13} {'dtype':8} {'fastdiff':>9} {'torch':>9} {'speedup':>7} "
          f"{'TFLOP/s':>8} {'GB/s':>6} {'%copy=':>6} {'%copy1G':>7} {'torch GB/s':>10}")
    for (op, shape, layout, dtype), by in rows.items():
        ours, theirs = by.get("fastdiff"), by.get("torch")
        if ours is None or theirs is None:
            continue
        tflops = f"{ours['tflops']:.0f}" if "tflops" in ours else ""
        pct_same = f"{ours['pct_copy_same']:.0f}%" if "pct_copy_same" in ours else ""
        print(f"{op:16} {shape:22} {layout:13} {dtype:8} {ours['ms']:9.4f} {theirs['ms']:9.4f} "
              f"{theirs['ms'] / ours['ms']:6.2f}x {tflops:>8} {ours.get('gbs', 0):6.0f} {pct_same:>6} "
              f"{ours.get('pct_copy_big', 0):6.0f}% {theirs.get('gbs', 0):10.0f}")

    variants = sorted({p for by in rows.values() for p in by if p.startswith(("fastdiff_", "torch_"))})
    if not variants:
        return
    print(f"\nvariants: ms (speedup over torch)\n{'op':16} {'shape':22} {'layout':13} {'dtype':8} "
          + " ".join(f"{v:>22}" for v in ["fastdiff", *variants]))
    for (op, shape, layout, dtype), by in rows.items():
        theirs = by.get("torch")
        if theirs is None or not any(v in by for v in variants):
            continue
        cells = [f"{by[v]['ms']:.4f} ({theirs['ms'] / by[v]['ms']:.2f}x)" if v in by else "-"
                 for v in ["fastdiff", *variants]]
        print(f"{op:16} {shape:22} {layout:13} {dtype:8} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1])
