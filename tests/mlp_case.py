"""Batches and the training loop shared by the FSDP and checkpoint tests (float64, full batch of 24).

Each rank trains on its contiguous slice of every batch, so W ranks averaging gradients equal one
process on the whole batch.
"""

import torch
from torch import nn

STEPS, BATCH = 8, 24


def batches(seed: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 6, generator=g, dtype=dtype), torch.randn(BATCH, 3, generator=g, dtype=dtype))
            for _ in range(STEPS)]


def run(model, opt, data, rank=0, world_size=1, clip=None) -> None:
    """Train mode, then one step per batch on this rank's slice (optionally clipping the global norm)."""
    opt.train()
    per = BATCH // world_size
    for x, t in data:
        opt.zero_grad()
        x, t = x[rank * per:(rank + 1) * per], t[rank * per:(rank + 1) * per]
        nn.functional.mse_loss(model(x), t).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
