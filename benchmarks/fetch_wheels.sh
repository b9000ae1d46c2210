#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu.sh installs on a GPU machine whose python3 has torch and
# torchvision but not handclip's other dependencies, and no network. Run where pip reaches PyPI;
# the wheels land in .whl/ (git-ignored), which travels with the working tree to the GPU machine.
#
#   bash benchmarks/fetch_wheels.sh            # for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
# open_clip_torch needs ftfy (→ wcwidth) and timm >= 1.0.17; the rest it needs (regex, tqdm,
# huggingface_hub, safetensors) and pytorch-metric-learning's scikit-learn come with a usual torch image.
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl open_clip_torch==3.3.0 pytorch-metric-learning==2.9.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
