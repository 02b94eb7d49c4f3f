"""Schedule-Free AdamW, SGD and RAdam as torch.optim.Optimizer subclasses.

The parameter holds y (train mode) or x (eval mode); the state holds z and the second moment.
Params may be plain tensors, FSDP2 DTensors (stepped on their local shard, no communication)
or FSDP1 flat-parameter views, including empty shards.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from . import guard, kernels
from .kernels.rounding import STATE_DTYPES
from .schedule import DECAY_AT, StepScalars, advance_average, radam_rectification, warmup_factor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch builds without distributed
    DTensor = ()  # type: ignore[assignment,misc]

_SEED_BASE, _SEED_STRIDE = 0x5F5F * 1_000_003, 1_000_003  # a step's rounding seed: (k + base) * stride + group

ParamsT = Iterable[Any]

# Group entries that count steps or record the schedule; everything else is a hyperparameter.
COUNTERS = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")


def host_values(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's entries but "params", with counters kept on the device (the sync-free path)
    read back as host numbers; reading them synchronises."""
    out = {k: v for k, v in group.items() if k != "params"}
    for key in COUNTERS:
        if isinstance(out.get(key), Tensor):
            out[key] = int(out[key].item()) if key == "k" else float(out[key].item())
    return out


def local(t: Tensor) -> Tensor:
    """The tensor this rank stores: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class ScheduleFreeOptimizer(torch.optim.Optimizer):
    """Shared machinery: lazy state, mode swaps, kernel dispatch. Subclasses define the schedule."""

    moment_keys: tuple[str, ...] = ()
    counters: tuple[str, ...] = COUNTERS  # group entries a step writes (ZeRO mirrors them, checkpoints keep them)
    takes_loss = False  # whether step() takes loss= (ScheduleFree+)

    def __init__(self, params: ParamsT, defaults: dict[str, Any], nonfinite: str = "skip") -> None:
        if nonfinite not in guard.NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (expected one of {guard.NONFINITE})")
        self.nonfinite = nonfinite
        self._skipped_host = 0  # steps skipped on the host path
        self._skipped_device: Optional[Tensor] = None  # ... and on the sync-free path, counted on the device
        self.process_group: Optional[Any] = None  # ranks that agree on mode and finiteness (None: all)
        self.swap_hooks: list[Callable[[], None]] = []  # run before a y <-> x swap (sf_dist.bind)
        self.params_are_shards: Optional[bool] = None  # each rank holds distinct slices (None: detect)
        _validate(defaults)
        if defaults["foreach"] and defaults["fused"]:
            raise ValueError("foreach=True and fused=True are exclusive: pick one kernel path")
        defaults.update(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then every hyperparameter and param of the new group checked."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"Schedule-Free optimizers do not support complex parameters (got one of "
                                     f"shape {tuple(p.shape)}, {p.dtype}): optimize torch.view_as_real(p) instead")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts of the schedulefree package lack these
            group.setdefault("decay_at", "y")
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)
            if group["state_dtype"] is not None:  # torch's load_state_dict cast the state to the params' dtype
                for p in group["params"]:
                    for key, t in self.state.get(p, {}).items():
                        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != group["state_dtype"]:
                            self.state[p][key] = t.to(group["state_dtype"])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient on some rank (nonfinite="skip"). On the sync-free
        accelerator path the count lives on the device, and reading it synchronises."""
        on_device = 0 if self._skipped_device is None else int(self._skipped_device.item())
        return self._skipped_host + on_device

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with counters kept on the device read back as host numbers (this
        synchronises), so a checkpoint is the same whichever path stepped it."""
        sd = super().state_dict()
        sd["param_groups"] = [dict(host_values(g), params=g["params"]) for g in sd["param_groups"]]
        return sd

    # ---- hooks for subclasses ---------------------------------------------------------------
    def interpolation(self, group: dict[str, Any]) -> float:
        """b1 of y = (1-b1)*z + b1*x."""
        return group["betas"][0]

    def scalars(self, group: dict[str, Any]) -> StepScalars:
        """Advance the group's schedule by one step and return the kernel's scalars."""
        raise NotImplementedError

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The moment buffers a param of ``group`` keeps beside z: ``moment_keys`` unless a
        subclass's option adds one (AdamW's ``exp_avg`` when inner_momentum > 0)."""
        return self.moment_keys

    # ---- mode ------------------------------------------------------------------------------
    @property
    def train_mode(self) -> bool:
        """True when the params hold y (train), False when they hold x (eval)."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Put y in the params (no-op if already training)."""
        self._swap(to_train=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put x, the eval weights, in the params (no-op if already in eval mode)."""
        self._swap(to_train=False)

    def _swap(self, to_train: bool) -> None:
        if any(group["train_mode"] != to_train for group in self.param_groups):
            for hook in self.__dict__.get("swap_hooks", ()):
                hook()
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            b1 = self.interpolation(group)
            with_state = [p for p in group["params"] if "z" in self.state.get(p, {})]
            ys = [local(p) for p in with_state]
            zs = [local(self.state[p]["z"]) for p in with_state]
            kernels.swap_(ys, zs, 1 - b1 if to_train else 1 - 1 / b1, foreach=bool(group["foreach"]))
            group["train_mode"] = to_train

    # ---- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_state(self) -> None:
        """Create z and the moments for every param that lacks them, without stepping.

        Call before building a state dict to load into (DCP), so no loader needs a dummy step.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._state_for(p, group)

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        dtype = group.get("state_dtype") or p.dtype
        if "z" not in state:
            state["z"] = p.detach().clone(memory_format=torch.preserve_format).to(dtype)
        for key in self.state_keys(group):  # a moment switched on mid-run starts at zero
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _rounding_generator(self, device: torch.device) -> torch.Generator:
        """This optimizer's own random stream for stochastic rounding (the global one is left alone), seeded
        alike on every rank: replicas (DDP, HSDP) must round their identical state identically."""
        gens = self.__dict__.setdefault("_rounding_generators", {})
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(0x5F5F)
        return gens[device]

    # ---- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One Schedule-Free step on every param with a gradient.

        Raises in eval mode. Non-finite gradients on any rank are handled per ``nonfinite``:
        "skip" leaves all state bitwise unchanged and counts ``skipped_steps``, "error" raises.
        """
        if self.nonfinite == "ignore" and not self.train_mode:
            raise RuntimeError(guard.EVAL_MODE_MESSAGE)
        for i, group in enumerate(self.param_groups):  # values may have been changed in param_groups
            _validate(group, where=f"param_groups[{i}]")
        loss = None
        if closure is not None and self.train_mode:
            with torch.enable_grad():
                loss = closure()
        active = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        for p in (p for params in active for p in params):
            if p.grad.layout != torch.strided:
                raise RuntimeError(f"Schedule-Free optimizers do not support sparse gradients (a param of shape "
                                   f"{tuple(p.shape)} got a {p.grad.layout} gradient): use dense gradients, "
                                   "e.g. nn.Embedding(..., sparse=False)")
        device = self._sync_free_device(active)
        if device is not None:
            self._sync_free_step(active, device)
            return loss
        lacks_kernel = self._lacks_cpu_kernel(active)
        if self.nonfinite == "ignore":
            if lacks_kernel and guard.multi_rank(self.process_group):
                raise RuntimeError(f"{kernels.cpu_kernel_error()}. With nonfinite='ignore' the ranks do not "
                                   "agree on a kernel, so this rank cannot fall back alone (its replicas would "
                                   "drift apart): fix the build, or pass foreach=False on every rank")
            skip = False
        else:
            skip, lacks_kernel = self._agree(active, lacks_kernel)
        if skip:
            return loss
        cpu_default = "single" if lacks_kernel else "fused"
        for group, params in zip(self.param_groups, active):
            self._step_group(group, params, cpu_default)
            group["k"] += 1
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], cpu_default: str = "fused",
                    ok: Optional[Tensor] = None) -> None:
        """Step ``params`` of ``group`` (creating their state) and advance the group's average.

        State kept narrower than the params (``state_dtype``) is rounded back stochastically by the
        kernels, from this optimizer's own random stream; ``ok`` is the sync-free path's device flag."""
        keys = self.state_keys(group)
        ys, grads, zs, moments = [], [], [], {key: [] for key in keys}
        for p in params:
            state = self._state_for(p, group)
            ys.append(local(p))
            grads.append(local(p.grad))
            zs.append(local(state["z"]))
            for key in keys:
                moments[key].append(local(state[key]))
        s = self.scalars(group)  # also records this step's weight_sum, lr_max and scheduled_lr
        if not ys:
            return
        narrow = next((y for y, z in zip(ys, zs) if z.itemsize < y.itemsize), None)  # state_dtype=torch.bfloat16
        generator, seed = (None, None) if narrow is None else self._rounding_stream(narrow.device, group)
        kernels.step_(ys, grads, zs, moments.get("exp_avg_sq"), s, impl=_pick_impl(group, ys, cpu_default), ok=ok,
                      exp_avgs=moments.get("exp_avg"), generator=generator, seed=seed)

    def _rounding_stream(self, device: torch.device, group: dict[str, Any]) -> tuple[torch.Generator, Tensor]:
        """(generator, fused kernels' seed) to round this step's bf16 state from. The seed, and with host
        counters the generator's seed, come from the group's step count and place, so a resumed run
        rounds as the uninterrupted one; with the sync-free path's device counters the seed is computed
        on the device and the generator (the other paths) keeps drawing from its stream as it goes."""
        place = next(i for i, g in enumerate(self.param_groups) if g is group)
        generator, k = self._rounding_generator(device), group["k"]
        if isinstance(k, Tensor):
            return generator, (k.to(torch.int64) + _SEED_BASE) * _SEED_STRIDE + place
        seed = (int(k) + _SEED_BASE) * _SEED_STRIDE + place
        generator.manual_seed(seed)
        return generator, torch.tensor(seed, dtype=torch.int64, device=device)

    def _sync_free_device(self, active: list[list[Tensor]]) -> Optional[torch.device]:
        """The accelerator to step on without host syncs (nonfinite="skip", grads off the CPU), else None."""
        if self.nonfinite != "skip":
            return None
        device = next((local(p.grad).device for params in active for p in params), None)
        return None if device is None or device.type == "cpu" else device

    def _sync_free_step(self, active: list[list[Tensor]], device: torch.device) -> None:
        """The step with no host read: the finite flag, its agreement across ranks and the counters
        stay on ``device``; a skipped step masks every store and leaves the counters as they were."""
        bad = guard.nonfinite_flag([local(p.grad) for params in active for p in params], device)
        ok = guard.agree_on_device(bad, not self.train_mode, self.process_group)
        if not self.train_mode:  # after the collective, so that no other rank waits in it
            raise RuntimeError(guard.EVAL_MODE_MESSAGE)
        for group, params in zip(self.param_groups, active):
            for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
                if not isinstance(group[key], Tensor) or group[key].device != device:
                    group[key] = torch.full((), float(group[key]), dtype=torch.float64, device=device)
            kept = {key: group[key] for key in ("weight_sum", "lr_max", "scheduled_lr")}
            self._step_group(group, params, ok=ok)
            for key, counter in kept.items():  # in place: a captured CUDA graph keeps its addresses
                group[key] = counter.copy_(torch.where(ok, group[key], counter))
            group["k"].add_(ok)
        if self._skipped_device is None:
            self._skipped_device = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_device.add_(~ok)

    def _lacks_cpu_kernel(self, active: list[list[Tensor]]) -> bool:
        """Whether a group would take the default fused CPU path and the C++ kernel cannot be used here."""
        wants = any(group["fused"] is None and group["foreach"] is None and params
                    and local(params[0]).device.type == "cpu" for group, params in zip(self.param_groups, active))
        return wants and kernels.cpu_kernel_error() is not None

    def _agree(self, active: list[list[Tensor]], lacks_kernel: bool) -> tuple[bool, bool]:
        """Agree with every rank on mode, finiteness and the CPU kernel in one all-reduce.

        Returns (skip this step, some rank lacks the fused CPU kernel); raises where asked to.
        """
        flat = [p for params in active for p in params]
        bad_index = guard.first_nonfinite([local(p.grad) for p in flat])
        any_bad, any_eval, any_lacks = guard.agree(bad_index is not None, not self.train_mode, lacks_kernel,
                                                   group=self.process_group)
        if any_lacks and not lacks_kernel:
            _warn_once("another rank cannot build the fused C++ CPU kernel: every rank steps with the "
                       "per-tensor kernel so that replicas stay identical")
        elif lacks_kernel:
            _warn_once(f"{kernels.cpu_kernel_error()}; every rank steps with the per-tensor kernel")
        if any_eval:
            raise RuntimeError(guard.EVAL_MODE_MESSAGE if not self.train_mode else
                               "step() refused: another rank is in eval mode while this one trains. "
                               "Every rank must call optimizer.train() before stepping.")
        if not any_bad:
            return False, any_lacks
        if self.nonfinite == "error":
            k = self.param_groups[0]["k"]
            if bad_index is None:
                raise RuntimeError(f"non-finite gradient at step {k} on another rank (nonfinite='error')")
            p = flat[bad_index]
            gi, pi = next((gi, pi) for gi, g in enumerate(self.param_groups)
                          for pi, q in enumerate(g["params"]) if q is p)
            raise RuntimeError(f"non-finite gradient at step {k} in param_groups[{gi}]['params'][{pi}] "
                               f"(shape {tuple(p.shape)}); nonfinite='skip' would skip the step")
        self._skipped_host += 1
        return True, any_lacks


class AdamWScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free AdamW (memory-efficient form), numerically equal to schedulefree 1.4.1.

    ``inner_momentum`` mu > 0 (the reference's newest option; 0.9 is its suggestion) replaces the
    gradient in Adam's numerator by its bias-corrected EMA, kept as state ``exp_avg``.
    ``state_dtype=torch.bfloat16`` stores z and the moments in bf16 with stochastic rounding
    (4 bytes of state per param instead of 8 for fp32); the step itself runs in the params' dtype.

    >>> opt = AdamWScheduleFree(model.parameters(), lr=2.5e-3, warmup_steps=100)
    >>> opt.train()   # before training steps;  opt.eval() before evaluating or saving
    """

    moment_keys = ("exp_avg_sq",)

    def __init__(self, params: ParamsT, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, decay_at: str = "y", foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, nonfinite: str = "skip", inner_momentum: float = 0.0,
                 state_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      decay_at=decay_at, foreach=foreach, fused=fused,
                                      inner_momentum=inner_momentum, state_dtype=state_dtype), nonfinite)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # schedulefree 1.4.1 and our older state dicts lack it
            group.setdefault("inner_momentum", 0.0)

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg_sq", "exp_avg") if group["inner_momentum"] > 0 else ("exp_avg_sq",)

    def scalars(self, group: dict[str, Any]) -> StepScalars:
        s = _adam_scalars(group, group["lr"] * warmup_factor(group["k"], group["warmup_steps"]), True)
        mu = group["inner_momentum"]
        if mu == 0:
            return s
        return dataclasses.replace(s, inner_momentum=mu, bias_correction1=1 - mu ** (group["k"] + 1))


class RAdamScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free RAdam: no warmup needed; rectified lr, SGD (or silent) phase at the start.

    >>> opt = RAdamScheduleFree(model.parameters(), lr=2.5e-3); opt.train()
    """

    moment_keys = ("exp_avg_sq",)

    def __init__(self, params: ParamsT, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, r: float = 0.0, weight_lr_power: float = 2.0,
                 silent_sgd_phase: bool = True, decay_at: str = "y", foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, nonfinite: str = "skip", state_dtype: Optional[torch.dtype] = None
                 ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, silent_sgd_phase=silent_sgd_phase,
                                      decay_at=decay_at, foreach=foreach, fused=fused, state_dtype=state_dtype),
                         nonfinite)

    def scalars(self, group: dict[str, Any]) -> StepScalars:
        rect, adam_phase = radam_rectification(group["k"], group["betas"][1], group["silent_sgd_phase"])
        return _adam_scalars(group, group["lr"] * rect, adam_phase)


class SGDScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free SGD with momentum-style interpolation ``momentum`` (b1).

    >>> opt = SGDScheduleFree(model.parameters(), lr=1.0, momentum=0.9); opt.train()
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, decay_at: str = "y",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      decay_at=decay_at, foreach=foreach, fused=fused), nonfinite)

    def interpolation(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def scalars(self, group: dict[str, Any]) -> StepScalars:
        momentum = group["momentum"]
        lr = group["lr"] * warmup_factor(group["k"], group["warmup_steps"])
        ckp1 = advance_average(group, lr)
        return StepScalars(lr=lr, ckp1=ckp1, y_coef=lr * (momentum * (1 - ckp1) - 1),
                           weight_decay=group["weight_decay"], decay_at=group["decay_at"])


def _adam_scalars(group: dict[str, Any], lr: float, normalize: bool) -> StepScalars:
    """Scalars of an Adam-family step at the scheduled ``lr`` (advances the group's average)."""
    beta1, beta2 = group["betas"]
    ckp1 = advance_average(group, lr)
    return StepScalars(lr=lr, ckp1=ckp1, y_coef=lr * (beta1 * (1 - ckp1) - 1),
                       weight_decay=group["weight_decay"], decay_at=group["decay_at"],
                       beta2=beta2, bias_correction2=1 - beta2 ** (group["k"] + 1),
                       eps=group["eps"], normalize=normalize)


def _validate(group: dict[str, Any], where: str = "") -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group (NaN and inf included)."""
    at = f" in {where}" if where else ""

    def number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = False, why: str = "") -> None:
        ok = isinstance(value, (numbers.Real, Tensor)) and math.isfinite(value) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
            raise ValueError(f"Invalid {key}: {value!r}{at} (must be a finite number in {interval}{why})")

    number("learning rate", group["lr"], 0.0)
    if "eps" in group:
        number("epsilon value", group["eps"], 0.0)
    number("weight_decay value", group["weight_decay"], 0.0)
    number("r", group["r"], 0.0)
    number("weight_lr_power", group["weight_lr_power"], 0.0)
    if "betas" in group:
        beta1, beta2 = group["betas"]
        number("beta parameter at index 0", beta1, 0.0, 1.0, low_open=True, high_open=True,
               why="; x = (y - (1-b1)*z)/b1 needs b1 > 0")
        number("beta parameter at index 1", beta2, 0.0, 1.0, high_open=True)
    if "momentum" in group:
        number("momentum value", group["momentum"], 0.0, 1.0, low_open=True, high_open=True,
               why="; x = (y - (1-m)*z)/m needs m > 0")
    if "warmup_steps" in group:
        steps = group["warmup_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"Invalid warmup_steps: {steps!r}{at} (must be an integer >= 0)")
    if group.get("state_dtype") not in (None, *STATE_DTYPES):
        raise ValueError(f"Invalid state_dtype: {group['state_dtype']}{at} (None keeps the params' dtype; "
                         f"supported: {STATE_DTYPES}, stored with stochastic rounding)")
    if "inner_momentum" in group:
        number("inner_momentum", group["inner_momentum"], 0.0, 1.0, high_open=True, why="; 0 turns it off")
    if group["decay_at"] not in DECAY_AT:
        raise ValueError(f"Invalid decay_at: {group['decay_at']!r}{at} (expected one of {DECAY_AT})")


def _pick_impl(group: dict[str, Any], tensors: list[Tensor], cpu_default: str = "fused") -> str:
    """The kernel path: the one asked for; by default ``cpu_default`` on the CPU (the fused C++
    kernel, as fast as torch's fused AdamW, unless some rank cannot build it), fused on CUDA (one
    Triton launch per dtype) and foreach elsewhere."""
    if group["fused"]:
        return "fused"
    if group["foreach"] is not None:
        return "foreach" if group["foreach"] else "single"
    if tensors[0].device.type == "cpu":
        return cpu_default
    return "fused" if kernels.triton_available(tensors[0].device) else "foreach"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
