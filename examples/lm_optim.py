"""Optimizers the LM examples compare: the sf_dist Schedule-Free family and torch AdamW baselines."""

from __future__ import annotations

import math
from typing import Iterable

import torch

import sf_dist

SCHEDULE_FREE = {"sf_adamw": sf_dist.AdamWScheduleFree, "sf_adamw_bf16": sf_dist.AdamWScheduleFree,
                 "sf_sgd": sf_dist.SGDScheduleFree, "sf_radam": sf_dist.RAdamScheduleFree}
BASELINES = ("adamw_cosine", "adamw_constant", "adamw_wsd")
OPTIMIZERS = tuple(SCHEDULE_FREE) + BASELINES
# step(loss=...) optimizers: examples/compare_schedules.py passes the loss (train_lm.py does not)
LOSS_STEPPED = {"sf_plus": sf_dist.AdamCScheduleFreePlus}


def sf_defaults(name: str, lr: float, warmup: int, weight_decay: float, beta2: float = 0.999) -> dict:
    """Keyword arguments for the Schedule-Free class ``name`` (RAdam has no warmup: it rectifies;
    SGD has no second moment)."""
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if name != "sf_radam":
        kwargs["warmup_steps"] = warmup
    if name != "sf_sgd":
        kwargs["betas"] = (0.9, beta2)
    if name == "sf_adamw_bf16":  # z and the second moment in bf16, stochastically rounded
        kwargs["state_dtype"] = torch.bfloat16
    return kwargs


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr multiplier: linear warmup to 1, then cosine decay to exactly 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_constant(step: int, warmup: int) -> float:
    """lr multiplier: linear warmup to 1, then constant."""
    return (step + 1) / warmup if step < warmup else 1.0


def warmup_stable_decay(step: int, warmup: int, total: int, cooldown: float = 0.2) -> float:
    """lr multiplier: linear warmup to 1, constant, then linear to 0 over the last ``cooldown`` of ``total``."""
    start = round(total * (1 - cooldown))
    if step < warmup:
        return (step + 1) / warmup
    if step < start:
        return 1.0
    return max(total - step, 0) / max(total - start, 1)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, warmup: int, steps: int,
                    weight_decay: float = 0.0, beta2: float = 0.999,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | None]:
    """(optimizer, scheduler); the scheduler is None for Schedule-Free, which needs none.
    ScheduleFree+ ("sf_plus") takes ``lr`` as its Polyak multiplier and ``warmup`` as c_warmup."""
    if name in SCHEDULE_FREE:
        return SCHEDULE_FREE[name](params, **sf_defaults(name, lr, warmup, weight_decay, beta2)), None
    if name in LOSS_STEPPED:
        return LOSS_STEPPED[name](params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, c_warmup=warmup), None
    if name not in BASELINES:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {OPTIMIZERS + tuple(LOSS_STEPPED)}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay)
    if name == "adamw_cosine":
        factor = lambda s: warmup_cosine(s, warmup, steps)  # noqa: E731
    elif name == "adamw_wsd":
        factor = lambda s: warmup_stable_decay(s, warmup, steps)  # noqa: E731
    else:
        factor = lambda s: warmup_constant(s, warmup)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
