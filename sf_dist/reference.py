"""The plain, slow oracle: x, y and z stored explicitly, one tensor at a time.

It mirrors the paper's three sequences rather than the memory-efficient y/z form of the fast
optimizers, so agreement between the two checks the algebra (swaps, decay modes) as well as the
code. Scalars come from ``sf_dist.schedule``, itself checked against the schedulefree package.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .schedule import advance_average, annealed_sf_beta1, radam_rectification, warmup_factor

KINDS = ("adamw", "sgd", "radam")


class _ExplicitXYZ(torch.optim.Optimizer):
    """An oracle that stores x, y and z in state: train()/eval() copy y or x into the params."""

    @torch.no_grad()
    def train(self) -> None:
        self._load("y", True)

    @torch.no_grad()
    def eval(self) -> None:
        self._load("x", False)

    def _load(self, key: str, train_mode: bool) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    p.copy_(state[key])
            group["train_mode"] = train_mode

    def _state_of(self, p: torch.Tensor) -> dict:
        """``p``'s state, created at its first step: x = y = z = p, zero moments."""
        state = self.state[p]
        if not state:
            state.update(x=p.clone(), y=p.clone(), z=p.clone(), v=torch.zeros_like(p), m=torch.zeros_like(p))
        return state


class ReferenceScheduleFree(_ExplicitXYZ):
    """Explicit-x/y/z Schedule-Free; ``kind`` is "adamw", "sgd" or "radam".

    >>> opt = ReferenceScheduleFree(params, kind="adamw", lr=1e-3, weight_decay=0.1, decay_at="all")
    """

    def __init__(self, params: Any, kind: str = "adamw", lr: float = 0.0025, b1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, silent_sgd_phase: bool = True,
                 decay_at: str = "y", inner_momentum: float = 0.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"Invalid kind {kind!r}: expected one of {KINDS}")
        defaults = dict(kind=kind, lr=lr, b1=b1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                        silent_sgd_phase=silent_sgd_phase, decay_at=decay_at, inner_momentum=inner_momentum,
                        k=0, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> None:
        assert closure is None and all(g["train_mode"] for g in self.param_groups), "oracle: train mode only"
        for group in self.param_groups:
            lr, normalize = self._lr(group)
            ckp1 = advance_average(group, lr)
            wd, decay_at, b1, beta2 = group["weight_decay"], group["decay_at"], group["b1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                x, y, z, v = state["x"], state["y"], state["z"], state["v"]
                g = p.grad
                if decay_at == "all":
                    x.mul_(1 - lr * wd)
                    z.mul_(1 - lr * wd)
                elif wd != 0:
                    z.sub_(y if decay_at == "y" else z, alpha=lr * wd)
                if group["kind"] != "sgd":
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                mu = group["inner_momentum"]
                if mu > 0:  # Adam's first moment, bias-corrected, in place of the gradient
                    state["m"].mul_(mu).add_(g, alpha=1 - mu)
                    g = state["m"] / (1 - mu ** (group["k"] + 1))
                if normalize:
                    g = g / ((v / (1 - beta2 ** (group["k"] + 1))).sqrt() + group["eps"])
                z.sub_(g, alpha=lr)
                x.mul_(1 - ckp1).add_(z, alpha=ckp1)
                y.copy_(x * b1 + z * (1 - b1))
                p.copy_(y)
            group["k"] += 1

    def _lr(self, group: dict[str, Any]) -> tuple[float, bool]:
        if group["kind"] == "radam":
            rect, adam_phase = radam_rectification(group["k"], group["beta2"], group["silent_sgd_phase"])
            return group["lr"] * rect, adam_phase
        return group["lr"] * warmup_factor(group["k"], group["warmup_steps"]), group["kind"] == "adamw"


class ReferenceScheduleFreePlus(_ExplicitXYZ):
    """Explicit-x/y/z ScheduleFree+ (AdamC + Schedule-Free + a Polyak step), one process, written
    from the paper's update: the oracle of ``sf_dist.AdamCScheduleFreePlus``.

    Per step k, with f the loss at y and g its gradient (sums over every param):
        b_k   = sf_beta1, or annealed in log(1-b) space towards sf_beta1_max over sf_beta1_anneal_steps
        ip    = b_k * <g, z - x>;   l1 = ||g||_1 * sqrt(pi/2)
        e     = polyak_beta*e + (1-polyak_beta)*l1;   e_hat = e / (1 - polyak_beta**(k+1))
        lr_k  = max(lr, eps) * max(0, f + ip) / e_hat
        z    -= lr_k**2 * wd * y  +  lr_k * (m/bc1) / (sqrt(v/bc2) + eps)      (Adam moments m, v of g)
        x     = (1-c) x + c z  (c = 1 during c_warmup, else the Schedule-Free weight);   y = b_k x + (1-b_k) z

    ``reference_defect=True`` instead keeps e_hat as the running e, as the reference's
    AdamCScheduleFreePlusPaper does: with polyak_beta > 0 the correction then compounds.

    >>> opt = ReferenceScheduleFreePlus(params, lr=1.0, polyak_beta=0.9); opt.train(); opt.step(loss=2.3)
    """

    def __init__(self, params: Any, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.95), sf_beta1: float = 0.9,
                 eps: float = 1e-8, weight_decay: float = 0.0, r: float = 0.0, polyak_beta: float = 0.0,
                 c_warmup: int = 0, sf_beta1_anneal_steps: int = 0, sf_beta1_max: float = 0.965,
                 weight_lr_power: float = 2.0, reference_defect: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, sf_beta1=sf_beta1, eps=eps, weight_decay=weight_decay, r=r,
                        polyak_beta=polyak_beta, c_warmup=c_warmup, sf_beta1_anneal_steps=sf_beta1_anneal_steps,
                        sf_beta1_max=sf_beta1_max, weight_lr_power=weight_lr_power, k=0, train_mode=False,
                        weight_sum=0.0, lr_max=eps, grad_l1_ema=0.0, polyak_lr=0.0)
        super().__init__(params, defaults)
        self.reference_defect = reference_defect

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None, *, loss: Optional[float] = None) -> None:
        assert closure is None and all(g["train_mode"] for g in self.param_groups), "oracle: train mode only"
        g0 = self.param_groups[0]
        k, pb = g0["k"], g0["polyak_beta"]
        b = annealed_sf_beta1(k, g0["sf_beta1"], g0["sf_beta1_max"], g0["sf_beta1_anneal_steps"])
        l1, ip = 0.0, 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                l1 += float(p.grad.abs().sum())
                ip += b * float((p.grad * (state["z"] - state["x"])).sum())
        ema = pb * g0["grad_l1_ema"] + (1 - pb) * l1 * math.sqrt(math.pi / 2)
        ema_hat = ema / (1 - pb ** (k + 1))
        polyak = max(0.0, float(loss) + ip) / ema_hat if ema_hat > 0 else 0.0
        for group in self.param_groups:
            group["grad_l1_ema"] = ema_hat if self.reference_defect else ema
            group["polyak_lr"] = polyak
            lr = max(group["lr"], group["eps"]) * polyak
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            if group["k"] < group["c_warmup"]:
                ckp1 = 1.0
            else:
                weight = (group["k"] + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
                group["weight_sum"] += weight
                ckp1 = weight / group["weight_sum"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s, g = self.state[p], p.grad
                s["z"].sub_(s["y"], alpha=lr * lr * group["weight_decay"])
                s["m"].mul_(beta1).add_(g, alpha=1 - beta1)
                s["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (s["v"] / (1 - beta2 ** (group["k"] + 1))).sqrt() + group["eps"]
                s["z"].sub_(s["m"] / (1 - beta1 ** (group["k"] + 1)) / denom, alpha=lr)
                s["x"].mul_(1 - ckp1).add_(s["z"], alpha=ckp1)
                s["y"].copy_(s["x"] * b + s["z"] * (1 - b))
                p.copy_(s["y"])
            group["k"] += 1

