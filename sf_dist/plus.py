"""AdamCScheduleFreePlus ("ScheduleFree+", Defazio 2026): AdamC + Schedule-Free + a Polyak step size.

Memory-efficient: the params hold y, the state z and Adam's two moments; x is derived. The step
size comes from the loss: lr_k = max(lr, eps) * max(0, f + ip) / e_hat, where f is the loss
averaged over the data-parallel ranks, ip = b_k * <g, z - x> and e_hat the bias-corrected EMA of
sqrt(pi/2) * ||g||_1. The two sums and the loss travel in ONE all-reduce (with the mode and
finiteness flags); every per-step scalar stays a tensor on the params' device, so the step
itself never waits for the host.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import guard
from .distributed import comm_device, replicas
from .optim import ParamsT, ScheduleFreeOptimizer, local
from .schedule import annealed_sf_beta1

__all__ = ["AdamCScheduleFreePlus"]

LossT = Union[Tensor, float]


class AdamCScheduleFreePlus(ScheduleFreeOptimizer):
    """ScheduleFree+: pass the (rank-local) loss of the batch the gradients came from.

    With ``polyak_beta > 0`` the raw EMA of the gradient L1 norm is kept and its bias-corrected
    value used, as the reference's docstring says (the reference's code writes the corrected value
    back as the running average, so the correction compounds; docs/variants.md shows both).

    >>> opt = sf_dist.AdamCScheduleFreePlus(model.parameters(), lr=1.0, weight_decay=20, c_warmup=100)
    >>> opt.train()
    >>> loss = loss_fn(model(x), t); loss.backward(); opt.step(loss=loss); opt.zero_grad()
    """

    moment_keys = ("exp_avg_sq", "exp_avg")
    counters = ScheduleFreeOptimizer.counters + ("grad_l1_ema", "polyak_lr", "sf_beta1_prev")
    takes_loss = True

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.95),
                 sf_beta1: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0, r: float = 0.0,
                 polyak_beta: float = 0.0, c_warmup: int = 0, sf_beta1_anneal_steps: int = 0,
                 sf_beta1_max: float = 0.965, weight_lr_power: float = 2.0, *, nonfinite: str = "skip") -> None:
        for name, value in (("sf_beta1", sf_beta1), ("sf_beta1_max", sf_beta1_max)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"Invalid {name}: {value} (must be in (0, 1); x = (y - (1-b)*z)/b needs b > 0)")
        if not 0.0 <= polyak_beta < 1.0:
            raise ValueError(f"Invalid polyak_beta: {polyak_beta} (must be in [0, 1); 0: no averaging)")
        for name, value in (("c_warmup", c_warmup), ("sf_beta1_anneal_steps", sf_beta1_anneal_steps)):
            if not (value >= 0 and int(value) == value):
                raise ValueError(f"Invalid {name}: {value} (must be a whole number of steps >= 0)")
        super().__init__(params, dict(lr=lr, betas=betas, sf_beta1=sf_beta1, eps=eps, weight_decay=weight_decay,
                                      r=r, polyak_beta=polyak_beta, c_warmup=c_warmup,
                                      sf_beta1_anneal_steps=sf_beta1_anneal_steps, sf_beta1_max=sf_beta1_max,
                                      weight_lr_power=weight_lr_power, decay_at="y", foreach=None, fused=None),
                         nonfinite)
        for group in self.param_groups:
            group.update(lr_max=float(group["eps"]), grad_l1_ema=0.0, polyak_lr=0.0, sf_beta1_prev=sf_beta1)
        self._loss: Optional[LossT] = None

    def interpolation(self, group: dict[str, Any]) -> float:
        """b of the y the params hold: the sf_beta1 of the last step (it may be annealed)."""
        return group["sf_beta1_prev"]

    def set_loss(self, loss: LossT) -> None:
        """Give the loss for the next step() that is called without one (DeepSpeed's engine.step())."""
        self._loss = loss

    # ---- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], LossT]] = None, *, loss: Optional[LossT] = None
             ) -> Optional[LossT]:
        """One ScheduleFree+ step at the loss ``loss`` (or the closure's, or set_loss()'s).

        Raises in eval mode; non-finite gradients (or loss) on any rank skip the step everywhere
        (``nonfinite="skip"``) or raise (``"error"``), agreed within the same all-reduce.
        """
        if closure is not None and self.train_mode:
            with torch.enable_grad():
                loss = closure()
        loss = self._loss if loss is None else loss
        self._loss = None
        if loss is None:
            raise ValueError("AdamCScheduleFreePlus.step needs the loss of the batch: opt.step(loss=loss), "
                             "step(closure) with a closure returning it, or opt.set_loss(loss) before step()")
        if self.nonfinite == "ignore" and not self.train_mode:
            raise RuntimeError(guard.EVAL_MODE_MESSAGE)
        g0 = self.param_groups[0]
        k = g0["k"]
        b = annealed_sf_beta1(k, g0["sf_beta1"], g0["sf_beta1_max"], g0["sf_beta1_anneal_steps"])
        active = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        device = _scalar_device(active, loss)
        total = self._reduce(active, loss, b, device)
        if self.nonfinite != "ignore" and self._refuse_or_skip(total):
            return loss
        pb = g0["polyak_beta"]
        ema = pb * _tensor(g0["grad_l1_ema"], device) + (1 - pb) * math.sqrt(math.pi / 2) * total[0]
        ema_hat = ema / (1 - pb ** (k + 1))
        polyak = torch.where(ema_hat > 0, (total[2] + total[1]).clamp(min=0) / ema_hat, torch.zeros_like(ema_hat))
        for group, params in zip(self.param_groups, active):
            group.update(grad_l1_ema=ema, polyak_lr=polyak)
            group_lr = max(group["lr"], group["eps"]) * polyak
            lr_max = group["lr_max"] = torch.maximum(group_lr, _tensor(group["lr_max"], device))
            if group["k"] < group["c_warmup"]:
                ckp1: Union[Tensor, float] = 1.0  # x follows z during c_warmup
            else:
                weight = (group["k"] + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
                weight_sum = group["weight_sum"] = _tensor(group["weight_sum"], device) + weight
                ckp1 = weight / weight_sum
            group["scheduled_lr"] = group_lr
            self._update(group, params, group_lr, ckp1, b)
            group["k"] += 1
            group["sf_beta1_prev"] = b
        return loss

    def _reduce(self, active: list[list[Tensor]], loss: LossT, b: float, device: torch.device) -> Tensor:
        """[||g||_1, b*<g, z - x>, mean loss, ranks in eval mode, ranks with a non-finite loss/grad]
        over the process group, in float64, from one all-reduce (no collective on one process)."""
        pg = self.process_group
        world = dist.get_world_size(pg) if dist.is_available() and dist.is_initialized() else 1
        l1 = torch.zeros((), dtype=torch.float64, device=device)
        ip = torch.zeros((), dtype=torch.float64, device=device)
        for group, params in zip(self.param_groups, active):
            b_prev = group["sf_beta1_prev"]
            for p in params:
                state = self._state_for(p, group)
                y, g, z = local(p), local(p.grad), local(state["z"])
                if g.numel() == 0:
                    continue
                n = replicas(p, pg, self.params_are_shards)
                l1 += g.abs().sum(dtype=torch.float64).to(device) / n
                # z - x = (z - y)/b_prev, since y = b_prev*x + (1-b_prev)*z
                ip += (g.double() * (z.double() - y.double())).sum().to(device) * (b / (b_prev * n))
        f = torch.as_tensor(loss, dtype=torch.float64).detach().to(device).reshape(())
        total = torch.stack([l1, ip, f / world, torch.zeros_like(f) + float(not self.train_mode),
                             (~torch.isfinite(l1 + ip + f)).double()])
        if world > 1:
            total = total.to(comm_device(pg))
            dist.all_reduce(total, group=pg)
            total = total.to(device)
        return total

    def _refuse_or_skip(self, total: Tensor) -> bool:
        """Raise if some rank is in eval mode; True (skip) for a non-finite loss or gradient."""
        _, _, _, any_eval, any_bad = total.tolist()  # the one host read of the step (nonfinite != "ignore")
        if any_eval:
            raise RuntimeError(guard.EVAL_MODE_MESSAGE if not self.train_mode else
                               "step() refused: another rank is in eval mode while this one trains. "
                               "Every rank must call optimizer.train() before stepping.")
        if not any_bad:
            return False
        if self.nonfinite == "error":
            raise RuntimeError(f"non-finite gradient or loss at step {self.param_groups[0]['k']} on some rank "
                               "(nonfinite='error'); nonfinite='skip' would skip the step")
        self._skipped_host += 1
        return True

    def _update(self, group: dict[str, Any], params: list[Tensor], lr: Tensor, ckp1: Union[Tensor, float],
                b: float) -> None:
        """z <- z - lr^2*wd*y - lr*mhat/(sqrt(vhat)+eps);  x <- lerp(x, z, ckp1);  y <- b*x + (1-b)*z,
        on (y, z) alone: x = (y - (1-b_prev)*z)/b_prev stays implicit."""
        beta1, beta2 = group["betas"]
        k, eps, b_prev = group["k"], group["eps"], group["sf_beta1_prev"]
        bc1, bc2 = 1 - beta1 ** (k + 1), 1 - beta2 ** (k + 1)
        decay = lr * lr * group["weight_decay"]
        # y_new = a*(y - (1-b_prev)*z_old) + (1 - b*(1-ckp1))*z_new with a = b*(1-ckp1)/b_prev, written
        # over z_new (z_old = z_new + decay*y + lr*step) so that z can be updated in place first
        a = _tensor(b * (1 - ckp1) / b_prev, lr.device)
        y_coef = a * (1 - (1 - b_prev) * decay)
        z_coef = 1 - b * (1 - ckp1) - a * (1 - b_prev)
        step_coef = -a * (1 - b_prev) * lr
        for p in params:
            y, g = local(p), local(p.grad)
            if y.numel() == 0:
                continue
            state = self.state[p]
            z, v, m = local(state["z"]), local(state["exp_avg_sq"]), local(state["exp_avg"])
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            step = m.div(bc1).div_(v.div(bc2).sqrt_().add_(eps))
            z.addcmul_(y, -decay).addcmul_(step, -lr)
            y.mul_(y_coef).addcmul_(z, z_coef).addcmul_(step, step_coef)


def _tensor(value: Union[Tensor, float], device: torch.device) -> Tensor:
    """A float64 0-dim tensor on ``device`` (group scalars start as floats, then stay tensors)."""
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def _scalar_device(active: list[list[Tensor]], loss: LossT) -> torch.device:
    """Where the step's scalars live: the params' device (the loss's, for a rank with no params)."""
    for params in active:
        for p in params:
            return local(p).device
    return loss.device if isinstance(loss, Tensor) else torch.device("cpu")
