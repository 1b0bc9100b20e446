#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package index (this workplace's H100/H200), into .whl/ (git-ignored),
# for bench/gpu_quick.sh to install there, each only where that machine's version is missing or older:
# transformers 5.24 (the image has 5.17; our rollout needs 5.24's `cache=` keyword) and the regex release it checks
# for at import, and TRL with what it needs beyond the image (datasets, dill, multiprocess). About 16 MB; pass the
# folder with the run (the device tool's carry: [".whl"]). Run on a machine that reaches PyPI:
#     bash bench/gpu_wheels.sh              # PY_VERSION=3.12 (the GPU image's Python) unless set
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 regex==2026.5.9 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
