"""Per-step scalars of Schedule-Free: they depend only on the step count and the lr schedule.

Every rank computes them identically from its group dict, which is why sharded steps need no
communication beyond the gradients. The counters are host numbers on the CPU path; on the
sync-free accelerator path they are float64 0-dim tensors on the device, and the same functions
compute the scalars there without reading anything back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

DECAY_AT = ("y", "z", "all")

Scalar = Union[float, Tensor]  # a host float, or a float64 0-dim tensor on the device (sync-free path)


@dataclass(frozen=True)
class StepScalars:
    """Everything a kernel needs for one step of one param group."""

    lr: Scalar  # scheduled lr of this step
    ckp1: Scalar  # weight of z in the new average x
    y_coef: Scalar  # coefficient of the normalised gradient in the y update: lr*(b1*(1-ckp1)-1)
    weight_decay: float
    decay_at: str  # "y" | "z" | "all"
    beta2: Optional[float] = None  # None: no second moment (SGD)
    bias_correction2: Scalar = 1.0
    eps: float = 0.0
    normalize: Union[bool, Tensor] = False  # divide by sqrt(v/bc2)+eps (Adam) or take the raw gradient
    inner_momentum: float = 0.0  # m = mu*m + (1-mu)*g replaces g in the numerator (AdamW's option)
    bias_correction1: Scalar = 1.0  # 1 - mu**(k+1) when inner_momentum > 0

    @property
    def one_minus_beta2(self) -> float:
        """1 - beta2 in float64: float32(1) - float32(0.999) is off by a relative 1.3e-5."""
        return 1.0 - self.beta2 if self.beta2 is not None else 0.0

    @property
    def inv_bias_correction2(self) -> Scalar:
        """1 / (1 - beta2**(k+1)) in float64, so kernels multiply by a value rounded once."""
        return 1.0 / self.bias_correction2

    @property
    def one_minus_inner_momentum(self) -> float:
        """1 - mu in float64, for the same reason as one_minus_beta2."""
        return 1.0 - self.inner_momentum

    @property
    def inv_bias_correction1(self) -> Scalar:
        """1 / (1 - mu**(k+1)) in float64 (1.0 without inner momentum)."""
        return 1.0 / self.bias_correction1

    @property
    def shrink(self) -> Scalar:
        """Multiplicative decay of y and z for decay_at="all" (1.0 otherwise)."""
        return 1.0 - self.lr * self.weight_decay if self.decay_at == "all" else 1.0


def warmup_factor(k: Scalar, warmup_steps: int) -> Scalar:
    """Linear warmup multiplier for 0-based step ``k``."""
    if isinstance(k, Tensor):
        return ((k + 1) / warmup_steps).clamp(max=1.0) if warmup_steps > 0 else torch.ones_like(k)
    return (k + 1) / warmup_steps if k < warmup_steps else 1.0


def radam_rectification(k: Scalar, beta2: float, silent_sgd_phase: bool) -> tuple[Scalar, Union[bool, Tensor]]:
    """RAdam's lr multiplier for 0-based step ``k`` and whether the Adam normalisation is on."""
    step = k + 1
    beta2_t = beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t)
    if isinstance(rho_t, Tensor):
        adam = rho_t > 4.0
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = torch.where(adam, ratio.clamp(min=0.0).sqrt(), float(not silent_sgd_phase))
        return rect, adam
    if rho_t > 4.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return rect, True
    return float(not silent_sgd_phase), False


def advance_average(group: dict[str, Any], lr: Scalar) -> Scalar:
    """Record this step's lr in the group's counters and return ckp1, the new weight of z in x."""
    group["scheduled_lr"] = lr
    if isinstance(group["k"], Tensor):
        lr_max = group["lr_max"] = torch.maximum(lr, group["lr_max"])
    else:
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((group["k"] + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    if isinstance(weight_sum, Tensor):
        return torch.where(weight_sum != 0, weight / weight_sum, 0.0)
    return weight / weight_sum if weight_sum != 0 else 0.0


def annealed_sf_beta1(k: int, start: float, end: float, steps: int) -> float:
    """ScheduleFree+'s interpolation b at 0-based step ``k``: 1-b moves geometrically from 1-start
    to 1-end over ``steps`` (0: no annealing), so the averaging window grows smoothly."""
    if steps <= 0:
        return start
    t = min(k / steps, 1.0)
    return 1 - math.exp(math.log(1 - start) * (1 - t) + math.log(1 - end) * t)
