"""ZeroScheduleFree: ZeRO-1/2 Schedule-Free for torchrun data parallel, without DDP.

Gradients are averaged by the optimizer (bucketed, launched from gradient hooks during
backward), each rank steps the core optimizer on its even slice of every bucket, and the new
weights are all-gathered into every rank's params.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ...distributed import comm_device, every_rank_io
from ...optim import AdamWScheduleFree, ScheduleFreeOptimizer
from . import state as zstate
from .buckets import Bucket, plan


class ZeroScheduleFree(torch.optim.Optimizer):
    """Schedule-Free with optimizer state and (at stage 2) gradients sharded over data-parallel ranks.

    Do NOT wrap the model in DDP: this optimizer averages the gradients itself. After
    ``loss.backward()`` call ``opt.step()``; ``p.grad`` is None after backward (the reduced
    gradient lives sharded in the optimizer). Construct after the model is on its device.

    >>> opt = ZeroScheduleFree(model.parameters(), sf_dist.AdamWScheduleFree, stage=2, lr=1e-3)
    >>> opt.train()
    >>> loss_fn(model(x), y).backward(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Any], optimizer_class: type[ScheduleFreeOptimizer] = AdamWScheduleFree,
                 stage: int = 2, process_group: Optional[dist.ProcessGroup] = None,
                 bucket_cap_mb: float = 25.0, overlap: bool = True, **optimizer_defaults: Any) -> None:
        if stage not in (1, 2):
            raise ValueError(f"Invalid ZeRO stage: {stage} (expected 1 or 2; for stage 3 use FSDP2 "
                             "with sf_dist.AdamWScheduleFree)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, ScheduleFreeOptimizer)):
            raise TypeError(f"optimizer_class must be an sf_dist Schedule-Free optimizer class, got "
                            f"{optimizer_class!r} (e.g. sf_dist.AdamWScheduleFree)")
        if not dist.is_initialized():
            raise RuntimeError("ZeroScheduleFree needs torch.distributed: call "
                               "dist.init_process_group() first (torchrun sets the env), or use "
                               f"{optimizer_class.__name__} directly for a single process")
        self.process_group = process_group or dist.group.WORLD
        self.stage = stage
        self.overlap = overlap
        groups = _normalize(params)
        _check_same_on_all_ranks(groups, self.process_group)
        cap = max(1, int(bucket_cap_mb * 2**20))
        self.buckets: list[list[Bucket]] = []
        inner_groups = []
        for g in groups:
            bs = [Bucket(ps, self.process_group, stage)
                  for ps in plan(g["params"], max(1, cap // g["params"][0].element_size()))]
            self.buckets.append(bs)
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": [piece for b in bs for _, piece in b.pieces]})
        self.inner = optimizer_class(inner_groups, **optimizer_defaults)
        self.inner.process_group = self.process_group  # ranks agree on mode and finite gradients
        self.inner.params_are_shards = True  # each rank holds its own slices (global sums over ranks)
        super().__init__(groups, self.inner.defaults)
        self.pull_counters()
        self._where = {p: (b, i) for bs in self.buckets for b in bs for i, p in enumerate(b.params)}
        self._saved_y: Optional[list[Tensor]] = None
        self._accumulating = False
        self._launch_order = list(reversed(self.all_buckets()))
        self._next_launch, self._synced = 0, False
        self._broadcast_from_rank0()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for p in self._where if p.requires_grad] if overlap else []
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat buffers and shards are laid out once."""
        if getattr(self, "_built", False):
            raise RuntimeError("ZeroScheduleFree cannot add param groups after construction (its buffers are "
                               "laid out once): pass every group to the constructor")
        super().add_param_group(param_group)

    # ---- mode --------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Steps skipped because some rank's gradient shard held a NaN/Inf (nonfinite="skip")."""
        return self.inner.skipped_steps

    @property
    def train_mode(self) -> bool:
        """True when the params hold y (train), False when they hold x (eval)."""
        return self.inner.train_mode

    @torch.no_grad()
    def train(self) -> None:
        """Put y back in the params: exactly the y that eval() replaced, then one all-gather."""
        if self.train_mode:
            return
        self._check_params()
        if self._saved_y is not None:
            for b, y in zip(self.all_buckets(), self._saved_y):
                b.master.copy_(y)
            for group in self.inner.param_groups:
                group["train_mode"] = True
        else:
            self.inner.train()
        self._saved_y = None
        self.pull_counters()
        self.publish()

    @torch.no_grad()
    def eval(self) -> None:
        """Put x, the eval weights, in the params: swap the local shard, then one all-gather."""
        if not self.train_mode:
            return
        self._check_params()

        def swap_local() -> None:
            self._saved_y = [b.master.clone() for b in self.all_buckets()]
            self.inner.eval()

        try:  # a failure on one rank (an OOM copying y) reaches every rank before the all-gather
            every_rank_io(swap_local, "put x in its shard", group=self.process_group)
        except BaseException:
            self._restore_y()
            raise
        self.pull_counters()
        self.publish()

    def _restore_y(self) -> None:
        """Undo a local eval(): y back in the shard as saved, train mode, nothing gathered."""
        if self._saved_y is not None and len(self._saved_y) == len(self.all_buckets()):
            for b, y in zip(self.all_buckets(), self._saved_y):
                b.master.copy_(y)
        for group in self.inner.param_groups:
            group["train_mode"] = True
        self._saved_y = None

    # ---- gradients and step ------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (no communication), like DDP's.

        >>> with opt.no_sync():
        ...     loss_fn(model(x1), y1).backward()   # micro-batch 1: no traffic
        >>> loss_fn(model(x2), y2).backward()       # last micro-batch: reduces the sum
        """
        before, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = before

    def _on_grad(self, p: Tensor) -> None:
        bucket, i = self._where[p]
        ready = bucket.add_grad(i, p.grad, sync=not self._accumulating)
        p.grad = None
        self._synced = False
        if ready:
            bucket.ready = True
            self._launch_ready()
        bucket.reap(block=False)

    def _launch_ready(self) -> None:
        """Launch ready buckets in one fixed order (the reverse of the layout, as backward runs), so
        that a bucket one rank never completes (a branch it did not take) cannot reorder the
        collectives: the ones after it wait for sync_grads."""
        queue = self._launch_order
        if self._next_launch == len(queue):  # every bucket went out: this is the next backward
            self._next_launch = 0
        while self._next_launch < len(queue) and queue[self._next_launch].ready:
            queue[self._next_launch].ready = False
            queue[self._next_launch].launch()
            self._next_launch += 1

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Reduce whatever backward left behind (un-hooked grads, partial buckets) and wait.

        A param with a gradient on some ranks only gets the average with zeros for the others, as
        under DDP: which params had one anywhere is agreed in one small all-reduce.
        """
        for p, (bucket, i) in self._where.items():
            if p.grad is not None:
                bucket.add_grad(i, p.grad, sync=False)
                p.grad = None
                self._synced = False
        if self._synced and not any(b.has_local for b in self.all_buckets()):
            return  # nothing new since the last sync (clip_grad_norm_ then step)
        for i, b in enumerate(self._launch_order):  # the rest of this round, then grads of a later backward
            if i >= self._next_launch or b.has_local:
                b.ready = False
                b.launch()
        self._next_launch = 0
        flags = work = None
        if dist.get_world_size(self.process_group) > 1:
            flags = torch.tensor([float(h) for b in self.all_buckets() for h in b.had_grad],
                                 device=comm_device(self.process_group))
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True)
        for b in self.all_buckets():
            b.reap(block=True)
        if work is not None:
            work.wait()
            used = iter(flags.tolist())
            for b in self.all_buckets():
                b.had_grad = [bool(next(used)) for _ in b.had_grad]
        self._synced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the averaged gradients by their global norm (one scalar collective); return the norm.

        Same rule as ``torch.nn.utils.clip_grad_norm_`` on the full, unsharded gradients.
        """
        self.sync_grads()
        grads = [b.grad for b in self.all_buckets() if b.grad is not None]
        device = self.buckets[0][0].flat.device
        norm_type = float(norm_type)
        if norm_type == float("inf"):
            local = max((g.abs().max().float() for g in grads if g.numel()), default=torch.zeros((), device=device))
            total = local.to(device, torch.float64).clone()
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.process_group)
        else:
            total = sum((g.double().abs().pow(norm_type).sum().to(device) for g in grads),
                        torch.zeros((), dtype=torch.float64, device=device))
            dist.all_reduce(total, group=self.process_group)
            total = total.pow(1.0 / norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *, loss: Any = None) -> Optional[float]:
        """Average the gradients, step this rank's shard, all-gather the new y into the params.

        Raises in eval mode; skips on every rank if any rank's gradient shard holds a NaN/Inf
        (the core's ``nonfinite="skip"``, agreed in one small all-reduce). ``loss`` (or the
        closure's) reaches an inner optimizer that takes one (AdamCScheduleFreePlus).
        """
        if loss is not None and not self.inner.takes_loss:
            raise TypeError(f"step(loss=...) is for optimizers that use the loss; {type(self.inner).__name__} "
                            "does not: call step() without it")
        if closure is not None and self.train_mode:
            with torch.enable_grad():
                loss = closure()
        self.sync_grads()
        self._check_params()
        self._push_hyperparameters()
        for b in self.all_buckets():
            b.attach_grads()
        # the agreement on mode and finiteness happens in here
        self.inner.step(loss=loss) if self.inner.takes_loss and loss is not None else self.inner.step()
        self._synced = False  # the next step syncs on every rank, even one that gets no gradient
        self.pull_counters()
        self.publish()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the sharded gradients (and any local .grad), ready for the next backward."""
        for p in self._where:
            p.grad = None
        for b in self.all_buckets():
            b.zero_grad()
        self._next_launch, self._synced = 0, False

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state; reload it with the same world size and model."""
        return zstate.rank_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() of this rank, or a full single-process one (each rank slices it)."""
        zstate.load_rank_state_dict(self, state_dict)

    def consolidated_state_dict(self, to: int = 0) -> dict[str, Any]:
        """Rank ``to`` gets a plain single-process state dict (the core classes load it); others {}."""
        return zstate.consolidated_state_dict(self, to)

    def sharded_state_dict(self) -> dict[str, Any]:
        """A DCP-ready dict: 1-D Shard(0) DTensors per bucket plus the group scalars."""
        return zstate.sharded_state_dict(self)

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Take the values of a sharded_state_dict() that DCP has loaded in place."""
        zstate.load_sharded_state_dict(self, state)

    def held_numel(self) -> dict[str, int]:
        """Elements the optimizer holds on this rank: state, master copies, gradient shards."""
        held = {"state": sum(t.numel() for s in self.inner.state.values() for t in s.values()
                             if isinstance(t, Tensor)), "master": 0, "grad": 0}
        for b in self.all_buckets():
            for k, v in b.held_numel().items():
                held[k] += v
        return held

    # ---- internals ---------------------------------------------------------------------------
    def all_buckets(self) -> list[Bucket]:
        """Every bucket of every param group, in order."""
        return [b for bs in self.buckets for b in bs]

    @torch.no_grad()
    def _check_params(self) -> None:
        """Fail on params re-allocated behind our back; re-read masters of params written in place."""
        for b in self.all_buckets():
            for p, off in zip(b.params, b.offsets):
                if p.numel() and p.data_ptr() != b.flat[off:].data_ptr():
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} no longer lives in ZeroScheduleFree's buffer "
                        "(model.to(), load_state_dict(assign=True) or a new .data after the optimizer was "
                        "built): build the optimizer after moving or loading the model")
            if b.separate_master and not torch.equal(b.flat[b.lo:b.hi], b.master.to(b.flat.dtype)):
                b.master.copy_(b.flat[b.lo:b.hi])  # e.g. model.load_state_dict() after construction

    def forget_saved_y(self) -> None:
        """Drop the y kept by eval(): after a state load, train() re-derives y from the loaded x and z."""
        self._saved_y = None

    def publish(self) -> None:
        """All-gather every bucket's updated slice into every rank's params."""
        works = [b.publish() for b in self.all_buckets()]
        for w in works:
            if w is not None:
                w.wait()

    def _push_hyperparameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params" and k not in self.inner.counters})

    def pull_counters(self) -> None:
        """Copy the inner optimizer's step counters into our param_groups (what users and checkpoints read)."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            outer.update({k: inner[k] for k in self.inner.counters})

    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        src = dist.get_global_rank(self.process_group, 0)
        for b in self.all_buckets():
            dist.broadcast(b.flat, src=src, group=self.process_group)
            if b.separate_master:
                b.master.copy_(b.flat[b.lo:b.hi])


def _normalize(params: Iterable[Any]) -> list[dict[str, Any]]:
    """The param groups as dicts with a non-empty list of params each."""
    params = list(params)
    if not params:
        raise ValueError("ZeroScheduleFree got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out, seen = [], {}
    for i, g in enumerate(groups):
        ps = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
        if not ps:
            raise ValueError(f"param group {i} has no parameters; drop it or give it some")
        for j, p in enumerate(ps):
            if id(p) in seen:
                raise ValueError(f"param {j} of group {i} (shape {tuple(p.shape)}) is also param {seen[id(p)][1]} "
                                 f"of group {seen[id(p)][0]}: pass each parameter once")
            seen[id(p)] = (i, j)
        out.append({**g, "params": ps})
    return out


def _check_same_on_all_ranks(groups: list[dict[str, Any]], pg: dist.ProcessGroup) -> None:
    """Raise on every rank, naming the first difference, if ranks were given different params."""
    mine = [[(tuple(p.shape), str(p.dtype)) for p in g["params"]] for g in groups]
    every: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(every, mine, group=pg)
    for rank, theirs in enumerate(every):
        if theirs == every[0]:
            continue
        if len(theirs) != len(every[0]):
            raise ValueError(f"rank {rank} has {len(theirs)} param groups but rank 0 has {len(every[0])}: "
                             "every rank must build the same model and groups")
        for gi, (a, b) in enumerate(zip(every[0], theirs)):
            if len(a) != len(b):
                raise ValueError(f"param group {gi} has {len(b)} params on rank {rank} but {len(a)} on "
                                 "rank 0: every rank must build the same model and groups")
            for pi, (pa, pb) in enumerate(zip(a, b)):
                if pa != pb:
                    raise ValueError(f"param {pi} of group {gi} is {pb[0]} {pb[1]} on rank {rank} but "
                                     f"{pa[0]} {pa[1]} on rank 0: every rank must build the same model")
