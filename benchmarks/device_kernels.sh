#!/usr/bin/env bash
# The kernels' GPU run, from the repository root on a CUDA machine:
#     bash benchmarks/device_kernels.sh [tests|bench|tune|all|group_norm|layer_norm|residual_add] [pytest -k filter]
# installs fastdiff (no CUDA build of csrc/), runs the kernels' GPU tests (8 workers: Triton compiles in
# parallel; their timings do not matter), then the kernel benchmarks in one process, one at a time, and
# prints a fastdiff-vs-torch table last. `tune` (not in `all`) A/Bs the kernels' tuning constants;
# `group_norm` runs tests and benchmarks of GroupNorm alone (its single and split strategies side by side),
# `layer_norm` those of LayerNorm and add + LayerNorm alone (with its forced tile sizes side by side),
# `residual_add` those of the residual + bias add alone (its forced block sizes and torch's `x + y` beside).
# Logs and JSON land in $OUT (./device_out when unset).
set -u -o pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
STAGE=${1:-all}
FILTER=${2:-}
export PYTHONUNBUFFERED=1
TESTS="tests/test_kernel_attention.py tests/test_kernel_group_norm.py tests/test_kernel_scheduler_step.py
       tests/test_kernel_geglu.py tests/test_kernel_layer_norm.py tests/test_kernel_residual_add.py
       tests/test_kernel_conv2d.py tests/test_kernel_subpixel.py tests/test_kernel_channel_cat.py
       tests/test_kernel_linear.py"
BENCHES="benchmarks/bench_attention.py benchmarks/bench_group_norm.py benchmarks/bench_scheduler_step.py
         benchmarks/bench_geglu.py benchmarks/bench_layer_norm.py benchmarks/bench_residual_add.py
         benchmarks/bench_conv2d.py benchmarks/bench_subpixel.py benchmarks/bench_channel_cat.py
         benchmarks/bench_linear.py benchmarks/bench_folded_bias.py"
if [ "$STAGE" = group_norm ]; then
    TESTS=tests/test_kernel_group_norm.py BENCHES=benchmarks/bench_group_norm.py STAGE=all
elif [ "$STAGE" = layer_norm ]; then
    TESTS=tests/test_kernel_layer_norm.py BENCHES=benchmarks/bench_layer_norm.py STAGE=all
elif [ "$STAGE" = residual_add ]; then
    TESTS=tests/test_kernel_residual_add.py BENCHES=benchmarks/bench_residual_add.py STAGE=all
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if ! python3 -c "import fastdiff.kernels" 2> /dev/null; then
    FASTDIFF_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
        || { echo "pip install failed, see install.log"; exit 1; }
fi

if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
    SECONDS=0
    # 8 test processes: each may start compile workers of its own; one each is plenty
    FASTDIFF_COMPILE_PROCESSES=1 python3 -m pytest -m gpu $TESTS -n 8 -q -s -p no:cacheprovider \
        > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests: exit $? in ${SECONDS}s; $(grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests.log" | wc -l) failed"
    grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/gpu_tests.log" | tail -n 25
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
    SECONDS=0
    TRITON_PRINT_AUTOTUNING=1 python3 -m pytest $BENCHES --benchmark-only --benchmark-json="$OUT/bench.json" \
        -q -s -p no:cacheprovider ${FILTER:+-k "$FILTER"} > "$OUT/bench.log" 2>&1
    echo "benchmarks: exit $? in ${SECONDS}s"
    grep -E '^(FAILED|ERROR)' "$OUT/bench.log" | head
    python3 benchmarks/summarize_kernels.py "$OUT/bench.json" | tee "$OUT/summary.txt"
fi
if [ "$STAGE" = tune ]; then
    python3 benchmarks/tune_kernels.py 2>&1 | tee "$OUT/tune.txt"
fi
