#!/usr/bin/env bash
# Multi-task training with accelerate and GradVac on this machine's CPU: 2 gloo processes
# (launch/accelerate_cpu.yaml; the script's Accelerator(cpu=True) selects gloo).
#   bash launch/accelerate_cpu.sh [examples/accelerate_train.py options, e.g. --steps 500]
# Environment: MASTER_PORT (default 29500), OMP_NUM_THREADS (default: the cores shared between the
# 2 processes), SCRIPT (default examples/accelerate_train.py), ACCELERATE_CONFIG (default
# launch/accelerate_cpu.yaml; launch/accelerate_fsdp2_cpu.sh sets its FSDP2 one).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # GRADVAC_DRY_RUN=1: print the commands instead
run bash launch/setup.sh
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / 2 > 0 ? cores / 2 : 1 ))}
if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then export GLOO_SOCKET_IFNAME=lo; fi
launch .venv/bin/accelerate launch --config_file "${ACCELERATE_CONFIG:-launch/accelerate_cpu.yaml}" \
  --main_process_port "${MASTER_PORT:-29500}" \
  "${SCRIPT:-examples/accelerate_train.py}" "$@"
