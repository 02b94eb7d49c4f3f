"""DeepSpeed glue: a Schedule-Free "optimizer" entry in ds_config, and train()/eval() that reach the model.

DeepSpeed rejects optimizer types outside its own list and never calls optimizer.train()/eval().
Under ZeRO the Schedule-Free optimizer only sees DeepSpeed's flat fp32 master partitions, so a
bare eval() would change the masters but not the weights the forward pass uses. ``initialize``
builds our optimizer from the config, hands it to DeepSpeed as a client optimizer, and gives the
engine's optimizer a ``train()``/``eval()`` that swap the masters and then refresh the model's
(low-precision or partitioned) weights.

>>> engine, optimizer, _, _ = sf_dist.deepspeed.initialize(model=model, config="ds_config.json")
>>> optimizer.train()   # before training steps
>>> optimizer.eval()    # the model now computes with x, the eval weights
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import types
from typing import Any, Callable, Iterator, Optional

import torch

from ...optim import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeOptimizer, SGDScheduleFree
from ...plus import AdamCScheduleFreePlus
from .register import deepspeed_initialize, register
from .skip import step_with_one_decision
from .universal import load_stage12, load_stage3

__all__ = ["initialize", "register", "attach", "engine_state_dict", "engine_weights", "engine_weight_specs",
           "is_deepspeed", "OPTIMIZERS"]

OPTIMIZERS = {cls.__name__.lower(): cls
              for cls in (AdamWScheduleFree, SGDScheduleFree, RAdamScheduleFree, AdamCScheduleFreePlus)}

SCHEDULER_REFUSAL = (
    "{what} next to the Schedule-Free optimizer {opt}. Schedule-Free needs no lr schedule: its "
    "average x is what a decaying schedule would approximate, and a scheduler that lowers lr would "
    "also change the averaging weights. Put warmup in the optimizer's params instead "
    "(\"warmup_steps\": N; RAdamScheduleFree needs none) and remove the scheduler, or pass "
    "allow_scheduler=True if you really want both."
)


def is_deepspeed(model: Any) -> bool:
    """A DeepSpeed engine, detected by its class's module so deepspeed is never imported here."""
    return any(c.__module__.startswith("deepspeed") for c in type(model).__mro__)


def initialize(args: Any = None, model: Optional[torch.nn.Module] = None, optimizer: Any = None,
               model_parameters: Any = None, *, config: Any = None, allow_scheduler: bool = False,
               accept_lr_scheduler: bool = False, **kwargs: Any) -> tuple:
    """Drop-in for ``deepspeed.initialize`` that also accepts a Schedule-Free optimizer entry.

    ``config`` (dict or JSON path; or ``config_params`` / ``args.deepspeed_config`` as in
    DeepSpeed) may name ``AdamWScheduleFree``, ``SGDScheduleFree`` or ``RAdamScheduleFree``
    (any case) as ``optimizer.type``, its ``params`` going to the constructor. A Schedule-Free
    optimizer may also be passed as ``optimizer=``. Returns ``(engine, optimizer, dataloader,
    lr_scheduler)`` like DeepSpeed; the optimizer has ``train()``, ``eval()`` and ``train_mode``.
    A ``scheduler`` entry (or ``lr_scheduler=``) next to a Schedule-Free optimizer is refused
    unless ``allow_scheduler=True``; ``accept_lr_scheduler=True`` lets ``lr_scheduler=`` through
    but still refuses a config entry (what :func:`register` does for frameworks, which always pass
    one). Configs without Schedule-Free pass through untouched.
    """
    ds_initialize = deepspeed_initialize()

    source = config if config is not None else kwargs.get("config_params")
    from_args = source is None and getattr(args, "deepspeed_config", None) is not None
    loaded = _load_config(args.deepspeed_config if from_args else source)
    entry = loaded.get("optimizer") or {}
    name = entry.get("type")
    schedule_free = isinstance(optimizer, ScheduleFreeOptimizer)
    if name is not None:
        schedule_free = _check_name(name) or schedule_free
    if not schedule_free:  # DeepSpeed gets the arguments exactly as given
        result = ds_initialize(args=args, model=model, optimizer=optimizer,
                                      model_parameters=model_parameters, config=config, **kwargs)
        if isinstance(getattr(result[0], "basic_optimizer", None), ScheduleFreeOptimizer):
            attach(result[1])  # a callable passed as optimizer= built one of ours
        return result

    kwargs.pop("config_params", None)
    if from_args:  # DeepSpeed refuses a config both in args and in config=
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    config = loaded

    if model is None:
        raise ValueError("sf_dist.deepspeed.initialize requires model=")
    sf_name = type(optimizer).__name__ if optimizer is not None else name
    lr_scheduler = None if accept_lr_scheduler else kwargs.get("lr_scheduler")
    _refuse_scheduler(config, lr_scheduler, sf_name, allow_scheduler)
    config = _prepare_config(config)
    hold = _ConstructionStep()
    if name is not None and optimizer is not None:
        raise ValueError(f"ds_config names the optimizer {name!r} and optimizer={type(optimizer).__name__} "
                         "was also passed: give the optimizer in one place only")
    if optimizer is not None:
        client = hold(optimizer)
    else:  # built by DeepSpeed after any module replacement (AutoTP/AutoEP), as its own config optimizers are
        client = _factory(name, entry.get("params") or {}, hold)
        config = {k: v for k, v in config.items() if k != "optimizer"}
    try:
        engine, engine_optimizer, dataloader, scheduler = ds_initialize(
            args=args, model=model, optimizer=client, model_parameters=model_parameters, config=config, **kwargs)
    finally:
        hold.release()
    return engine, attach(engine_optimizer), dataloader, scheduler


class _ConstructionStep:
    """While DeepSpeed builds the engine, the held optimizers' step() does nothing.

    DeepSpeed's fp16/bf16 wrappers at ZeRO-0 run a zero-gradient step() at construction to create
    state; for Schedule-Free it would raise (eval mode) or advance k and weight_sum and apply
    weight decay. State is created at the first real step instead, from the weights of that
    moment (which a weights-only checkpoint load may have replaced). The stand-in is a bound
    method, as torch's LR schedulers (built inside deepspeed.initialize) require to wrap it; once
    released it calls the class's step, so a scheduler's wrapper around it keeps working.
    """

    def __init__(self) -> None:
        self.held: list[tuple[ScheduleFreeOptimizer, types.MethodType]] = []
        self.active = True

    def __call__(self, opt: ScheduleFreeOptimizer) -> ScheduleFreeOptimizer:
        hold = self

        def step(self: ScheduleFreeOptimizer, closure: Any = None) -> Any:
            return None if hold.active else type(self).step(self, closure)

        stand_in = types.MethodType(step, opt)
        opt.step = stand_in
        self.held.append((opt, stand_in))
        return opt

    def release(self) -> None:
        self.active = False
        for opt, stand_in in self.held:
            if opt.__dict__.get("step") is stand_in:
                del opt.__dict__["step"]  # no scheduler wrapped it: the class's step again


def _factory(name: str, params: dict, hold: _ConstructionStep) -> Callable[[Any], ScheduleFreeOptimizer]:
    """The optimizer of a config entry as a callable of the model parameters; bad keys fail now."""
    cls = OPTIMIZERS[name.lower()]
    params = {k: tuple(v) if k == "betas" else v for k, v in params.items()}
    try:
        inspect.signature(cls).bind_partial(None, **params)
    except TypeError as err:
        valid = [p for p in inspect.signature(cls).parameters if p != "params"]
        raise ValueError(f"bad params for {cls.__name__} in ds_config ({err}); valid keys: {valid}") from None
    return lambda model_parameters: hold(cls(_trainable(model_parameters), **params))


def _trainable(model_parameters: Any) -> list:
    """Params (or param-group dicts) without the frozen ones: they never get a gradient or state."""
    def keep(params: Any) -> list:
        return [p for p in ([params] if isinstance(params, torch.Tensor) else params) if p.requires_grad]

    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        return [{**group, "params": keep(group["params"])} for group in items]
    return keep(items)


def _load_config(config: Any) -> dict:
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a dict or a path to ds_config.json)")
    if isinstance(config, dict):
        return config
    with open(config) as f:
        return json.load(f, object_pairs_hook=_no_duplicate_keys)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """JSON objects as dicts, refusing a key given twice (as DeepSpeed's own loader does)."""
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"ds_config has duplicate keys {duplicates}: keep one of each")
    return dict(pairs)


def _check_name(name: str) -> bool:
    """True for one of our names; False for a name DeepSpeed builds; ValueError for anything else."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if name.lower() in OPTIMIZERS:
        return True
    if name.lower() in DEEPSPEED_OPTIMIZERS or getattr(torch.optim, name, None) is not None:
        return False  # DeepSpeed's own, or a torch.optim class DeepSpeed builds by name
    ours = ", ".join(cls.__name__ for cls in OPTIMIZERS.values())
    raise ValueError(f"unknown optimizer type {name!r} in ds_config: valid Schedule-Free types are {ours} "
                     f"(any case); DeepSpeed's own are {', '.join(sorted(DEEPSPEED_OPTIMIZERS))} or a "
                     "torch.optim class name")


def _refuse_scheduler(config: dict, lr_scheduler: Any, opt_name: str, allow: bool) -> None:
    scheduler = config.get("scheduler")
    if allow or (scheduler is None and lr_scheduler is None):
        return
    if scheduler is not None:
        kind = scheduler.get("type") if isinstance(scheduler, dict) else scheduler
        what = f"ds_config has a 'scheduler' entry ({kind!r})"
    else:
        kind = getattr(lr_scheduler, "__qualname__", None) or type(lr_scheduler).__name__
        what = f"lr_scheduler= was passed ({kind})"
    raise ValueError(SCHEDULER_REFUSAL.format(what=what, opt=opt_name))


def _prepare_config(config: dict) -> dict:
    """Allow our client optimizer under ZeRO; refuse the settings that would lose Schedule-Free state."""
    zero = config.get("zero_optimization") or {}
    if zero.get("elastic_checkpoint"):
        raise ValueError("zero_optimization.elastic_checkpoint=true saves only per-tensor optimizer state and "
                         "drops Schedule-Free's k, weight_sum and lr_max: set it to false")
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device") == "nvme":
        raise ValueError("offload_optimizer.device='nvme' keeps the fp32 masters and z on disk outside step(), "
                         "where train()/eval() cannot swap them: use device 'cpu' or 'none'")
    if zero.get("stage", 0) >= 1:
        config = {"zero_allow_untested_optimizer": True, **config}
    if offload.get("device") == "cpu":  # DeepSpeed has no CPU kernel of Schedule-Free to insist on
        config = {"zero_force_ds_cpu_optimizer": False, **config}
    return config


# ---- train()/eval() on the engine's optimizer ------------------------------------------------

class _EngineScheduleFree:
    """Mixed into the engine's optimizer class: swap the fp32 masters, then refresh the model.

    eval() keeps a CPU copy of the masters' y and train() puts it back, so an eval()/train() pair
    leaves training bitwise where it was (re-deriving y from x and z would be off by rounding).
    A load_state_dict() or refresh_fp32_params() in between drops the copy: y is re-derived then.
    """

    @property
    def train_mode(self) -> bool:
        """True when the masters (and model weights) hold y, False when they hold x."""
        return all(group["train_mode"] for group in self.optimizer.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Put y back in the masters and the model's weights (no-op when already training)."""
        if self.train_mode:
            return
        saved = self.__dict__.pop("_sf_y", None)
        self._sf_base_swap(to_train=True)
        if saved is not None:
            for master, y in zip(self._sf_masters(), saved):
                master.copy_(y)
        self._sf_refresh()

    @torch.no_grad()
    def eval(self) -> None:
        """Put x in the masters and the model's weights (no-op when already in eval mode)."""
        if not any(group["train_mode"] for group in self.optimizer.param_groups):
            return
        saved = [master.detach().to("cpu", copy=True) for master in self._sf_masters()] if self.train_mode else None
        self._sf_base_swap(to_train=False)
        if saved is not None:
            self._sf_y = saved
        self._sf_refresh()

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's step, refused in eval mode before DeepSpeed narrows param_groups for it.

        (ZeRO-1/2 restores param_groups only when the inner step returns, so an error raised
        there would leave the optimizer holding one group.)
        """
        if not self.train_mode:
            raise RuntimeError("step() called in eval mode: the model holds x, not y. Call optimizer.train() "
                               "before training steps (and optimizer.eval() before evaluating or saving).")
        return super().step(*args, **kwargs)

    def drop_train_copy(self) -> None:
        """Forget eval()'s copy of y: train() then re-derives y from x and z, bitwise as a run resumed
        from a checkpoint saved in eval mode does (HF ScheduleFreeCallback calls it after each save)."""
        self.__dict__.pop("_sf_y", None)

    def set_loss(self, loss: Any) -> None:
        """ScheduleFree+: the loss for the next engine.step() (call it after engine.backward(loss))."""
        self.optimizer.set_loss(loss)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop("_sf_y", None)
        self.__dict__.pop("_sf_all_linked", None)  # the load re-creates DeepSpeed's per-param views: link again
        return super().load_state_dict(*args, **kwargs)

    def refresh_fp32_params(self, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop("_sf_y", None)
        return super().refresh_fp32_params(*args, **kwargs)

    def _sf_masters(self) -> list[torch.Tensor]:
        """The fp32 tensors the Schedule-Free optimizer steps."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _sf_base_swap(self, to_train: bool) -> None:
        self.optimizer.train() if to_train else self.optimizer.eval()


class _ZeRO12(_EngineScheduleFree):
    """ZeRO-1/2 (DeepSpeedZeroOptimizer) and the BF16 optimizer: one flat fp32 partition per group."""

    def _sf_refresh(self) -> None:
        self.update_lp_params()

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's step, skipped or taken for every group together (see skip.py)."""
        if not hasattr(self, "check_grad_overflow"):  # BF16_Optimizer: checks the global norm itself
            return super().step(*args, **kwargs)
        return step_with_one_decision(self, self.optimizer, lambda: super(_ZeRO12, self).step(*args, **kwargs))

    def load_hp_checkpoint_state_from_checkpoint_dir(self, lp_groups_name: str, checkpoint_dir: str) -> None:
        """A universal checkpoint, also on a rank that holds nothing of some group (see universal.py)."""
        load_stage12(self, getattr(self, lp_groups_name), checkpoint_dir)

    def _lazy_init_hp_params_optimizer_state(self) -> None:
        """Link DeepSpeed's per-param views of z and the moments once EVERY group has them.

        ZeRO-1/2 links after the first group's step only, before the other groups have state;
        those views serve safe_get_full_optimizer_state and universal checkpoints.
        """
        if not getattr(self, "_sf_all_linked", False):
            self._hp_optimizer_states_linked = False
        super()._lazy_init_hp_params_optimizer_state()
        self._sf_all_linked = all("z" in self.optimizer.state.get(p, {})
                                  for group in self.optimizer.param_groups for p in group["params"])


class _Unfused(_EngineScheduleFree):
    """ZeRO-0 with bf16/fp16: full fp32 copies of each param, copied into the model after step."""

    def _sf_refresh(self) -> None:
        for fp32_group, lp_group in zip(self.fp32_groups, self.fp16_groups):
            for fp32, lp in zip(fp32_group, lp_group):
                lp.data.copy_(fp32.data)


class _ZeRO3(_EngineScheduleFree):
    """ZeRO-3: param_groups are empty outside step(); the masters are fp32_partitioned_groups_flat.

    DeepSpeed also steps the base optimizer once per sub-group, with every other group visible
    and empty: the counters of all groups are restored so each advances exactly once per step.
    """

    def _sf_masters(self) -> list[torch.Tensor]:
        return list(self.fp32_partitioned_groups_flat)

    def _sf_base_swap(self, to_train: bool) -> None:
        self._partition_all_parameters()
        with self._sf_masters_visible():
            self.optimizer.train() if to_train else self.optimizer.eval()

    def _sf_refresh(self) -> None:
        for sub_group_id in range(len(self.fp16_groups)):
            self._reassign_or_swap_out_partitioned_parameters(sub_group_id)
        if self.persistent_parameters:
            self.persistent_parameters[0].all_gather(self.persistent_parameters)

    def load_hp_checkpoint_state_from_checkpoint_dir_stage3(self, checkpoint_dir: str) -> None:
        """A universal checkpoint's every state key and per-group values (DeepSpeed's assumes Adam's)."""
        load_stage3(self, checkpoint_dir)

    @contextlib.contextmanager
    def _sf_masters_visible(self) -> Iterator[None]:
        self._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self._clear_fp32_optimizer_param_groups()

    def step(self, closure: Any = None) -> Any:
        groups = self.optimizer.param_groups
        self._sf_before = [_counters(g) for g in groups]
        self._sf_after: dict[int, dict] = {}
        try:
            return super().step(closure)
        finally:
            for i, group in enumerate(groups):
                group.update(self._sf_after.get(i, self._sf_before[i]))

    def _optimizer_step(self, sub_group_id: int) -> None:
        stepped = self.sub_group_to_group_id[sub_group_id]
        groups = self.optimizer.param_groups
        for group, before in zip(groups, self._sf_before):
            group.update(before)
        super()._optimizer_step(sub_group_id)
        self._sf_after[stepped] = _counters(groups[stepped])


def _counters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


_MIXED: dict[type, type] = {}


def attach(engine_optimizer: Any) -> Any:
    """Give DeepSpeed's optimizer wrapper Schedule-Free ``train()``/``eval()``/``train_mode``, in place.

    Returns the same object (its class swapped for a subclass that adds the three); our own
    optimizer (ZeRO-0 in fp32) is returned unchanged.
    """
    if isinstance(engine_optimizer, (ScheduleFreeOptimizer, _EngineScheduleFree)):
        return engine_optimizer
    base = getattr(engine_optimizer, "optimizer", None)
    if not isinstance(base, ScheduleFreeOptimizer):
        raise TypeError(f"{type(engine_optimizer).__name__} does not wrap a Schedule-Free optimizer (it wraps "
                        f"{type(base).__name__}): build the engine with an sf_dist optimizer, e.g. through "
                        "sf_dist.deepspeed.initialize")
    if hasattr(engine_optimizer, "fp32_partitioned_groups_flat"):
        mixin = _ZeRO3
    elif hasattr(engine_optimizer, "update_lp_params"):
        mixin = _ZeRO12
    elif hasattr(engine_optimizer, "fp32_groups") and hasattr(engine_optimizer, "fp16_groups"):
        mixin = _Unfused
    else:
        raise TypeError(f"unsupported DeepSpeed optimizer wrapper {type(engine_optimizer).__name__}: "
                        "Schedule-Free train()/eval() know ZeRO-0/1/2/3 and DeepSpeed's BF16 optimizer")
    if base.takes_loss:
        if mixin is not _ZeRO12 or len(base.param_groups) != 1:
            raise TypeError(f"{type(base).__name__} under DeepSpeed needs ZeRO-1/2 and one param group: DeepSpeed "
                            "steps the base optimizer once per group (or ZeRO-3 sub-group), and ScheduleFree+'s "
                            "step size is one global reduction over every param; use one group, or ZeroScheduleFree")
        base.params_are_shards = True  # each rank steps its own flat partition
    cls = type(engine_optimizer)
    if cls not in _MIXED:
        _MIXED[cls] = type(f"ScheduleFree{cls.__name__}", (mixin, cls), {})
    engine_optimizer.__class__ = _MIXED[cls]
    return engine_optimizer


# ---- weights in plain names ------------------------------------------------------------------

@torch.no_grad()
def engine_state_dict(engine: Any, full: bool = True, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The engine's current fp32 weights (x in eval mode, y in train mode) under plain module names.

    Collective: call on every rank. Params come from DeepSpeed's fp32 masters, buffers from the
    module. Rank 0 gets full tensors, the others ``{}``.
    """
    if not full:
        raise ValueError("full=False is not supported for DeepSpeed engines: their shards are flat "
                         "partitions with no per-name layout. Use full=True, or engine.save_checkpoint "
                         "and `python -m sf_dist.export` for a sharded save")
    return {name: t for name, t in engine_weights(engine, cpu_offload) if t is not None}


def engine_weight_specs(engine: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what ``engine_weights`` yields, in its order; no communication."""
    module = engine.module
    specs = [(name, torch.float32, tuple(_shape(p))) for name, p in module.named_parameters(remove_duplicate=False)]
    return specs + [(name, buf.dtype, tuple(buf.shape)) for name, buf in _persistent_buffers(module)]


@torch.no_grad()
def engine_weights(engine: Any, cpu_offload: bool = True,
                   as_x: bool = False) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(name, a copy of the fp32 weight) one at a time, params then persistent buffers; the tensor is
    None on ranks other than 0. Collective: every rank must run the generator to its end.

    ``as_x``: x even in train mode, taken on each rank's fragment of y and z and gathered one
    tensor at a time (nothing is swapped, and no rank holds more than one gathered tensor).
    """
    module = engine.module
    masters = _stage0_masters(engine.optimizer)
    x_of = _XOf(engine, masters) if as_x and engine.optimizer.train_mode else None
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for name, p in module.named_parameters(remove_duplicate=False):
        x = x_of(p) if x_of is not None and p.requires_grad else None  # collective at ZeRO-1/2/3
        value, fresh = (x, True) if x is not None else _full_weight(p, masters)
        del x
        if not rank0:
            yield name, None
        elif fresh and (value.device.type == "cpu" or not cpu_offload):
            yield name, value.detach().reshape(_shape(p))  # already a copy of our own
        else:
            yield name, _copy(value.reshape(_shape(p)), cpu_offload, torch.float32)
        del value
    for name, buf in _persistent_buffers(module):
        yield name, _copy(buf, cpu_offload, buf.dtype) if rank0 else None


def _full_weight(p: torch.Tensor, masters: dict[int, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The full fp32 weight of ``p`` as the masters hold it, and whether it is a gathered copy of our
    own rather than a live tensor (collective at ZeRO-1/2/3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if id(p) in masters:
        return masters[id(p)], False
    if not p.requires_grad:
        return _full_frozen(p), False
    gathered = safe_get_full_fp32_param(p)
    return (p, False) if gathered is None else (gathered, True)


class _XOf:
    """Full x of one trained param: x = lerp(y, z, 1 - 1/b1) taken on this rank's fragment (as
    eval() would, elementwise), then gathered once. None where eval() would leave the param as it
    is (its group has not stepped, so it has no z) or for a param the optimizer does not hold."""

    def __init__(self, engine: Any, masters: dict[int, torch.Tensor]) -> None:
        opt = self.opt = engine.optimizer
        self.base = opt if isinstance(opt, ScheduleFreeOptimizer) else opt.optimizer
        self.masters = masters
        if hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3: sub-groups of model params
            pairs = [(lp, opt.sub_group_to_group_id[i]) for i, lps in enumerate(opt.fp16_groups) for lp in lps]
        else:  # ZeRO-1/2, BF16_Optimizer, ZeRO-0 (the fp32 copies' groups, or our own optimizer's)
            lp_groups = next(getattr(opt, a) for a in ("bit16_groups", "bf16_groups", "fp16_groups", "param_groups")
                             if hasattr(opt, a))
            pairs = [(lp, gi) for gi, g in enumerate(lp_groups) for lp in (g["params"] if isinstance(g, dict) else g)]
        self.group_of = {id(lp): gi for lp, gi in pairs}

    def __call__(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """Collective at ZeRO-1/2/3 (the same decision on every rank: it depends on the group's k)."""
        if id(p) not in self.group_of:
            return None
        group = self.base.param_groups[self.group_of[id(p)]]
        if group["k"] == 0:
            return None
        weight = 1 - 1 / self.base.interpolation(group)
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of y and z, one all-gather of x
            y, _ = self.opt._get_fp32_opt_state_partition(p, release_swap_buffers=True)
            z, _ = self.opt._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key="z")
            return self.opt._fp32_state_allgather(p, y.lerp(z, weight))
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2: this rank's fragment into a zero buffer, one all-reduce
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            mapping = p._hp_mapping
            if mapping is not None:  # z read from the live state (DeepSpeed's linked views go stale on a load)
                hp = mapping.get_hp_fragment_address()
                z = self.base.state[group["params"][0]]["z"].narrow(0, hp.start, hp.numel)
                lp = mapping.lp_fragment_address
                full.narrow(0, lp.start, lp.numel).copy_(mapping.get_hp_fragment().lerp(z, weight))
            torch.distributed.all_reduce(full, group=p._dp_group)
            return full
        master = self.masters.get(id(p), p)  # ZeRO-0: the fp32 copy, or (fp32) the param itself
        return master.detach().float().lerp(self.base.state[master]["z"].float(), weight)


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    non_persistent = {f"{m}.{b}" if m else b for m, sub in module.named_modules()
                      for b in sub._non_persistent_buffers_set}
    return [(name, buf) for name, buf in module.named_buffers(remove_duplicate=False) if name not in non_persistent]


def _stage0_masters(engine_optimizer: Any) -> dict[int, torch.Tensor]:
    """ZeRO-0 with bf16/fp16 keeps full fp32 copies beside the model params: map model param -> copy."""
    if hasattr(engine_optimizer, "fp32_groups") and hasattr(engine_optimizer, "fp16_groups"):
        return {id(lp): fp32 for lp_g, fp32_g in zip(engine_optimizer.fp16_groups, engine_optimizer.fp32_groups)
                for lp, fp32 in zip(lp_g, fp32_g)}
    return {}


def _full_frozen(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_id"):  # ZeRO-3 partitioned, not trained: gather it
        from deepspeed import zero

        with zero.GatheredParameters([p]):
            return p.data.clone()
    return p


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _copy(t: torch.Tensor, cpu_offload: bool, dtype: torch.dtype) -> torch.Tensor:
    """A copy that does not alias the live weights (they change at the next train()/step)."""
    return t.detach().to(device="cpu" if cpu_offload else t.device, dtype=dtype, copy=True)
