#!/usr/bin/env bash
# Create .venv and install sf_dist with its test, DeepSpeed, example and integration (hf, lightning) extras. Idempotent: a
# second run with an unchanged pyproject.toml returns at once.
# TORCH_SPEC picks the torch build (default: the CPU wheel this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SF_DIST_VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp="$venv/.sf_dist_setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first: an open range with no torch installed would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q "$torch_spec"
"$venv/bin/python" -m pip install -q -e ".[test,deepspeed,examples,hf,lightning]"
echo "$want" > "$stamp"
