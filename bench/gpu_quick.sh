#!/usr/bin/env bash
# The 15-minute GPU check (docs/PERFORMANCE.md, "The 15-minute GPU check"): at most 8 minutes on one H100 or H200,
# installs included, the most important numbers first. Everything goes under ${OUT:-bench/gpu_out}:
#   gpu_quick.jsonl  one JSON object per phase, appended as each phase ends (a cut-off run keeps what it measured)
#   gpu_quick.md     the tables for docs/PERFORMANCE.md, rewritten after every phase
#   gpu_quick.log    everything the phases printed
# A machine without our packages (transformers >= 5.24, TRL) and without a package index gets them from wheels
# carried in .whl/ (bash bench/gpu_wheels.sh makes them). bench/gpu.sh is the hour-long study.
#     bash bench/gpu_quick.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-bench/gpu_out}
BUDGET_S=${BUDGET_S:-480}                               # seconds for the whole script
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
echo "[gpu_quick] $(date -u +%FT%TZ) $(command -v "$PY") in $(pwd); results in $OUT" | tee -a "$OUT/gpu_quick.log"
CHECK="import torch; print('torch', torch.__version__, 'CUDA available:', torch.cuda.is_available())"
if ! timeout 120 "$PY" -c "$CHECK" 2>&1 | tee -a "$OUT/gpu_quick.log"; then
    nvidia-smi 2>&1 | tee -a "$OUT/gpu_quick.log"
    echo '{"phase": "setup", "status": "failed", "reason": "'"$PY"' cannot import torch: nothing can be measured"}' \
        >> "$OUT/gpu_quick.jsonl"
    exit 1
fi
LEFT=$((BUDGET_S - $(date +%s) + START - 10))           # 10 s for the closing table
# the driver keeps to --budget_s; the outer timeout only guards against the driver itself hanging
timeout -k 10 $((LEFT + 30)) "$PY" bench/gpu_quick.py --out "$OUT" --budget_s "$LEFT" "$@"
