#!/usr/bin/env bash
# The GPU check: every benchmark at SD 2.1 base size (with one epoch of the release's full version,
# today's settings against the new defaults), SDXL base's sampler, fusion and DPO step at 1024 px,
# and SD 3.5 Medium's at 512 and 1024 px (real architectures, random weights), one call.
#
#   bash bench/gpu_check.sh           # on a GPU machine: sd21 size, fp16
#   bash bench/gpu_check.sh --small   # anywhere: the tiny model on the CPU, to check the script
#
# On the lent GPU machine, diffusers, open_clip and ml_collections travel as wheels in .whl/
# (see bench/RESULTS.md); they are installed into /tmp/site first. The log goes to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
log=${OUT:-/tmp}/gpu_check.log
if [ "${1:-}" = "--small" ]; then
    size=(--size tiny --device cpu --repeats 2); batch=4; targets=4
    sdxl=(--size tiny --device cpu --repeats 1)
    sd3_runs=("--size tiny --device cpu --repeats 2")
    epoch=(--size tiny --device cpu --prompts 1 --repeats 1)
else
    size=(--size sd21 --repeats 3); batch=8; targets=8
    sdxl=(--size sdxl --repeats 2)
    sd3_runs=("--size sd35m --resolution 512 --repeats 3" "--size sd35m --resolution 1024 --repeats 3")
    # one prompt of the release's full version (16 samples, 8 pairs), old and new settings, best of 2:
    # about 5 minutes on an H200 (today's training: 320 pair-timesteps at ~0.27 s)
    epoch=(--size sd21 --device cuda --prompts 1 --repeats 2)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
{
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    python3 bench/bench_sampling.py "${size[@]}" --batch $batch --steps 20
    python3 bench/bench_fusion.py "${size[@]}" --targets $targets --steps 20
    python3 bench/bench_train.py "${size[@]}" --steps 20
    python3 bench/bench_train.py "${size[@]}" --steps 20 --pairs 8
    python3 bench/bench_attention.py "${size[@]}" --batch $batch
    python3 bench/bench_epoch.py "${epoch[@]}"
    python3 bench/bench_sampling.py "${sdxl[@]}" --batch 4 --steps 20
    python3 bench/bench_fusion.py "${sdxl[@]}" --targets $targets --steps 20
    python3 bench/bench_train.py "${sdxl[@]}" --steps 20
    for run in "${sd3_runs[@]}"; do
        python3 bench/bench_sd3.py $run --batch $batch --targets $targets --steps 20
    done
} 2>&1 | grep -v -E "Warning|warn|should be kept in float32|Loading weights|it/s]|s/it]|round/s]|s/round]" | tee "$log"
