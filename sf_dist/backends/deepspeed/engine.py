"""train()/eval()/train_mode on DeepSpeed's engine optimizers: swap the fp32 masters, then refresh the
model's (low-precision or partitioned) weights, at ZeRO-0/1/2/3 and with DeepSpeed's BF16 optimizer.

>>> opt = attach(engine.optimizer)   # sf_dist.deepspeed.initialize and register() do it for you
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ...optim import ScheduleFreeOptimizer
from .skip import step_with_one_decision
from .universal import load_stage12, load_stage3

__all__ = ["attach"]


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
        self._sf_held: dict[int, Any] = {}
        return step_with_one_decision(self, self.optimizer, lambda: super(_ZeRO12, self).step(*args, **kwargs))

    def _optimizer_step(self, group_no: int) -> None:
        """ScheduleFree+ with several groups: hold each group's fp32 gradient, then step every group
        in one call at the last group (its step size sums over all of them), and copy the groups
        stepped late into their bit16 partitions before DeepSpeed all-gathers them.

        DeepSpeed 0.19 builds group i's gradient partition, steps group i alone and frees its
        gradient before it builds group i+1's, so no earlier call sees every group's gradient.
        """
        groups = self.optimizer.param_groups
        if not self.optimizer.takes_loss or len(groups) == 1:  # the others step group by group
            return super()._optimizer_step(group_no)
        masters = self.single_partition_of_fp32_groups
        self._sf_held[group_no] = masters[group_no].grad
        if len(self._sf_held) < len(groups):
            return
        standing = [master.grad for master in masters]  # None, or CPU offload's standing buffers
        for i, grad in self._sf_held.items():
            masters[i].grad = grad
        try:
            self.optimizer.step()
        finally:
            for master, grad in zip(masters, standing):
                master.grad = grad
            self._sf_held = {}
        for i in range(len(groups) - 1):  # DeepSpeed copied these before they moved
            partition_id = dist.get_rank(group=self.real_dp_process_group[i])
            self.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(masters[i].data)
        self._lazy_init_hp_params_optimizer_state()

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
        if mixin is not _ZeRO12:
            raise TypeError(f"{type(base).__name__} under DeepSpeed needs ZeRO-1/2: ZeRO-3 steps the base optimizer "
                            "once per sub-group, with the other groups emptied, and ScheduleFree+'s step size is "
                            "one global reduction over every param (ZeRO-0 with bf16/fp16 is not covered either); "
                            "use ZeRO-1/2, or ZeroScheduleFree")
        if len(base.param_groups) > 1 and (getattr(engine_optimizer, "zenflow", False)
                                           or getattr(engine_optimizer, "torch_autocast_gradscaler", None)):
            raise TypeError(f"{type(base).__name__} with several param groups under DeepSpeed ZenFlow or torch "
                            "autocast: those step each group through their own path, which cannot defer a group "
                            "until every group's gradient is there; use one param group")
        base.params_are_shards = True  # each rank steps its own flat partition
    cls = type(engine_optimizer)
    if cls not in _MIXED:
        _MIXED[cls] = type(f"ScheduleFree{cls.__name__}", (mixin, cls), {})
    engine_optimizer.__class__ = _MIXED[cls]
    return engine_optimizer
