"""One non-finite decision per DeepSpeed engine step, whatever DeepSpeed's per-group calls.

ZeRO-1/2 steps the client optimizer once per param group. With bf16 ``check_grad_overflow: false``
or ``zero_optimization.compute_grad_norm: false`` DeepSpeed checks nothing first, so a NaN in one
group's gradient would make the optimizer skip that group and step the others, and the groups'
``k`` would drift apart. For an optimizer that skips (or raises) on non-finite gradients,
DeepSpeed's own all-group overflow check is switched on for the step where nothing else would
catch a NaN: one agreement over every group and rank, then DeepSpeed skips the whole step and
counts it in ``engine.skipped_steps``. (fp32/fp16 with the gradient norm on already skip on a
non-finite norm, as do ZeRO-3 and DeepSpeed's BF16 optimizer: they need nothing here.)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...optim import ScheduleFreeOptimizer

__all__ = ["step_with_one_decision"]


def step_with_one_decision(engine_optimizer: Any, base: ScheduleFreeOptimizer, step: Callable[[], Any]) -> Any:
    """Run DeepSpeed's ZeRO-1/2 ``step`` with its all-group overflow check on where it would
    otherwise miss a NaN (unless ``base`` ignores non-finite gradients); with
    ``base.nonfinite == "error"`` raise after a step DeepSpeed skipped (fp16's loss-scale
    overflows excepted: they are routine)."""
    configured = engine_optimizer.check_grad_overflow
    bf16 = engine_optimizer.dtype == torch.bfloat16
    norm_catches = engine_optimizer.compute_grad_norm and not bf16
    engine_optimizer.check_grad_overflow = configured or (base.nonfinite != "ignore" and not norm_catches)
    try:
        result = step()
    finally:
        engine_optimizer.check_grad_overflow = configured
    if engine_optimizer.overflow and base.nonfinite == "error" and engine_optimizer.dtype != torch.float16:
        raise RuntimeError(f"non-finite gradient at step {base.param_groups[0]['k']} on some rank "
                           "(nonfinite='error'); DeepSpeed discarded the step on every rank")
    return result
