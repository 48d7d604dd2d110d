#!/usr/bin/env bash
# The fast path's GPU run, from the repository root on a CUDA machine, with the diffusers wheels (and their
# dependencies) in .whl/:
#     bash benchmarks/device_e2e.sh
# installs diffusers from .whl/ and fastdiff with its extension fastdiff._C built by nvcc for this GPU (as
# benchmarks/RESULTS.md's figures were measured: the fast path's workspace-free GEMM, its scheduler step and its
# CUDA-graph surgery are in them; TORCH_CUDA_ARCH_LIST overrides the GPU's own architecture), runs the fast
# path's GPU tests, then benchmarks/bench_e2e.py: fastdiff vs diffusers eager vs diffusers + torch.compile,
# whole 512x512 SD1.5 images at batch 1/4/8, SD2.1-base at batch 1, parity, UNet step TFLOP/s, a per-kernel
# profile, cold start and peak memory in fresh processes. Cases run in priority order and are skipped once the
# time limit (FASTDIFF_E2E_BUDGET_S, default 470 s for the whole script) would be overrun; the results JSON is
# rewritten after every case; the build counts against that limit. Logs, JSON and summary.txt land in $OUT
# (./device_out when unset).
# CPU smoke test of the same script: FASTDIFF_E2E_SKIP_INSTALL=1 bash benchmarks/device_e2e.sh
set -u -o pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${FASTDIFF_E2E_BUDGET_S:-470}
export PYTHONUNBUFFERED=1
SECONDS=0

if [ "${FASTDIFF_E2E_SKIP_INSTALL:-0}" != 1 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1 \
            || { echo "installing the wheels in .whl/ failed, see install.log"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no diffusers wheels in .whl/: the diffusers baselines will be skipped" | tee "$OUT/install.log"
    fi
    T0=$SECONDS
    ARCH=${TORCH_CUDA_ARCH_LIST:-}
    if [ -z "$ARCH" ]; then
        ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    fi
    # -v: setup.py's warning when the extension (or its CUDA part) could not be built goes to install.log
    TORCH_CUDA_ARCH_LIST=$ARCH python3 -m pip install -v --no-deps --no-build-isolation -e . \
        >> "$OUT/install.log" 2>&1 || { echo "pip install of fastdiff failed, see install.log"; exit 1; }
    echo "fastdiff installed, fastdiff._C built for ${ARCH:-the architectures setup.py picks}: $((SECONDS - T0))s"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null || echo "diffusers: not installed"
    # setup.py never fails for the extension (it falls back to a build without the CUDA part, or none): say so
    python3 -c "
from fastdiff import _ext
missing = []
for op in ('scheduler_step', 'matmul', 'graph'):
    ok, why = _ext.availability('cuda', op)
    print('fastdiff._C', op + ':', 'yes,' if ok else 'NO,', why)
    missing += [] if ok else [op]
if missing:
    print('WARNING: without fastdiff._C\'s', ', '.join(missing), 'the figures are not comparable to',
          'benchmarks/RESULTS.md\'s (see install.log)')
"
} 2>&1 | tee "$OUT/env.txt"
echo "setup: ${SECONDS}s"

# Fresh kernel caches: the benchmark's first-call figures then include compiling, as a new machine would.
CACHES=$(mktemp -d /tmp/fastdiff_e2e_caches.XXXX)
export TRITON_CACHE_DIR=$CACHES/triton TORCHINDUCTOR_CACHE_DIR=$CACHES/inductor

T0=$SECONDS
timeout 120 python3 -m pytest -m gpu tests/test_gpu_fast_path.py -q -s -p no:cacheprovider > "$OUT/gpu_test.log" 2>&1
echo "gpu tests: exit $? in $((SECONDS - T0))s"
grep -E "rel |passed|failed|skipped|^(FAILED|ERROR)" "$OUT/gpu_test.log" | tail -n 12

T0=$SECONDS
export FASTDIFF_E2E_JSON=$OUT/e2e_results.json
export FASTDIFF_E2E_DEADLINE_S=$((BUDGET_S - SECONDS - 20))
timeout $((BUDGET_S - SECONDS - 5)) python3 -m pytest benchmarks/bench_e2e.py --benchmark-only \
    --benchmark-json="$OUT/e2e_pytest_benchmark.json" -q -s -p no:cacheprovider > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? in $((SECONDS - T0))s (deadline ${FASTDIFF_E2E_DEADLINE_S}s)"
grep -E "^(FAILED|ERROR)|Error|passed|failed" "$OUT/bench.log" | tail -n 8
if [ -f "$OUT/e2e_results.json" ]; then
    python3 benchmarks/bench_e2e.py --summary "$OUT/e2e_results.json" | tee "$OUT/summary.txt"
else
    echo "no results file: see bench.log"
fi
echo "total: ${SECONDS}s"
