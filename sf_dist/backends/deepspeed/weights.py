"""A DeepSpeed engine's weights under plain module names, one full fp32 tensor at a time (x or y).

>>> state = engine_state_dict(engine)   # collective; rank 0 gets the tensors
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ...distributed import every_rank_io, rank0_io
from ...optim import ScheduleFreeOptimizer

__all__ = ["engine_state_dict", "engine_weight_specs", "engine_weights"]


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
    A failure on any rank while x is prepared, or on rank 0 while it takes its copy, raises on
    every rank, in step (sf_dist.distributed.every_rank_io / rank0_io).
    """
    module = engine.module
    masters = _stage0_masters(engine.optimizer)
    x_of = _XOf(engine, masters) if as_x and engine.optimizer.train_mode else None
    for name, p in module.named_parameters(remove_duplicate=False):
        what = f"gather x of {name!r}" if x_of is not None else f"gather {name!r}"
        x = x_of(p, what) if x_of is not None and p.requires_grad else None  # collective at ZeRO-1/2/3
        value, fresh = (x, True) if x is not None else _full_weight(p, masters)
        del x
        if fresh and (value.device.type == "cpu" or not cpu_offload):
            yield name, rank0_io(lambda: value.detach().reshape(_shape(p)), what)  # already a copy of our own
        else:
            yield name, rank0_io(lambda: _copy(value.reshape(_shape(p)), cpu_offload, torch.float32), what)
        del value
    for name, buf in _persistent_buffers(module):
        yield name, rank0_io(lambda: _copy(buf, cpu_offload, buf.dtype), f"gather {name!r}")


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

    def __call__(self, p: torch.Tensor, what: str) -> Optional[torch.Tensor]:
        """Collective at ZeRO-1/2/3 (the same decision on every rank: it depends on the group's k).
        Every rank prepares its part first and hears whether all did before any data moves."""
        if id(p) not in self.group_of:
            return None
        group = self.base.param_groups[self.group_of[id(p)]]
        if group["k"] == 0:
            return None
        weight = 1 - 1 / self.base.interpolation(group)
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of x into a buffer for all, one all-gather
            ranks = self.opt._get_param_partition_group(p)
            buffer, part = every_rank_io(lambda: self._partition_x(p, weight, ranks), what, group=ranks)
            dist.all_gather_into_tensor(buffer, part, group=ranks)
            return buffer.narrow(0, 0, p.ds_numel).view(p.ds_shape)
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2: this rank's fragment into a zero buffer, one all-reduce
            full = every_rank_io(lambda: self._fragment_x(p, group, weight), what, group=p._dp_group)
            dist.all_reduce(full, group=p._dp_group)
            return full
        master = self.masters.get(id(p), p)  # ZeRO-0: the fp32 copy, or (fp32) the param itself
        return master.detach().float().lerp(self.base.state[master]["z"].float(), weight)

    def _partition_x(self, p: torch.Tensor, weight: float, ranks: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """ZeRO-3: the all-gather's output buffer, this rank's slot of it holding its partition of x."""
        y, _ = self.opt._get_fp32_opt_state_partition(p, release_swap_buffers=True)
        z, _ = self.opt._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key="z")
        buffer = torch.empty(dist.get_world_size(ranks) * y.numel(), dtype=y.dtype, device=p.device)
        part = buffer.narrow(0, y.numel() * dist.get_rank(ranks), y.numel())
        part.copy_(y.lerp(z, weight))  # y and z may be offloaded to the CPU; the gather runs on p's device
        return buffer, part

    def _fragment_x(self, p: torch.Tensor, group: dict, weight: float) -> torch.Tensor:
        """ZeRO-1/2: a zero buffer of the param's size holding this rank's fragment of x."""
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        mapping = p._hp_mapping
        if mapping is not None:  # z read from the live state (DeepSpeed's linked views go stale on a load)
            hp = mapping.get_hp_fragment_address()
            z = self.base.state[group["params"][0]]["z"].narrow(0, hp.start, hp.numel)
            lp = mapping.lp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(mapping.get_hp_fragment().lerp(z, weight))
        return full


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
