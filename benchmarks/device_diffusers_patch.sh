#!/usr/bin/env bash
# The diffusers integration's GPU run, from the repository root on a CUDA machine, with the diffusers wheels (and
# their dependencies) in .whl/:
#     bash benchmarks/device_diffusers_patch.sh
# installs diffusers from .whl/ and fastdiff (no CUDA build of csrc/: the pipeline does not use it), runs the
# integration's and the compiled kernels' GPU tests, then times diffusers' SD1.5 pipeline (random weights, fp16,
# 512x512, 25 steps, CFG) unpatched and patched: eager, with the UNet under torch.compile (default mode: the
# primary comparison) and under mode="reduce-overhead" (extra information), in one process, plus the host
# time of one eager attention / ResNet call; prints a table last. Dynamo's graph breaks and recompiles are
# logged to bench.log (TORCH_LOGS) and counted per case in the JSON. Logs and JSON land in $OUT
# (./device_out when unset). About 5-7 minutes, most of it compiling.
set -u -o pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1 \
    || { echo "installing the wheels in .whl/ failed (are they there?), see install.log"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
FASTDIFF_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 \
    || { echo "pip install of fastdiff failed, see install.log"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

SECONDS=0
python3 -m pytest -m gpu tests/test_integrations_diffusers.py tests/test_kernels_compile.py -q -s -p no:cacheprovider \
    > "$OUT/gpu_test.log" 2>&1
echo "gpu tests: exit $? in ${SECONDS}s"
grep -E "float16 relative error|opaque op calls|compiled vs eager|passed|failed|^(FAILED|ERROR)" "$OUT/gpu_test.log" \
    | tail -n 8

SECONDS=0
TORCH_LOGS=graph_breaks,recompiles python3 -m pytest benchmarks/bench_diffusers_patch.py --benchmark-only --benchmark-json="$OUT/diffusers_patch.json" \
    -q -s -p no:cacheprovider > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? in ${SECONDS}s"
grep -E "^(FAILED|ERROR)|Error" "$OUT/bench.log" | head
python3 - "$OUT/diffusers_patch.json" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys

benchmarks = json.load(open(sys.argv[1]))["benchmarks"]
runs = {(b["extra_info"]["mode"], b["extra_info"]["provider"]): b["extra_info"]
        for b in benchmarks if b["extra_info"]["op"] == "diffusers_pipeline"}
host = {b["extra_info"]["provider"]: b["extra_info"] for b in benchmarks if b["extra_info"]["op"] == "host_us_per_call"}
first = next(iter(runs.values()))
print(f"{first['gpu']}, torch {first['torch']}, triton {first['triton']}, diffusers {first['diffusers']}; "
      f"{first['model']} random weights, {first['size']}x{first['size']}, {first['steps']} steps DPM++ 2M, CFG 7.5, "
      f"{first['dtype']}; ms = median of one whole image; parity = final latents vs unpatched eager fp32")
print(f"{'mode':24} {'unpatched ms':>12} {'patched ms':>10} {'speedup':>7} {'parity unpatched':>16} "
      f"{'parity patched':>14} {'ratio':>6}  graph breaks/graphs/frames unpatched, patched")
for mode in ("eager", "compile", "compile-reduce-overhead"):
    theirs, ours = runs.get((mode, "unpatched")), runs.get((mode, "patched"))
    if theirs is None or ours is None:
        print(f"{mode:24} missing a case: see bench.log")
        continue
    ratio = ours["parity"] / theirs["parity"] if theirs["parity"] else float("nan")
    graphs = "" if "graphs" not in ours else ", ".join(
        f"{r['graph_breaks']}/{r['graphs']}/{r['frames']}" for r in (theirs, ours))
    print(f"{mode:24} {theirs['ms']:12.1f} {ours['ms']:10.1f} {theirs['ms'] / ours['ms']:6.2f}x "
          f"{theirs['parity']:16.2e} {ours['parity']:14.2e} {ratio:6.2f}  {graphs}")
if len(host) == 2:
    print("host us per eager call at the 8x8 level, unpatched -> patched: "
          + ", ".join(f"{part} {host['unpatched'][part]:.1f} -> {host['patched'][part]:.1f}"
                      for part in ("attention", "resnet")))
EOF
