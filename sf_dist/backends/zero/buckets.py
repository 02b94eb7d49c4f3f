"""Flat buckets for ZeRO: same-dtype runs of params viewed as one buffer, split evenly over ranks.

A bucket of N elements is padded to W*S (S = ceil(N/W)); rank r owns [r*S, min((r+1)*S, N)),
the torch.chunk layout, so its shard is a 1-D DTensor Shard(0) of the unpadded length. The
params are re-pointed to views of the padded buffer, so one all-gather refreshes all of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)

# The non-deprecated names appeared in torch 2.12; older releases only have the *_tensor ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def plan(params: list[Tensor], cap_numel: int) -> list[list[Tensor]]:
    """Split one group's params into buckets: consecutive same-dtype/device runs of <= cap_numel.

    Depends only on the params' shapes and dtypes, never on the world size, so checkpoints
    keyed by bucket reshard across world sizes.
    """
    buckets: list[list[Tensor]] = []
    size = 0
    for p in params:
        if buckets and _same_kind(buckets[-1][0], p) and size + p.numel() <= cap_numel:
            buckets[-1].append(p)
            size += p.numel()
        else:
            buckets.append([p])
            size = p.numel()
    return buckets


def _same_kind(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device


class Bucket:
    """One flat buffer of params, this rank's master shard of it, and its gradient reduction."""

    def __init__(self, params: list[Tensor], group: dist.ProcessGroup, stage: int) -> None:
        self.params = params
        self.group = group
        self.stage = stage
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = self.offsets[-1]
        self.shard = math.ceil(self.numel / self.world) if self.numel else 0
        self.lo = min(self.rank * self.shard, self.numel)
        self.hi = min(self.lo + self.shard, self.numel)
        p0 = params[0]
        self.flat = torch.zeros(self.world * self.shard, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                self.flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.flat[off:off + p.numel()].view_as(p)
        master_dtype = torch.float32 if p0.dtype in LOW_PRECISION else p0.dtype
        own = self.flat[self.lo:self.hi]
        # fp32/fp64 params are their own master: the shard is a view, stepping it updates the param.
        self.separate_master = master_dtype != p0.dtype
        self.master = own.to(master_dtype) if self.separate_master else own
        self.pieces: list[tuple[int, Tensor]] = []  # (param index, view of master)
        for i, p in enumerate(params):
            a, b = max(self.offsets[i], self.lo), min(self.offsets[i + 1], self.hi)
            if a < b:
                self.pieces.append((i, self.master[a - self.lo:b - self.lo]))
        self.grad: Optional[Tensor] = None  # reduced, averaged gradient of [lo, hi), master dtype
        self.had_grad = [False] * len(params)
        self._local: Optional[Tensor] = None  # this backward's local grads, padded flat
        self._fresh = [False] * len(params)  # which params of _local this backward has written
        self._expected = sum(p.requires_grad for p in params)  # hook reports that complete a backward
        self._pending = self._expected
        self.ready = False  # complete this backward, waiting for its turn to launch
        self._inflight: list[tuple[Optional[dist.Work], Tensor, Tensor]] = []

    # ---- gradients ---------------------------------------------------------------------------
    def add_grad(self, i: int, grad: Tensor, sync: bool) -> bool:
        """Accumulate param i's local gradient; return whether, with ``sync``, every param of the
        bucket has reported this backward (then it is ready to launch)."""
        if grad.layout != torch.strided:
            raise RuntimeError(f"ZeroScheduleFree does not support sparse gradients (a param of shape "
                               f"{tuple(self.params[i].shape)} got a {grad.layout} gradient): use dense "
                               "gradients, e.g. nn.Embedding(..., sparse=False)")
        if self._local is None:
            self._local = torch.empty_like(self.flat)
            self._fresh = [False] * len(self.params)
        dst = self._local[self.offsets[i]:self.offsets[i + 1]]
        if self._fresh[i]:  # a second backward before this bucket launched: accumulate
            dst.add_(grad.reshape(-1))
        else:
            dst.copy_(grad.reshape(-1))
            self._fresh[i] = True
        self.had_grad[i] = True
        if sync:
            self._pending -= 1
        return sync and self._pending == 0

    @property
    def has_local(self) -> bool:
        """Whether local gradients wait to be reduced."""
        return self._local is not None

    def launch(self) -> None:
        """Start the async reduction of this backward's local grads. Every rank launches every bucket
        at every sync, with zeros where it had no gradient, so the collectives always pair."""
        if self._local is None:
            self._local = torch.zeros_like(self.flat)
            self._fresh = [False] * len(self.params)
        local, self._local, self._pending = self._local, None, self._expected
        for i, fresh in enumerate(self._fresh):
            if not fresh:  # no gradient this backward: contribute zeros
                local[self.offsets[i]:self.offsets[i + 1]].zero_()
        local[self.numel:].zero_()
        if self.world == 1:  # nothing to reduce
            work, out = None, local
        elif self.stage == 2:
            out = torch.empty(self.shard, dtype=local.dtype, device=local.device)
            work = _reduce_scatter(out, local, group=self.group, async_op=True)
        else:
            out = local
            work = dist.all_reduce(local, group=self.group, async_op=True)
        self._inflight.append((work, local, out))

    def reap(self, block: bool) -> None:
        """Fold finished reductions into ``self.grad``; wait for all of them when ``block``."""
        while self._inflight and (block or self._inflight[0][0] is None or self._inflight[0][0].is_completed()):
            work, _, out = self._inflight.pop(0)
            if work is not None:
                work.wait()
            mine = out[:self.hi - self.lo] if self.stage == 2 else out[self.lo:self.hi]
            if self.grad is None:
                self.grad = mine.div(self.world) if mine.dtype == self.master.dtype else \
                    mine.to(self.master.dtype).div_(self.world)
            else:
                self.grad.add_(mine.to(self.master.dtype), alpha=1.0 / self.world)

    def attach_grads(self) -> None:
        """Give each master piece its gradient view, or None where the param had no gradient."""
        for i, piece in self.pieces:
            if self.had_grad[i] and self.grad is not None:
                a = max(self.offsets[i], self.lo) - self.lo
                piece.grad = self.grad[a:a + piece.numel()]
            else:
                piece.grad = None

    def zero_grad(self) -> None:
        """Drop reduced and pending gradients (waiting out any reduction still in flight)."""
        self.reap(block=True)
        self.grad, self._local, self._pending, self.ready = None, None, self._expected, False
        self.had_grad = [False] * len(self.params)
        for _, piece in self.pieces:
            piece.grad = None

    # ---- weights -----------------------------------------------------------------------------
    def publish(self) -> Optional[dist.Work]:
        """Write the master shard into this rank's slice and start the all-gather of all slices."""
        own = self.flat[self.shard * self.rank:self.shard * (self.rank + 1)]
        if self.separate_master:
            own[:self.hi - self.lo].copy_(self.master)
        if self.world == 1:
            return None
        return _all_gather(self.flat, own, group=self.group, async_op=True)

    def held_numel(self) -> dict[str, int]:
        """Elements this bucket adds on this rank beyond the params: master copy and grad shard."""
        return {"master": self.master.numel() if self.separate_master else 0,
                "grad": 0 if self.grad is None else self.grad.numel()}
