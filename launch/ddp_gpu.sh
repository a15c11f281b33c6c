#!/usr/bin/env bash
# Multi-task DDP training with GradVac on every GPU of this machine: torchrun, one NCCL process per GPU.
#   bash launch/ddp_gpu.sh [examples/ddp_train.py options, e.g. --steps 500]
# Environment: NPROC (default: the GPUs nvidia-smi lists), MASTER_PORT (default 29500),
# SCRIPT (default examples/ddp_train.py). .venv needs a CUDA build of torch (the pinned CPU wheel
# has no NCCL): install one into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # GRADVAC_DRY_RUN=1: print the commands instead
run bash launch/setup.sh
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
if [ "$NPROC" -lt 1 ]; then echo "ddp_gpu.sh: no GPU found by nvidia-smi; use launch/ddp_cpu.sh" >&2; exit 1; fi
launch .venv/bin/torchrun --nnodes 1 --nproc_per_node "$NPROC" \
  --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  "${SCRIPT:-examples/ddp_train.py}" --backend nccl "$@"
