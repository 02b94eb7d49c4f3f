"""What every rank must agree on before a step: the mode (train) and whether gradients are finite.

Both facts travel in one small all-reduce, so a rank in eval mode or with a NaN gradient makes
every rank raise or skip together instead of one rank raising while the others hang.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .distributed import comm_device, multi_rank

NONFINITE = ("skip", "error", "ignore")

EVAL_MODE_MESSAGE = ("step() called in eval mode: the params hold x, not y. Call optimizer.train() "
                     "before training steps (and optimizer.eval() before evaluating or saving).")


def first_nonfinite(grads: list[Tensor]) -> Optional[int]:
    """Index of the first gradient holding a NaN or Inf, None if all are finite (one pass over them)."""
    if grads and all(g.device.type == "cpu" and g.is_contiguous() for g in grads) and kernels.cpu_kernel_error() is None:
        index = torch.ops.sf_dist.first_nonfinite(grads)  # 10x faster than an inf-norm on the CPU
        return None if index < 0 else index
    nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]  # the inf-norm of nothing is undefined
    if not nonempty:
        return None
    norms = torch._foreach_norm([grads[i] for i in nonempty], float("inf"))
    finite = torch.stack([n.float() for n in norms]).isfinite()
    if bool(finite.all()):
        return None
    return nonempty[int((~finite).nonzero()[0])]


def agree(*facts: bool, group: Optional[dist.ProcessGroup] = None) -> tuple[bool, ...]:
    """Whether any rank of ``group`` holds each fact (e.g. a non-finite gradient, eval mode, no
    fused kernel), in one small all-reduce.

    Without an initialised process group of more than one rank, the local facts are returned.
    ``group`` None means every rank: an optimizer stepped on some ranks only must be given the
    group of those ranks (``opt.process_group``) or use ``nonfinite="ignore"``.
    """
    if not multi_rank(group):
        return facts
    flags = torch.tensor([float(f) for f in facts], device=comm_device(group))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(f) for f in flags.tolist())


def nonfinite_flag(grads: list[Tensor], device: torch.device) -> Tensor:
    """A 0-dim bool tensor on ``device``, True if any gradient holds a NaN or Inf: one multi-tensor
    pass, never read on the host (the sync-free path's counterpart of ``first_nonfinite``)."""
    nonempty = [g for g in grads if g.numel() > 0]  # the inf-norm of nothing is undefined
    if not nonempty:
        return torch.zeros((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(nonempty, float("inf"))
    return ~torch.stack([n.to(device, torch.float32) for n in norms]).isfinite().all()


def agree_on_device(bad: Tensor, eval_mode: bool, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """0-dim bool on ``bad``'s device: True when no rank of ``group`` has a non-finite gradient or is
    in eval mode, so every rank steps. The all-reduce result stays on the device (no sync); its
    layout is ``agree``'s (non-finite, eval mode, no CPU kernel: always 0 here), so a rank on the host
    path (no gradients here) meets the others in it."""
    if not multi_rank(group):
        return ~bad
    device = comm_device(group)
    flags = torch.stack([bad.to(device, torch.float32), torch.full((), float(eval_mode), device=device),
                         torch.zeros((), device=device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return (flags[:2].amax() == 0).to(bad.device)
