#!/usr/bin/env bash
# The default model's training run on one CUDA GPU, from the repository root (the device tool's `run`):
#     bash fastdiff/train/device_train.sh
# Installs fastdiff, trains the VAE and then the UNet + text encoder with the default recipe
# (`python -m fastdiff.train all --config default`), exports the diffusers folder, measures prompt adherence
# over 300 captions at several guidance scales, times one CPU-only `fastdiff generate`, and packs the folder
# into $OUT as <= 15 MB parts (the device tool returns at most 8 files of at most 16 MB).
#
# Afterwards, on the machine that called it:
#     mkdir -p fastdiff/assets/default && cat FILES_AT/default_model.tar.part-* | tar -xf - -C fastdiff/assets/default
#
# Time (an estimate: it has not run on a GPU yet). The default recipe's FLOPs per step (torch's FLOP counter):
# UNet stage ~1.9 TFLOP (batch 256: UNet fwd+bwd 1.07, VAE encoder fwd 0.76, text encoder 0.07), VAE stage
# ~0.9 TFLOP (batch 32). On this project's 2-core CPU the same code ran at 140-170 GFLOP/s (UNet step at batch 8:
# 0.24 s; VAE step at batch 4: 0.65 s). Assuming 40-100 TFLOP/s on an H100 in bf16 (5-12% of its peak: 64-128
# channel convolutions, float32 GroupNorms, eager launches; the step is likely bound by Python launching
# ~3000 kernels, ~30-50 ms), 3000 VAE steps take 0.5-1.2 min and 8000 UNet steps 2.5-6.5 min; install, start-up,
# export and evaluation ~1.5 min: 4.5-9 min of command time, plus the machine's start. TIME_LIMIT caps the
# training so the command ends inside the tool's 10 minutes; a stage cut short is exported as it stands and the
# log says so (the run is then exactly `--unet-steps <steps done>`: the learning rate is constant after warm-up).
set -u -o pipefail
OUT=${OUT:-device_out}
RUN=${RUN:-/tmp/fastdiff_default}  # checkpoints and logs; only what is copied to $OUT comes back
TIME_LIMIT=${TIME_LIMIT:-7.5}  # minutes of training at most (both stages together)
GUIDANCE=${GUIDANCE:-1.5,3,5,7.5}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$LOG"
FASTDIFF_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "pip install failed, see install.log"; exit 1; }
rm "$OUT/install.log"

SECONDS=0
python3 -m fastdiff.train all --out "$RUN" --config default --time-limit "$TIME_LIMIT" --quiet 2>&1 | tee -a "$LOG"
status=$?
echo "training: exit $status in ${SECONDS}s" | tee -a "$LOG"
if [ "$status" -eq 3 ]; then
    echo "TIME LIMIT: a stage stopped early; exporting what was trained (steps in model_index.json)" | tee -a "$LOG"
    [ -d "$RUN/vae" ] && [ -f "$RUN/unet.pt" ] || { echo "nothing to export"; exit 1; }
    python3 -m fastdiff.train export --out "$RUN" 2>&1 | tee -a "$LOG"
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
for stage in vae unet; do
    echo "--- $stage loss log (step, loss, lr, seconds)" >> "$LOG"
    cat "$RUN/${stage}_log.tsv" >> "$LOG"
done

SECONDS=0
# The reference ops, as on a CPU: the run measures the model, not the Triton kernels (which would also
# spend a minute autotuning here).
FASTDIFF_BACKEND=reference python3 -m fastdiff.train eval --model "$RUN/model" --n 300 --guidance "$GUIDANCE" \
    --device cuda --json "$OUT/eval.json" --grid "$OUT/grid.png" 2>&1 | tee -a "$LOG"
echo "eval: ${SECONDS}s" | tee -a "$LOG"

SECONDS=0
CUDA_VISIBLE_DEVICES= fastdiff generate "a red circle on the left on a white background" --model "$RUN/model" \
    --device cpu --seed 0 --quiet --out "$OUT/sample.png" 2>&1 | tee -a "$LOG"
echo "cpu generate (this host's CPU, start-up included): ${SECONDS}s" | tee -a "$LOG"

du -b "$RUN/model" | tail -n 1 | tee -a "$LOG"
tar -C "$RUN/model" -cf - . | split -b 15M - "$OUT/default_model.tar.part-"
ls -l "$OUT" | tee -a "$LOG"
