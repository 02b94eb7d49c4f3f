"""The optimizers frameworks hand out, made usable by every sf_dist helper.

HF Trainer, Accelerate and Lightning wrap the optimizer (``AcceleratedOptimizer``,
``DeepSpeedOptimizerWrapper``, ``LightningOptimizer``), and DeepSpeed wraps it again in its engine
optimizer. :func:`unwrap_optimizer` finds the object whose ``train()``/``eval()``/``train_mode`` reach
the model's weights; :func:`bind` makes a bare ``opt.eval()``/``opt.train()`` reach them under FSDP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .backends.deepspeed import attach, is_deepspeed
from .backends.fsdp import drop_gathered_copies
from .optim import ScheduleFreeOptimizer

__all__ = ["unwrap_optimizer", "bind", "train_mode"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The Schedule-Free optimizer inside framework wrappers: following ``.optimizer`` down to sf_dist's
    optimizer (or one with ``train_mode``), a DeepSpeed engine optimizer on the way being given sf_dist's
    ``train()``/``eval()`` through ``attach`` and returned; a TypeError naming the chain otherwise.

    >>> sf_opt = unwrap_optimizer(trainer.optimizer)   # AcceleratedOptimizer, DeepSpeedOptimizerWrapper, ...
    """
    current, chain = optimizer, []
    while True:
        inner = getattr(current, "optimizer", None)
        if is_deepspeed(current) and isinstance(inner, ScheduleFreeOptimizer):
            return attach(current)
        chain.append(type(current).__name__)
        if inner is None or inner is current:
            if hasattr(type(current), "train_mode") or _schedule_free_groups(current):
                return current
            raise TypeError(f"{' -> '.join(chain)} holds no Schedule-Free optimizer: build the optimizer with "
                            "sf_dist (sf_dist.AdamWScheduleFree, ...) or name it in ds_config after "
                            "sf_dist.deepspeed.register()")
        if len(chain) > 8:
            raise TypeError(f"{' -> '.join(chain)}: optimizer wrappers nested too deep to unwrap")
        current = inner


def _schedule_free_groups(optimizer: Any) -> bool:
    """Another Schedule-Free implementation (the schedulefree package): train()/eval() and a mode per group."""
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and callable(getattr(optimizer, "eval", None)) and all("train_mode" in g for g in groups)


def train_mode(optimizer: Any) -> bool:
    """Whether an (unwrapped) Schedule-Free optimizer holds y: its ``train_mode``, else every group's flag."""
    mode = getattr(type(optimizer), "train_mode", None)
    if mode is not None:
        return bool(optimizer.train_mode)
    return all(group["train_mode"] for group in optimizer.param_groups)


def bind(model: nn.Module, optimizer: Any) -> Any:
    """Tie ``optimizer`` to ``model`` so a bare ``optimizer.eval()``/``train()`` reaches the weights its
    next forward uses, also where FSDP2/FSDP1 keep gathered copies (the root unit's, tied weights).
    Returns the unwrapped optimizer; idempotent. The framework integrations call it for you.

    >>> opt = sf_dist.bind(model, opt)   # then opt.eval(); evaluate(model); opt.train()
    """
    sf_opt = unwrap_optimizer(optimizer)
    if is_deepspeed(model) or not isinstance(sf_opt, ScheduleFreeOptimizer):
        return sf_opt  # DeepSpeed's attach() refreshes the engine's weights itself
    hooks = sf_opt.__dict__.setdefault("swap_hooks", [])
    if not any(getattr(hook, "model", None) is model for hook in hooks):
        hooks.append(_DropGathered(model))
    return sf_opt


class _DropGathered:
    """Before a y <-> x swap: free FSDP's gathered weights, so the next forward gathers the swapped shards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> None:
        drop_gathered_copies(self.model)
