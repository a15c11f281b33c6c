#!/usr/bin/env bash
# The GPU check in one go (benchmarks/gpu_check.py): tests/gpu, the DDP and FSDP2 benchmarks on NCCL
# against plain and m-pass training, one markdown table. About 5 minutes on one GPU, 8 at most.
#   bash launch/gpu_check.sh [--out FILE] [--world N]     # default runs/gpu_check.md, 1 GPU
# Runs on the python3 that holds a CUDA torch (PYTHON=... to choose another); downloads nothing.
# Wheels that machine lacks can travel in .whl/ (WHEELS=DIR): installed first into a private folder,
# with no package index. GRADVAC_DRY_RUN=1: print the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
PYTHON=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gradvac_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/gradvac_site${PYTHONPATH:+:$PYTHONPATH}
fi
launch timeout --kill-after=10 480 "$PYTHON" -m benchmarks gpu-check "$@"
