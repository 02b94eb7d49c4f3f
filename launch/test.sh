#!/usr/bin/env bash
# README test command: set up the environment, then run the whole test suite.
# Extra arguments go to pytest (e.g. `-n auto`, `-k zero`, `tests/test_core.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec "${SF_DIST_VENV:-.venv}/bin/python" -m pytest -q "$@"
