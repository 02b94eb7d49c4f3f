"""Recompute BatchNorm running statistics at x, the weights that will be evaluated.

During training the BN buffers average activations taken at y (the train weights); at x the
activations differ, so the stored statistics are stale. One pass of data at x fixes them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backends.fsdp import drop_gathered_copies
from .frameworks import train_mode, unwrap_optimizer


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], opt: Any) -> None:
    """Reset every BatchNorm's running stats and recompute them from ``batches`` at x.

    Statistics are the equal-weight average over batches (``momentum=None``), as
    ``torch.optim.swa_utils.update_bn`` does. A batch is a tensor, a tuple/list whose first
    item is the input, or a dict of keyword arguments. The optimizer (sf_dist's, the schedulefree
    package's, or one a framework wraps) and model modes, and each BN's momentum, are restored
    afterwards; under FSDP the forwards gather x, never a stale gathered copy. Models without
    BatchNorm are left untouched.

    >>> sf_dist.recalibrate_bn(model, (x for x, _ in train_loader), optimizer)
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    opt = unwrap_optimizer(opt)
    was_training = model.training
    was_train_mode = train_mode(opt)
    momenta = [bn.momentum for bn in bns]
    drop_gathered_copies(model)  # gathered before this call: possibly at y
    opt.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        seen = 0
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches: pass an iterable that yields at least one batch")
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
        drop_gathered_copies(model)  # gathered at x: the next training forward must gather y
        if was_train_mode:
            opt.train()
