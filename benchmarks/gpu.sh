#!/usr/bin/env bash
# The GPU throughput record: `handclip bench` for CLIP ViT-B/16 (eager, then torch.compile) and
# RN50 on one GPU, on synthetic 1600x1200 hand photos (the 11k Hands format). Under 5 minutes on
# one H100; copy the printed tables into docs/performance.md.
#
#   bash benchmarks/gpu.sh                          # on a GPU machine, from anywhere in the repository
#   HANDCLIP_BENCH_DRY_RUN=1 bash benchmarks/gpu.sh # on a CPU: tiny models, few steps (checks the script)
#
# Needs python3 ($PYTHON) with torch and torchvision. When it cannot import open_clip and
# pytorch_metric_learning, they are installed from .whl/ (fill it with benchmarks/fetch_wheels.sh)
# into a temporary folder; nothing else is downloaded, and random weights stand in for CLIP's (the
# speed is the same). Writes bench_vitb16.json, bench_vitb16_compile.json, bench_rn50.json and
# gpu_bench.log into $OUT if set, else ./bench_out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=$(realpath -m "${OUT:-bench_out}")
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HANDCLIP_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/gpu_bench.log") 2>&1

if [[ -n "${HANDCLIP_BENCH_DRY_RUN:-}" ]]; then
    # tiny models on the CPU, few identities and steps: every command runs, no figure means anything
    DEVICE=cpu IDS=12 STEPS=4 COMPILE=0
    MODEL_FLAGS=(--image-size 64 --batch-size 16)
    VIT=(--arch tiny-vit) RN=(--arch tiny-rn)
else
    # 32 identities x 4 aspects x 2 photos (+ accessory photos): about 300 images, 21 train identities.
    # 60 steps: many more batches than JPEG workers, so their head start at warm-up counts little.
    DEVICE=cuda IDS=32 STEPS=60 COMPILE=${HANDCLIP_BENCH_COMPILE:-1}
    MODEL_FLAGS=()
    VIT=() RN=()
fi

if ! "$PYTHON" -c "import open_clip, pytorch_metric_learning" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu.sh: $PYTHON lacks open_clip / pytorch_metric_learning and .whl/ has no wheels;" \
             "run benchmarks/fetch_wheels.sh where pip reaches PyPI" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's handclip, installed or not

handclip() { "$PYTHON" -m handclip "$@"; }
phase() { echo "== [$((SECONDS))s] $*"; }

phase "machine"
date -u +%Y-%m-%dT%H:%M:%SZ
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.version.cuda)"
echo "CPU cores: $(nproc)"
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))  # the JPEG loader's DataLoader workers

phase "synthesising $IDS identities at 1600x1200"
handclip synth --out "$WORK/data" --ids "$IDS" --per-aspect 2 --size 1600x1200
handclip prepare 11k --root "$WORK/data" --num-splits 1 > /dev/null

bench() {  # name, config, extra flags...
    local name=$1 config=$2
    shift 2
    phase "bench $name"
    handclip bench --config "configs/$config" --pretrained none --data "$WORK/data" --splits "$WORK/data/splits" \
        --aspect dorsal_r --device "$DEVICE" --steps "$STEPS" --set "data.num_workers=$WORKERS" \
        --out "$RESULTS/bench_$name.json" "${MODEL_FLAGS[@]}" "$@"
}
bench vitb16 vitb16-ce-triplet.yaml "${VIT[@]}"
bench rn50 rn50-ce-triplet.yaml "${RN[@]}"
if [[ $COMPILE == 1 ]]; then
    bench vitb16_compile vitb16-ce-triplet.yaml "${VIT[@]}" --set train.compile=true
fi
phase "done: $RESULTS"
