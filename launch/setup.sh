#!/usr/bin/env bash
# Creates a virtual environment (if missing) with everything tests, demo and benchmarks need; idempotent.
#   bash launch/setup.sh                  # ./.venv: requirements-dev.txt as pinned (torch 2.13.0, CPU build)
#   bash launch/setup.sh --torch 2.14.1   # ./.venv-torch-2.14.1: the same pins, but that torch release
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.venv reqs=requirements-dev.txt
if [ "${1:-}" = --torch ]; then
  torch=${2:-}
  if [[ ! $torch =~ ^[0-9]+\.[0-9]+[0-9A-Za-z.+]*$ ]]; then echo "--torch needs a torch release, e.g. --torch 2.6.0; got '$torch'" >&2; exit 2; fi
  venv=.venv-torch-$torch reqs=.venv-torch-$torch/requirements.txt
fi
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
stamp=$venv/.gradvac_dist_installed
if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ "$reqs" != requirements-dev.txt ]; then sed "s/^torch==.*/torch==$torch/" requirements-dev.txt >"$reqs"; fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
