#!/usr/bin/env bash
# Multi-task training with accelerate's FSDP2 and GradVac on this machine's CPU: 2 gloo processes
# (launch/accelerate_fsdp2_cpu.yaml; examples/accelerate_fsdp2.py lets accelerate shard on CPU).
#   bash launch/accelerate_fsdp2_cpu.sh [examples/accelerate_fsdp2.py options, e.g. --steps 500 --grad-accum 2]
# launch/accelerate_cpu.sh with this config and script; its environment variables apply.
set -euo pipefail
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate_fsdp2_cpu.yaml}
export SCRIPT=${SCRIPT:-examples/accelerate_fsdp2.py}
exec bash "$(dirname "$0")/accelerate_cpu.sh" "$@"
