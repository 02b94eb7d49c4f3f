"""FSDP2 (``fully_shard``, DTensor params) and FSDP1 (``FullyShardedDataParallel``) glue.

What the eval API needs of them: whether a model is sharded, dropping gathered weight copies
after a y<->x swap of the shards, and gathering one tensor of x to rank 0 without an all-gather.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import comm_device, rank

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch builds without distributed
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["is_fsdp1", "is_sharded", "is_sharded_tensor", "drop_gathered_copies", "gather_x", "XSource"]


class XSource(Protocol):
    """How weights.py turns a state-dict value into x: whole (call), this rank's part, or into a buffer."""

    def __call__(self, value: Any) -> Any: ...

    def local_x(self, value: Tensor) -> Tensor: ...

    def into(self, value: Tensor, dest: Tensor) -> None: ...


def is_fsdp1(model: nn.Module) -> bool:
    """Whether any submodule is an FSDP1 unit."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_sharded(model: nn.Module) -> bool:
    """FSDP1 or FSDP2, whose state dicts are taken on every rank (DCP, gathers): a mode check there
    cannot hang a rank-0-only ``torch.save(model.state_dict())`` as it could on DDP."""
    return is_fsdp1(model) or any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded_tensor(value: Any) -> bool:
    """FSDP1's ShardedTensor (a Tensor subclass whose data lives in local_shards())."""
    return hasattr(value, "local_shards")


def drop_gathered_copies(model: nn.Module) -> None:
    """FSDP2 and FSDP1 keep some units' gathered weights after a no-grad forward (the root's, or
    any that does not reshard after forward); a swap of the shards would not reach that copy and
    the next forward would silently use the old weights, so free them."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
        elif isinstance(module, FullyShardedDataParallel):
            _reshard_fsdp1(module)


def _reshard_fsdp1(module: nn.Module) -> None:
    """FSDP1 has no public reshard(): free a unit's gathered flat parameter through its handle,
    as FSDP1 itself does after backward."""
    from torch.distributed.fsdp._runtime_utils import _reshard
    handle = module._handle
    if handle is None or not hasattr(handle.flat_param, "_full_param_padded"):
        return  # no forward yet: nothing was ever gathered (FSDP1 builds that buffer lazily)
    if handle.uses_sharded_strategy and not handle.needs_unshard():
        _reshard(module, handle, free_unsharded_flat_param=True)


def gather_x(value: Any, x_of: XSource) -> Optional[Tensor]:
    """The full x of ``value`` on rank 0 (None on the others); a collective for sharded values."""
    if isinstance(value, DTensor) and _is_row_sharded(value):
        return _rows_to_rank0(value, x_of)
    value = x_of(value)
    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full if rank() == 0 else None
    if is_sharded_tensor(value):
        out = torch.empty(value.shape, dtype=value.dtype, device=_shard_device(value)) if rank() == 0 else None
        value.gather(dst=0, out=out)
        return out
    return value if rank() == 0 else None


def _is_row_sharded(value: DTensor) -> bool:
    """FSDP2's layout: dim-0 torch.chunk shards over a 1-D mesh that includes global rank 0."""
    from torch.distributed.tensor import Shard
    mesh = value.device_mesh
    return mesh.ndim == 1 and tuple(value.placements) == (Shard(0),) and value.dim() > 0 \
        and 0 in mesh.mesh.tolist()


def _rows_to_rank0(value: DTensor, x_of: XSource) -> Optional[Tensor]:
    """Send each rank's rows of x straight into rank 0's output, where rank 0 derives its own
    rows in place: only rank 0 ever holds the whole tensor, once (full_tensor() would
    all-gather it onto every rank)."""
    group, shard = value.device_mesh.get_group(), value.to_local()
    members = value.device_mesh.mesh.tolist()
    rows, chunk = value.shape[0], -(-value.shape[0] // len(members))
    if rank() != 0:
        if shard.numel() > 0:
            dist.send(x_of.local_x(value).contiguous(), dst=0, group=group)
        return None
    out = torch.empty(value.shape, dtype=value.dtype, device=shard.device)
    for i, member in enumerate(members):
        lo, hi = min(i * chunk, rows), min((i + 1) * chunk, rows)
        if hi == lo or out[lo:hi].numel() == 0:
            continue
        if member == 0:
            x_of.into(value, out[lo:hi])
        else:
            dist.recv(out[lo:hi], src=member, group=group)
    return out


def _shard_device(value: Any) -> torch.device:
    shards = value.local_shards()
    return shards[0].tensor.device if shards else comm_device()
