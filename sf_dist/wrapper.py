"""ScheduleFreeWrapper: Schedule-Free around any torch optimizer, with z outside the base's state.

The base optimizer steps z (it sees z in the params for the length of its step); the wrapper
keeps z in its own ``state`` and the average x implicit, as the built-in classes do: one extra
buffer per param. On sharded params (FSDP2 DTensors, FSDP1 views, ZeRO slices) the base's step
must be elementwise, so only known elementwise bases are taken there.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import guard
from .distributed import is_shard, multi_rank
from .optim import COUNTERS, ScheduleFreeOptimizer, local
from .schedule import advance_average

__all__ = ["ScheduleFreeWrapper", "register_elementwise", "ELEMENTWISE_BASES"]

BASE = "base."  # prefix of the base optimizer's entries in the wrapper's state dict
# In the base's state of a param, from init_state() to that param's next step: 1 where the state is
# init_state's placeholder (the base had none yet), 0 where it is the base's own.
UNSTEPPED = "sf_dist_unstepped"

# Bases whose step treats every element on its own (state and update), so stepping a shard equals
# stepping the whole tensor and keeping the shard: any of them may run on sharded params.
ELEMENTWISE_BASES: set[type] = {
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.Adadelta, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Rprop,
}


def register_elementwise(cls: type) -> type:
    """Declare ``cls`` elementwise (e.g. a Lion): the wrapper then takes it on sharded params.
    Usable as a class decorator.

    >>> @sf_dist.register_elementwise
    ... class Lion(torch.optim.Optimizer): ...
    """
    ELEMENTWISE_BASES.add(cls)
    return cls


class ScheduleFreeWrapper(ScheduleFreeOptimizer):
    """Make ``base`` Schedule-Free: it steps z; the params hold y (train) or x (eval).

    Equal to schedulefree's ScheduleFreeWrapper, without its z in the base's ``state`` (where
    torch's Adam/AdamW/RMSprop then raise ``KeyError: 'exp_avg'``). ``base``'s group ``lr`` (and
    ``d``, for D-Adaptation/Prodigy) is read every step, so an lr scheduler on ``base`` works.

    >>> base = torch.optim.RMSprop(model.parameters(), lr=2.5e-3)
    >>> opt = sf_dist.ScheduleFreeWrapper(base, momentum=0.9, weight_decay_at_y=0.1)
    >>> opt.train()   # then loss.backward(); opt.step(); opt.zero_grad(); opt.eval() to evaluate
    """

    lr_from_base = True  # each step reads the base group's lr; ``around`` classes give it the wrapper's
    counters = COUNTERS + ("lr",)  # the step copies lr from the base: a checkpoint's wins, as the base's does

    def __init__(self, base: torch.optim.Optimizer, weight_decay_at_y: float = 0.0, momentum: float = 0.9,
                 weight_lr_power: float = 2.0, r: float = 0.0, *, nonfinite: str = "skip",
                 sharded: Optional[bool] = None) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}: build it "
                            "first, e.g. ScheduleFreeWrapper(torch.optim.Adam(model.parameters(), lr=1e-3))")
        if isinstance(base, ScheduleFreeOptimizer):
            raise TypeError(f"base is already Schedule-Free ({type(base).__name__}): wrap a plain optimizer")
        self.base = base
        self._built = False
        groups = [{"params": g["params"], "lr": g["lr"]} for g in base.param_groups]
        super().__init__(groups, dict(lr=base.defaults.get("lr", 0.0), weight_decay=weight_decay_at_y,
                                      momentum=momentum, r=r, weight_lr_power=weight_lr_power, decay_at="y",
                                      foreach=None, fused=None), nonfinite)
        self.sharded = sharded
        refuse_on_shards(base, [p for g in self.param_groups for p in g["params"]], sharded)
        self._built = True

    @classmethod
    def around(cls, base_class: type, **base_kwargs: Any) -> type["ScheduleFreeWrapper"]:
        """A wrapper class built from params, for ZeroScheduleFree's ``optimizer_class``: each rank's
        base steps its slices of z (so the base must be elementwise). Group keys go to the wrapper
        (``weight_decay`` is decay at y, as for the built-ins) except ``lr``, which the base gets too;
        each step hands the base the wrapper group's lr, so a scheduler on ZeroScheduleFree works.

        >>> Adam = sf_dist.ScheduleFreeWrapper.around(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.99))
        >>> opt = sf_dist.ZeroScheduleFree(model.parameters(), Adam, momentum=0.9, weight_decay=0.01)
        """
        own = {"weight_decay", "momentum", "r", "weight_lr_power", "decay_at", "foreach", "fused"}

        def __init__(self: ScheduleFreeWrapper, params: Any, **wrapper_kwargs: Any) -> None:
            groups = list(params)
            if groups and isinstance(groups[0], dict):
                groups = [{k: v for k, v in g.items() if k not in own} for g in groups]
            wrapper_kwargs.pop("lr", None)  # the base's, from base_kwargs or the groups
            wrapper_kwargs["weight_decay_at_y"] = wrapper_kwargs.pop("weight_decay", 0.0)
            cls.__init__(self, base_class(groups, **base_kwargs), sharded=multi_rank(), **wrapper_kwargs)

        return type(f"ScheduleFreeWrapper_{base_class.__name__}", (cls,),
                    {"__init__": __init__, "__doc__": f"ScheduleFreeWrapper around {base_class.__name__}.",
                     "lr_from_base": False, "counters": COUNTERS})

    def interpolation(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base (with its own hyperparameters) and mirror it here."""
        if self._built:
            self.base.add_param_group(param_group)
            refuse_on_shards(self.base, list(self.base.param_groups[-1]["params"]), self.sharded)
            param_group = {"params": self.base.param_groups[-1]["params"],
                           "lr": self.base.param_groups[-1]["lr"]}
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    # ---- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Decay z at y, put z in the params, step the base, then average and put y back."""
        if len(self.base.param_groups) != len(self.param_groups):
            raise RuntimeError("the base optimizer's param groups changed behind the wrapper: add groups with "
                               "wrapper.add_param_group(), not base.add_param_group()")
        if self.nonfinite == "ignore" and not self.train_mode:
            raise RuntimeError(guard.EVAL_MODE_MESSAGE)
        loss = None
        if closure is not None and self.train_mode:
            with torch.enable_grad():
                loss = closure()
        active = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        if self.nonfinite != "ignore" and self._agree(active, lacks_kernel=False)[0]:  # the base steps: no CPU kernel
            return loss
        for group, base_group, params in zip(self.param_groups, self.base.param_groups, active):
            if self.lr_from_base:
                group["lr"] = base_group["lr"]  # as the base's scheduler left it
            else:
                base_group["lr"] = group["lr"]  # as ZeroScheduleFree's scheduler left it (``around``)
            lr = group["lr"]
            m, wd = group["momentum"], group["weight_decay"]
            for p in params:
                y, z = local(p), local(self._state_for(p, group)["z"])
                if wd != 0:  # decay z at y; x = (y - (1-m) z)/m stays where it is
                    z.sub_(y, alpha=lr * wd)
                    y.sub_(y, alpha=lr * wd * (1 - m))
                y.lerp_(z, 1 - 1 / m)  # the param holds x ...
                _swap(y, z)  # ... and now z, with x kept in the state's buffer
        self._drop_placeholders([p for params in active for p in params])
        self.base.step()
        for group, base_group, params in zip(self.param_groups, self.base.param_groups, active):
            ckp1 = advance_average(group, base_group["lr"] * base_group.get("d", 1.0))
            m = group["momentum"]
            for p in params:
                y, x = local(p), local(self.state[p]["z"])
                _swap(y, x)  # the param holds x, the buffer the new z
                y.lerp_(x, ckp1)
                y.lerp_(x, 1 - m)
            group["k"] += 1
        return loss

    # ---- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_state(self) -> None:
        """Create z and the base's own state for every param that lacks them, without changing the
        run: the base takes one step at lr 0 on zero gradients for those params alone (torch's
        optimizers create their state lazily), their values are put back, and the state is marked
        a placeholder (``UNSTEPPED``), which the param's next step drops so that the base then
        creates its state as it would have (an Adam step count, an Rprop step size)."""
        super().init_state()
        params = [p for g in self.base.param_groups for p in g["params"]]
        missing = [p for p in params if not self.base.state.get(p)]
        if missing:
            self._placeholder_state(missing)
        placeholders = {id(p) for p in missing}
        for p in params:
            self.base.state[p].setdefault(UNSTEPPED, torch.tensor(float(id(p) in placeholders)))

    def _placeholder_state(self, missing: list[Tensor]) -> None:
        """The base's lazy state for ``missing``: one step at lr 0 on zero gradients, values put back."""
        grads = {p: p.grad for g in self.base.param_groups for p in g["params"]}
        lrs = [g["lr"] for g in self.base.param_groups]
        values = [local(p).clone() for p in missing]
        try:
            for p in grads:
                p.grad = None
            for p in missing:
                p.grad = torch.zeros_like(p)
            for g in self.base.param_groups:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], Tensor) else 0.0
            self.base.step()
        finally:
            for p, v in zip(missing, values):
                local(p).copy_(v)
            for p, grad in grads.items():
                p.grad = grad
            for g, lr in zip(self.base.param_groups, lrs):
                g["lr"] = lr

    def _drop_placeholders(self, params: list[Tensor]) -> None:
        """Before the base steps ``params``: a placeholder state goes (the base creates its own), a
        marker on the base's own state goes (one host read for all markers, only after init_state)."""
        marked = [p for p in params if UNSTEPPED in self.base.state.get(p, {})]
        if not marked:
            return
        markers = [self.base.state[p].pop(UNSTEPPED) for p in marked]
        flags = torch.stack([m.to(markers[0].device, torch.float32) for m in markers]).tolist()
        for p, placeholder in zip(marked, flags):
            if placeholder:
                del self.base.state[p]

    def state_dict(self) -> dict[str, Any]:
        """One torch-style state dict: per param z and the base's state, per group ours and the
        base's values, the base's keys prefixed ``"base."`` (so DCP and torch's state-dict helpers
        see an ordinary optimizer)."""
        ours, base = super().state_dict(), self.base.state_dict()
        for i, s in base["state"].items():
            ours["state"].setdefault(i, {}).update({f"{BASE}{k}": v for k, v in s.items()})
        for group, base_group in zip(ours["param_groups"], base["param_groups"]):
            group.update({f"{BASE}{k}": v for k, v in base_group.items() if k != "params"})
        return ours

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() of this class; a dict without the base's entries is refused with the reason."""
        groups = state_dict["param_groups"]
        if not all(any(k.startswith(BASE) for k in g) for g in groups):
            raise ValueError("this state dict has no 'base.' entries: it is not a ScheduleFreeWrapper.state_dict() "
                             "(schedulefree's wrapper saves only the base's, with z inside it)")
        split = [{i: {k: v for k, v in s.items() if k.startswith(BASE) == mine} for i, s in state_dict["state"].items()}
                 for mine in (True, False)]
        base = {"state": {i: {k[len(BASE):]: v for k, v in s.items()} for i, s in split[0].items() if s},
                "param_groups": [{"params": g["params"], **{k[len(BASE):]: v for k, v in g.items() if k.startswith(BASE)}}
                                 for g in groups]}
        self.base.load_state_dict(base)
        super().load_state_dict({"state": {i: s for i, s in split[1].items() if s},
                                 "param_groups": [{k: v for k, v in g.items() if not k.startswith(BASE)} for g in groups]})


def _swap(a: Tensor, b: Tensor) -> None:
    """Exchange the values of two same-shaped tensors in place, exactly (bitwise)."""
    if a.numel() == 0:
        return
    if a.is_contiguous() and b.is_contiguous():  # XOR swap: no temporary the size of the param
        ua, ub = a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        ua.bitwise_xor_(ub)
        ub.bitwise_xor_(ua)
        ua.bitwise_xor_(ub)
    else:
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)


def refuse_on_shards(base: torch.optim.Optimizer, params: list[Tensor], sharded: Optional[bool]) -> None:
    """Raise TypeError when the params are shards and ``base`` is not known to be elementwise."""
    if type(base) in ELEMENTWISE_BASES:
        return
    if sharded is None:
        sharded = any(is_shard(p) for p in params)
    if sharded:
        raise TypeError(
            f"ScheduleFreeWrapper cannot run {type(base).__name__} on sharded params: each rank would step its "
            "shard as if it were the whole tensor, which is only right for an elementwise optimizer (Adam, "
            "AdamW, RMSprop, SGD, Adagrad, ...). Use an elementwise base, or if every part of "
            f"{type(base).__name__}.step is elementwise declare it with sf_dist.register_elementwise("
            f"{type(base).__name__}).")
