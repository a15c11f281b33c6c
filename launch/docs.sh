#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html: the pages of docs/ and the API reference
# (docs/api.rst) from the docstrings, with Sphinx; any warning fails the build.
#   bash launch/docs.sh        # then open docs/_build/html/index.html
# Local only: no theme or inventory is downloaded (builtin alabaster theme, no intersphinx).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# -E: read every page afresh, so that a warning of an unchanged page is reported again
.venv/bin/sphinx-build -b html -E -W --keep-going -q -d docs/_build/doctrees docs docs/_build/html
echo "docs/_build/html/index.html"
