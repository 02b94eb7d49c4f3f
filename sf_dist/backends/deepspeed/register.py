"""``register()``: every ``deepspeed.initialize`` call takes a Schedule-Free optimizer entry in ds_config.

DeepSpeed has no optimizer registry: a config ``"optimizer": {"type": ...}`` must name one of its
built-ins, and HF Trainer and Accelerate hand the config to ``deepspeed.initialize`` themselves.
``register()`` replaces the module attribute ``deepspeed.initialize`` (Accelerate, which HF
Trainer goes through, reads it at call time) by a function that sends a call whose config names
a Schedule-Free optimizer (or whose ``optimizer=`` is one) through ``sf_dist.deepspeed.initialize``,
and every other call to DeepSpeed's own function, unchanged. Tested with deepspeed 0.19.8,
transformers 5.23.0 and accelerate 1.15.0.

>>> sf_dist.deepspeed.register()      # once, before the framework builds the engine
>>> engine, opt, _, _ = deepspeed.initialize(model=model, config={"optimizer": {"type": "AdamWScheduleFree", ...}, ...})
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

__all__ = ["register", "deepspeed_initialize"]

_ORIGINAL: list[Callable[..., tuple]] = []  # DeepSpeed's own initialize, once replaced
_SETTINGS = {"allow_scheduler": False}


def register(allow_scheduler: bool = False) -> None:
    """Make ``deepspeed.initialize`` accept ``"optimizer": {"type": "AdamWScheduleFree" | "SGDScheduleFree" |
    "RAdamScheduleFree", "params": {...}}`` (any case). Idempotent; the latest ``allow_scheduler`` holds.

    The engine's optimizer then has ``train()``, ``eval()`` and ``train_mode`` that reach the weights the
    model computes with. A ds_config ``scheduler`` entry beside a Schedule-Free optimizer is refused
    unless ``allow_scheduler=True``; an ``lr_scheduler=`` argument is let through, since frameworks
    always pass one (HF Trainer: its ``lr_scheduler_type``, which ScheduleFreeCallback checks).

    >>> sf_dist.deepspeed.register()
    """
    import deepspeed

    _SETTINGS["allow_scheduler"] = bool(allow_scheduler)
    if getattr(deepspeed.initialize, "sf_dist_hook", False):
        return
    original = deepspeed.initialize
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> tuple:
        from . import initialize as sf_initialize

        named = signature.bind(*args, **kwargs).arguments  # DeepSpeed's positional order, as keywords
        return sf_initialize(**named, allow_scheduler=_SETTINGS["allow_scheduler"], accept_lr_scheduler=True)

    initialize.sf_dist_hook = True  # type: ignore[attr-defined]
    _ORIGINAL.append(original)
    deepspeed.initialize = initialize


def deepspeed_initialize() -> Callable[..., tuple]:
    """DeepSpeed's own ``initialize``, whether or not :func:`register` replaced the module attribute."""
    if _ORIGINAL:
        return _ORIGINAL[0]
    import deepspeed

    return deepspeed.initialize
