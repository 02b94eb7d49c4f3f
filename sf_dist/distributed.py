"""Rank helpers: is a process group up, which rank is this, and the small agreements every rank hears.

Anything here is a collective when more than one rank is up: call it on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # torch builds without distributed
    DTensor, Replicate = (), ()  # type: ignore[assignment,misc]

__all__ = ["multi_rank", "rank", "comm_device", "agreed_train_mode", "rank0_io", "every_rank_io", "is_shard",
           "replicas"]


def multi_rank(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether ``group`` (default: every rank) is an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a small flag tensor must live for ``group``'s backend: CPU for gloo/MPI, else the
    current accelerator (NCCL), whatever device this rank's params are on (it may own none)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if hasattr(torch, "accelerator") and torch.accelerator.current_accelerator() is not None:  # torch >= 2.6
        return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def agreed_train_mode(optimizer: Any) -> bool:
    """The optimizer's mode, checked to be the same on every rank (one tiny all-reduce).

    Raises RuntimeError when ranks disagree, so no export mixes x shards with y shards.
    """
    mode = bool(optimizer.train_mode)
    if not multi_rank():
        return mode
    flags = torch.tensor([float(mode), -float(mode)], device=comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item() != -flags[1].item():
        raise RuntimeError(
            f"ranks disagree on the optimizer mode (rank {rank()} has train_mode={mode}, another "
            "rank differs): call optimizer.train() or optimizer.eval() on every rank, not on one, "
            "before exporting or checkpointing"
        )
    return mode


def rank0_io(action: Callable[[], Any], what: str, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Run a file-system ``action`` on rank 0 and tell every rank whether it worked, so that a
    failure of any type raises everywhere instead of leaving the other ranks waiting in a collective.

    >>> writer = rank0_io(lambda: open(path, "wb"), f"open {path}")   # None on the other ranks
    """
    return _agreed(action, what, here=rank() == 0, group=group)


def every_rank_io(action: Callable[[], Any], what: str, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Run ``action`` on every rank of ``group``; if it fails on any rank, every rank raises (the failing
    ones their own error, the others a RuntimeError naming the rank and its error), still in step.

    One one-element all-reduce when every rank succeeded; the causes travel only after a failure."""
    return _agreed(action, what, here=True, group=group)


def _agreed(action: Callable[[], Any], what: str, here: bool, group: Optional[dist.ProcessGroup]) -> Any:
    result, error = None, None
    if here:
        try:
            result = action()
        except BaseException as e:  # any type: the other ranks must hear of it (then it is re-raised)
            error = e
    if multi_rank(group):
        failures = torch.tensor([float(error is not None)], device=comm_device(group))
        dist.all_reduce(failures, group=group)  # every rank joins this one exchange: collectives stay paired
        if failures.item() > 0:
            mine = None if error is None else f"{type(error).__name__}: {error}"
            reports: list[Optional[str]] = [None] * dist.get_world_size(group)
            dist.all_gather_object(reports, mine, group=group)
            if error is None:
                r, message = next((r, m) for r, m in enumerate(reports) if m is not None)
                if group is not None and group is not dist.group.WORLD:
                    r = dist.get_global_rank(group, r)
                raise RuntimeError(f"rank {r} could not {what}: {message}")
    if error is not None:
        raise error
    return result


def is_shard(p: torch.Tensor) -> bool:
    """Whether ``p`` holds part of a larger tensor: a DTensor sharded on some mesh dim, an FSDP1
    FlatParameter, or an original param FSDP1 flattened into one (use_orig_params; torch marks it
    ``_fsdp_flattened``; under NO_SHARD those are whole copies, yet this says True)."""
    if isinstance(p, DTensor):
        return any(not isinstance(pl, Replicate) for pl in p.placements)
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


def replicas(p: torch.Tensor, group: Optional[dist.ProcessGroup] = None, shards: Optional[bool] = None) -> int:
    """How many ranks of ``group`` hold the same values as this rank's part of ``p``: a global sum
    over ``group`` of per-rank partial sums divided by this counts every element once.

    DTensors: the mesh dims ``p`` is replicated on. Other tensors: 1 if they are shards (``shards``,
    or detected as in :func:`is_shard`), else every rank of ``group`` (DDP replicas, one process)."""
    if isinstance(p, DTensor):
        n = 1
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Replicate):
                n *= p.device_mesh.size(dim)
        return n
    if shards if shards is not None else is_shard(p):
        return 1
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
