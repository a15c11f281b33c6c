#!/usr/bin/env bash
# The whole test suite: lint, every test in float64, the single-process tests again in float32, and
# (on the pinned torch) the documentation build, warnings as errors (launch/docs.sh).
#   bash launch/test.sh [pytest args]                  # CI: the whole suite on the pinned torch (./.venv),
#                                                      # then tests/distributed again on torch 2.14.1
#   bash launch/test.sh --torch 2.6.0 [pytest args]    # the whole suite on that torch (./.venv-torch-2.6.0)
# launch/setup.sh makes each virtual environment once (torch 2.14.1 is a CUDA build that also runs on
# CPU, about 6 GB installed; releases not on local disk come from the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
suite() {  # suite VENV [pytest args]: every step runs; fails if any step failed
  local venv=$1 rc=0; shift
  "$venv/bin/ruff" check . || rc=1
  "$venv/bin/python" -m pytest -n 2 -q tests "$@" || rc=1
  GRADVAC_TEST_DTYPE=float32 "$venv/bin/python" -m pytest -n 2 -q tests/unit "$@" || rc=1
  if [ "$venv" = .venv ]; then bash launch/docs.sh || rc=1; fi  # the pinned environment's Sphinx, about 5 s
  return $rc
}
if [ "${1:-}" = --torch ]; then
  torch=${2:-}
  shift $(( $# < 2 ? $# : 2 ))
  bash launch/setup.sh --torch "$torch"
  suite ".venv-torch-$torch" "$@"
  exit
fi
bash launch/setup.sh
suite .venv "$@"
bash launch/setup.sh --torch 2.14.1
.venv-torch-2.14.1/bin/python -m pytest -n 2 -q tests/distributed "$@"
