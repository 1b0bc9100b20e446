#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md in one command, on one H100 (random weights: nothing is downloaded):
#     bash bench/gpu.sh 2>&1 | tee gpu_bench.log
# 1. the physical floor of the reference workload; 2. ours vs TRL's GRPOTrainer on it (one process each);
# 3. every lever as an A/B (bench/levers.py --gpu). Expect about an hour, most of it TRL and the lever runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet trl                       # a benchmark-only dependency
WORKLOAD="--config qwen2.5-1.5b --prompts 64 --num_generations 8 --prompt_tokens 1024 --completion_tokens 512"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python bench/bench_grpo.py $WORKLOAD --floor_only
python bench/bench_grpo.py $WORKLOAD --steps 2 --warmup 1 --vs trl
python bench/levers.py --gpu --repeats 1
