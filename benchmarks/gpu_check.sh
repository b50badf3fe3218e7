#!/usr/bin/env bash
# The prepared GPU check for a fresh GPU machine with little time on it: one command, <= 8 min.
#   OUT=/some/folder bash benchmarks/gpu_check.sh          # full size on the first CUDA device
#   OUT=/tmp/gc bash benchmarks/gpu_check.sh --cpu-dry-run # the same parts on CPU at tiny sizes
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (benchmarks/gpu_check.py says what each figure
# is). Installs nothing but this project (pip install -e . when `import ditfuse` fails); the
# full-size random-weight folder (7.6 GB, bf16) is written under $WORK (default /tmp) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
WORK=${WORK:-${TMPDIR:-/tmp}/ditfuse-gpu-check}
python -c "import ditfuse" 2>/dev/null || pip install -q -e .
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
# 470 s: the 8-minute budget less the start-up above
exec timeout 470 python benchmarks/gpu_check.py --out "$OUT" --work "$WORK" "$@"
