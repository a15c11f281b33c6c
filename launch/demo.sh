#!/usr/bin/env bash
# The main job: sets up .venv (once), then trains the summed losses, PCGrad and GradVac (3 seeds each)
# on 2 processes and writes runs/demo/{metrics.jsonl,summary.json,demo.png}. Options: bash launch/demo.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # GRADVAC_DRY_RUN=1: print the commands instead
run bash launch/setup.sh
launch .venv/bin/python -m examples.demo "$@"
