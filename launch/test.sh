#!/usr/bin/env bash
# The whole test suite: lint, every test in float64, the single-process tests again in float32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check .
.venv/bin/python -m pytest -n 2 -q tests "$@"
GRADVAC_TEST_DTYPE=float32 .venv/bin/python -m pytest -n 2 -q tests/unit "$@"
