"""DeepSpeed glue: a Schedule-Free "optimizer" entry in ds_config, and train()/eval() that reach the model.

DeepSpeed rejects optimizer types outside its own list and never calls optimizer.train()/eval().
Under ZeRO the Schedule-Free optimizer only sees DeepSpeed's flat fp32 master partitions, so a
bare eval() would change the masters but not the weights the forward pass uses. ``initialize``
builds our optimizer from the config, hands it to DeepSpeed as a client optimizer, and gives the
engine's optimizer a ``train()``/``eval()`` that swap the masters and then refresh the model's
(low-precision or partitioned) weights (``attach``, in engine.py; the engine's weights by name are in
weights.py, ``register`` in register.py).

>>> engine, optimizer, _, _ = sf_dist.deepspeed.initialize(model=model, config="ds_config.json")
>>> optimizer.train()   # before training steps
>>> optimizer.eval()    # the model now computes with x, the eval weights
"""

from __future__ import annotations

import argparse
import inspect
import json
import types
from typing import Any, Callable, Optional

import torch

from ...optim import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeOptimizer, SGDScheduleFree
from ...plus import AdamCScheduleFreePlus
from .engine import attach
from .register import deepspeed_initialize, register
from .weights import engine_state_dict, engine_weight_specs, engine_weights

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
