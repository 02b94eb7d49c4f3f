#!/usr/bin/env bash
# torchrun with this project's defaults; every argument goes to torchrun (script, then its flags).
#   bash launch/torchrun.sh examples/train_lm.py --backend fsdp2
# NPROC_PER_NODE: processes on this node (default: the GPU count, else 2).
# Multi-node: set RDZV_ENDPOINT=host:port (and NNODES, RDZV_ID) on every node; otherwise standalone.
set -euo pipefail
python=${PYTHON:-python3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$python" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  rdzv=(--nnodes "${NNODES:?set NNODES (the number of nodes) with RDZV_ENDPOINT}"
        --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-sf_dist}")
else
  rdzv=(--standalone)
fi
exec "$python" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC_PER_NODE" "$@"
