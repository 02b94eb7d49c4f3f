#!/usr/bin/env bash
# DeepSpeed's launcher with this project's defaults; every argument goes to it (script, then its flags).
#   bash launch/deepspeed.sh train_ds.py --deepspeed_config launch/ds_config.json
# NUM_GPUS: processes on this node (default: the CUDA GPU count, else 2 CPU processes over gloo).
# Multi-node: set HOSTFILE (DeepSpeed's "hostname slots=N" lines); NUM_GPUS is then read from it.
# MASTER_PORT: rendezvous port (DeepSpeed's default 29500 otherwise).
# TORCH_EXTENSIONS_DIR caches DeepSpeed's first-start C++ op build (default: .torch_extensions here).
set -euo pipefail
python=${PYTHON:-python3}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
else
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$("$python" -c "import torch; print(torch.cuda.device_count() or 2)")
  fi
  where=(--num_gpus "$NUM_GPUS")
fi
if [ -n "${MASTER_PORT:-}" ]; then
  where+=(--master_port "$MASTER_PORT")
fi
exec "$python" -m deepspeed.launcher.runner "${where[@]}" "$@"
