#!/usr/bin/env bash
# Multi-task DDP training with GradVac on this machine's CPU: torchrun, 2 gloo processes.
#   bash launch/ddp_cpu.sh [examples/ddp_train.py options, e.g. --steps 500 --strategy sharded]
# Environment: NPROC (processes, default 2), MASTER_PORT (default 29500), OMP_NUM_THREADS (default:
# the cores shared between the processes), SCRIPT (default examples/ddp_train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # GRADVAC_DRY_RUN=1: print the commands instead
run bash launch/setup.sh
NPROC=${NPROC:-2}
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
# gloo on the loopback interface: no traffic leaves this machine.
if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then export GLOO_SOCKET_IFNAME=lo; fi
launch .venv/bin/torchrun --nnodes 1 --nproc_per_node "$NPROC" \
  --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  "${SCRIPT:-examples/ddp_train.py}" --backend gloo "$@"
