"""FSDP2 (``fully_shard``, DTensor params) and FSDP1 (``FullyShardedDataParallel``) glue.

What the eval API needs of them: whether a model is sharded, dropping gathered weight copies
after a y<->x swap of the shards, and gathering one tensor of x to rank 0 without an all-gather.
"""

from __future__ import annotations

import itertools
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
    if isinstance(value, DTensor) and 0 not in value.device_mesh.mesh.flatten().tolist():
        return None  # a replica on another submesh (e.g. tp=1 of FSDP + TP): rank 0's submesh sends its own
    if isinstance(value, DTensor) and _is_row_sharded(value):
        return _rows_to_rank0(value, x_of)
    if isinstance(value, DTensor) and _is_block_sharded(value):
        return _blocks_to_rank0(value, x_of)
    value = x_of(value)
    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full if rank() == 0 else None
    if is_sharded_tensor(value):
        out = torch.empty(value.shape, dtype=value.dtype, device=_shard_device(value)) if rank() == 0 else None
        value.gather(dst=0, out=out, dtype=value.dtype)  # else float32 buffers: float64 would be rounded
        return out
    return value if rank() == 0 else None


def _is_row_sharded(value: DTensor) -> bool:
    """FSDP2's layout: dim-0 torch.chunk shards over a 1-D mesh."""
    from torch.distributed.tensor import Shard
    return value.device_mesh.ndim == 1 and tuple(value.placements) == (Shard(0),) and value.dim() > 0


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


def _is_block_sharded(value: DTensor) -> bool:
    """Any mesh (HSDP, FSDP + tensor parallel) whose placements are Shard (FSDP over a TP-sharded dim
    included: a strided shard, still one block) or Replicate, not Partial; so each rank's local
    tensor is one block of the global tensor, which DCP's chunk list names."""
    from torch.distributed.tensor import Replicate, Shard
    return all(isinstance(p, (Shard, Replicate)) or type(p).__name__ == "_StridedShard" for p in value.placements) \
        and value.dim() > 0


def _blocks_to_rank0(value: DTensor, x_of: XSource) -> Optional[Tensor]:
    """Stream each block of x to rank 0, once per block: of the replicas along Replicate mesh dims
    only coordinate 0 sends. Each sender first sends its block's offsets and sizes (the layout
    DCP records), then the data; rank 0 alone ever holds the whole tensor."""
    from torch.distributed.tensor import Replicate
    mesh, ndim = value.device_mesh, value.dim()
    replicated = [d for d, p in enumerate(value.placements) if type(p) is Replicate]
    grid = mesh.mesh
    senders = [int(grid[idx]) for idx in _indices(tuple(grid.shape)) if all(idx[d] == 0 for d in replicated)]
    me = rank()
    if me != 0:
        if me in senders:
            chunk = value.__create_chunk_list__()[0]
            dist.send(torch.tensor([*chunk.offsets, *chunk.sizes], dtype=torch.int64, device=comm_device()), dst=0)
            x = x_of.local_x(value)
            if x.numel() > 0:
                dist.send(x.contiguous(), dst=0)
        return None
    local_t = value.to_local()
    out = torch.empty(value.shape, dtype=value.dtype, device=local_t.device)
    for member in senders:
        if member == 0:
            chunk = value.__create_chunk_list__()[0]
            region = out[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))]
            if region.numel() > 0:
                x_of.into(value, region)
            continue
        meta = torch.empty(2 * ndim, dtype=torch.int64, device=comm_device())
        dist.recv(meta, src=member)
        offsets, sizes = meta[:ndim].tolist(), meta[ndim:].tolist()
        if torch.Size(sizes).numel() == 0:
            continue
        block = torch.empty(sizes, dtype=value.dtype, device=local_t.device)
        dist.recv(block, src=member)
        out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].copy_(block)
    return out


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every index of an array of ``shape``, in row-major order (the mesh's rank order)."""
    return list(itertools.product(*(range(n) for n in shape)))


def _shard_device(value: Any) -> torch.device:
    shards = value.local_shards()
    return shards[0].tensor.device if shards else comm_device()
