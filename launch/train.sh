#!/usr/bin/env bash
# README main command: set up .venv, then train a small GPT on the Python stdlib's sources with
# Schedule-Free AdamW on 2 processes (gloo on CPU, NCCL on GPUs), a few minutes on 2 CPU cores.
# Ends with runs/train_lm/{metrics.csv,loss.png,model_x.safetensors,sample.txt}.
# Extra arguments go to examples/train_lm.py (e.g. --backend fsdp2 --steps 2000; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHON=${SF_DIST_VENV:-.venv}/bin/python
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec bash launch/torchrun.sh examples/train_lm.py --out runs/train_lm "$@"
