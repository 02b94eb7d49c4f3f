"""The plain, slow oracle: x, y and z stored explicitly, one tensor at a time.

It mirrors the paper's three sequences rather than the memory-efficient y/z form of the fast
optimizers, so agreement between the two checks the algebra (swaps, decay modes) as well as the
code. Scalars come from ``sf_dist.schedule``, itself checked against the schedulefree package.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .schedule import advance_average, radam_rectification, warmup_factor

KINDS = ("adamw", "sgd", "radam")


class ReferenceScheduleFree(torch.optim.Optimizer):
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
                state = self.state[p]
                if not state:
                    state.update(x=p.clone(), y=p.clone(), z=p.clone(), v=torch.zeros_like(p), m=torch.zeros_like(p))
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
