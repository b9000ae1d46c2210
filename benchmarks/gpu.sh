#!/usr/bin/env bash
# The GPU record, one script: synthetic 1600x1200 photos at the real datasets' sizes (11k Hands: 190
# subjects, about 11,000 photos; HK PolyU HD: 501 + 213 subjects), `handclip bench` of CLIP ViT-B/16
# eager and compiled at batch 64, 256 and the reference recipe's 20, and RN50, then `handclip benchmark`
# over the four 11k aspects (and HD while time allows) for a fixed few epochs under the published
# protocol (10 splits, flip). About 8 minutes on one H100/H200; every raw JSON goes to the results folder.
#
#   bash benchmarks/gpu.sh                          # on a GPU machine, from anywhere in the repository
#   HANDCLIP_BENCH_DRY_RUN=1 bash benchmarks/gpu.sh # on a CPU: tiny models, small photos (checks the script)
#
# Needs python3 ($PYTHON) with torch and torchvision. When it cannot import open_clip and
# pytorch_metric_learning, they are installed from .whl/ (fill it with benchmarks/fetch_wheels.sh)
# into a temporary folder; nothing else is downloaded, and random weights stand in for CLIP's (the
# speed is the same). Writes into $OUT if set, else ./bench_out: bench_<model>_<mode>_b<batch>.json,
# benchmark/ (leaderboard.json/.md, benchmark.json with the phases' seconds, each aspect's results.json
# and history.csv), summary.json and gpu_bench.log. Phases marked optional start only before
# $HANDCLIP_BENCH_DEADLINE seconds (default 420), so the script ends in time for one rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=$(realpath -m "${OUT:-bench_out}")
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HANDCLIP_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/gpu_bench.log") 2>&1
DEADLINE=${HANDCLIP_BENCH_DEADLINE:-420}

if [[ -n "${HANDCLIP_BENCH_DRY_RUN:-}" ]]; then
    # tiny models on the CPU, small photos and few of them: every command runs, no figure means anything
    DEVICE=cpu STEPS=4 EPOCHS=1 SPLITS=2 BATCHES=(16 32) REF_BATCH=8 COMPILED_BATCHES=(16)
    DATA_FLAGS=(--ids 12 --per-aspect 3 --drawn 2 --size 320x240 --workers 2
                --hd-subjects 452 --hd-photos 2 --hd-distractors 2 --hd-distractor-photos 2)
    MODEL_FLAGS=(--image-size 64)
    BENCHMARK_SETS=(--set model.arch=tiny-vit --set model.image_size=64 --set data.batch_size=16)
    VIT=(--arch tiny-vit) RN=(--arch tiny-rn)
else
    # 60 steps at batch 64 (fewer at larger batches, the same images): many more batches than JPEG
    # workers, so their head start at warm-up counts little. 3 epochs per aspect, extrapolated to 70.
    DEVICE=cuda STEPS=60 EPOCHS=${HANDCLIP_BENCH_EPOCHS:-3} SPLITS=10 BATCHES=(64 256) REF_BATCH=20
    COMPILED_BATCHES=(64 256)
    DATA_FLAGS=()
    MODEL_FLAGS=() BENCHMARK_SETS=()
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
in_time() {  # an optional phase: run it only before the deadline
    if (( SECONDS < DEADLINE )); then return 0; fi
    echo "== [$((SECONDS))s] skipped (past ${DEADLINE}s): $*"
    return 1
}

phase "machine"
date -u +%Y-%m-%dT%H:%M:%SZ
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.version.cuda)"
echo "CPU cores: $(nproc)"
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))  # the JPEG loader's DataLoader workers

phase "synthesising the datasets at their real sizes"
"$PYTHON" benchmarks/gpu_data.py --out "$WORK/data" "${DATA_FLAGS[@]}"
phase "preparing the splits ($SPLITS per aspect)"
handclip prepare 11k --root "$WORK/data/11k" --num-splits "$SPLITS" > /dev/null
handclip prepare hd --root "$WORK/data/hd" --num-splits "$SPLITS" > /dev/null

bench() {  # name, config, batch, extra flags...
    local name=$1 config=$2 batch=$3
    shift 3
    local steps=$(( STEPS * 64 / batch > 15 ? STEPS * 64 / batch : 15 ))  # about as many images at every batch
    (( steps < STEPS )) || steps=$STEPS
    phase "bench $name (batch $batch, $steps steps)"
    handclip bench --config "configs/$config" --pretrained none --data "$WORK/data/11k" \
        --splits "$WORK/data/11k/splits" --aspect dorsal_r --device "$DEVICE" --steps "$steps" \
        --set "data.num_workers=$WORKERS" --batch-size "$batch" --out "$RESULTS/bench_${name}_b${batch}.json" \
        "${MODEL_FLAGS[@]}" "$@"
}
COMPILED=(--set train.compile=default)
bench vitb16_eager vitb16-ce-triplet.yaml "${BATCHES[0]}" "${VIT[@]}"
for batch in "${COMPILED_BATCHES[@]}"; do
    bench vitb16_compiled vitb16-ce-triplet.yaml "$batch" "${VIT[@]}" "${COMPILED[@]}"
done
bench vitb16_eager vitb16-ce-triplet.yaml "${BATCHES[1]}" "${VIT[@]}"
bench rn50_eager rn50-ce-triplet.yaml "${BATCHES[0]}" "${RN[@]}"

benchmark() {  # name (11k or hd), aspects
    local name=$1 aspects=$2
    phase "benchmark $aspects: $EPOCHS epochs, published protocol over $SPLITS splits"
    local data=(--data-11k "$WORK/data/11k")
    [[ $name == hd ]] && data=(--data-hd "$WORK/data/hd")
    handclip benchmark --config configs/vitb16-ce-triplet.yaml --set model.pretrained=none "${BENCHMARK_SETS[@]}" \
        --set "data.num_workers=$WORKERS" "${data[@]}" --aspects "$aspects" --epochs "$EPOCHS" --num-splits "$SPLITS" \
        --device "$DEVICE" --out "$WORK/benchmark_$name" --quiet
    # the numbers, not the checkpoints (hundreds of MB each)
    (cd "$WORK/benchmark_$name" && find . -name '*.json' -o -name '*.md' -o -name history.csv | grep -v '/checkpoints/' |
        while read -r file; do mkdir -p "$RESULTS/benchmark_$name/$(dirname "$file")"; cp "$file" "$RESULTS/benchmark_$name/$file"; done)
}
benchmark 11k dorsal_r,dorsal_l,palmar_r,palmar_l
in_time "bench ViT-B/16 at the reference batch" && bench vitb16_eager vitb16-ce-triplet.yaml "$REF_BATCH" "${VIT[@]}"
in_time "benchmark hd" && benchmark hd hd
in_time "compiled ViT-B/16 at the reference batch" &&
    bench vitb16_compiled vitb16-ce-triplet.yaml "$REF_BATCH" "${VIT[@]}" "${COMPILED[@]}"
[[ $DEVICE == cuda ]] && in_time "CUDA graphs at batch 256" &&
    bench vitb16_cudagraphs vitb16-ce-triplet.yaml 256 "${VIT[@]}" --set train.compile=reduce-overhead

phase "summary"
"$PYTHON" benchmarks/gpu_summary.py "$RESULTS" | tee "$RESULTS/summary.txt"
phase "done: $RESULTS"
