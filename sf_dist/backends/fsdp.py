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

from ..distributed import comm_device, every_rank_io, rank, rank0_io

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


def gather_x(value: Any, x_of: XSource, name: str = "a tensor") -> Optional[Tensor]:
    """The full x of ``value`` on rank 0 (None on the others); a collective on every rank.

    Each rank first prepares its part (where an OOM or any other error would strike), then every rank
    hears whether all did: a failure on any rank raises on every rank, naming it, before any data moves."""
    what = f"gather x of {name!r}"
    if isinstance(value, DTensor) and 0 not in value.device_mesh.mesh.flatten().tolist():
        # a replica on another submesh (e.g. tp=1 of FSDP + TP): rank 0's submesh sends its own, on a mesh
        # of the same layout; join as many agreements as rank 0's gather of that layout holds
        for _ in range(2 if not _is_row_sharded(value) and _is_block_sharded(value) else 1):
            every_rank_io(lambda: None, what)
        return None
    if isinstance(value, DTensor) and _is_row_sharded(value):
        return _rows_to_rank0(value, x_of, what)
    if isinstance(value, DTensor) and _is_block_sharded(value):
        return _blocks_to_rank0(value, x_of, what)
    if is_sharded_tensor(value):
        return _shards_to_rank0(value, what)
    if isinstance(value, DTensor):
        full = every_rank_io(lambda: x_of(value), what).full_tensor()
        return full if rank() == 0 else None
    return rank0_io(lambda: x_of(value), what)


def _is_row_sharded(value: DTensor) -> bool:
    """FSDP2's layout: dim-0 torch.chunk shards over a 1-D mesh."""
    from torch.distributed.tensor import Shard
    return value.device_mesh.ndim == 1 and tuple(value.placements) == (Shard(0),) and value.dim() > 0


def _rows_to_rank0(value: DTensor, x_of: XSource, what: str) -> Optional[Tensor]:
    """Send each rank's rows of x straight into rank 0's output, where rank 0 derives its own
    rows in place: only rank 0 ever holds the whole tensor, once (full_tensor() would
    all-gather it onto every rank)."""
    group, shard = value.device_mesh.get_group(), value.to_local()
    members = value.device_mesh.mesh.tolist()
    rows, chunk = value.shape[0], -(-value.shape[0] // len(members))
    bounds = [(min(i * chunk, rows), min((i + 1) * chunk, rows)) for i in range(len(members))]

    def prepare() -> Optional[Tensor]:
        if rank() != 0:
            return x_of.local_x(value).contiguous() if shard.numel() > 0 else None
        out = torch.empty(value.shape, dtype=value.dtype, device=shard.device)
        lo, hi = bounds[members.index(0)]
        if out[lo:hi].numel() > 0:
            x_of.into(value, out[lo:hi])
        return out

    part = every_rank_io(prepare, what)
    if rank() != 0:
        if part is not None:
            dist.send(part, dst=0, group=group)
        return None
    for member, (lo, hi) in zip(members, bounds):
        if member != 0 and part[lo:hi].numel() > 0:
            dist.recv(part[lo:hi], src=member, group=group)
    return part


def _is_block_sharded(value: DTensor) -> bool:
    """Any mesh (HSDP, FSDP + tensor parallel) whose placements are Shard (FSDP over a TP-sharded dim
    included: a strided shard, still one block) or Replicate, not Partial; so each rank's local
    tensor is one block of the global tensor, which DCP's chunk list names."""
    from torch.distributed.tensor import Replicate, Shard
    return all(isinstance(p, (Shard, Replicate)) or type(p).__name__ == "_StridedShard" for p in value.placements) \
        and value.dim() > 0


def _blocks_to_rank0(value: DTensor, x_of: XSource, what: str) -> Optional[Tensor]:
    """Stream each block of x to rank 0, once per block: of the replicas along Replicate mesh dims
    only coordinate 0 sends. Each sender first sends its block's offsets and sizes (the layout
    DCP records); once rank 0 has its output and one block buffer, the data. Rank 0 alone ever
    holds the whole tensor."""
    from torch.distributed.tensor import Replicate
    ndim = value.dim()
    replicated = [d for d, p in enumerate(value.placements) if type(p) is Replicate]
    grid = value.device_mesh.mesh
    senders = [int(grid[idx]) for idx in _indices(tuple(grid.shape)) if all(idx[d] == 0 for d in replicated)]
    me = rank()

    def prepare_block() -> Optional[tuple[Tensor, Tensor]]:
        if me == 0 or me not in senders:
            return None
        chunk = value.__create_chunk_list__()[0]
        meta = torch.tensor([*chunk.offsets, *chunk.sizes], dtype=torch.int64, device=comm_device())
        return meta, x_of.local_x(value).contiguous()

    mine = every_rank_io(prepare_block, what)
    if me != 0:
        if mine is not None:
            dist.send(mine[0], dst=0)
        every_rank_io(lambda: None, what)  # rank 0 allocates its output
        if mine is not None and mine[1].numel() > 0:
            dist.send(mine[1], dst=0)
        return None
    layout = {}
    for member in senders:
        if member == 0:
            continue
        meta = torch.empty(2 * ndim, dtype=torch.int64, device=comm_device())
        dist.recv(meta, src=member)
        layout[member] = (meta[:ndim].tolist(), meta[ndim:].tolist())

    def prepare_out() -> tuple[Tensor, Tensor]:
        local_t = value.to_local()
        out = torch.empty(value.shape, dtype=value.dtype, device=local_t.device)
        if 0 in senders:
            chunk = value.__create_chunk_list__()[0]
            region = out[_region(chunk.offsets, chunk.sizes)]
            if region.numel() > 0:
                x_of.into(value, region)
        largest = max((torch.Size(sizes).numel() for _, sizes in layout.values()), default=0)
        return out, torch.empty(largest, dtype=value.dtype, device=local_t.device)

    out, buffer = every_rank_io(prepare_out, what)
    for member, (offsets, sizes) in layout.items():
        n = torch.Size(sizes).numel()
        if n == 0:
            continue
        block = buffer[:n].view(sizes)
        dist.recv(block, src=member)
        out[_region(offsets, sizes)].copy_(block)
    return out


def _shards_to_rank0(value: Any, what: str) -> Optional[Tensor]:
    """FSDP1's ShardedTensor: rank 0 knows every shard's place from its metadata; the other owners
    send theirs once rank 0 has its output and one shard buffer (ShardedTensor.gather would pad
    every rank's shards into a buffer the size of the world's)."""
    group = getattr(value, "_process_group", None)  # FSDP1 shards over the world, or a node (hybrid)
    world = group is None or group is dist.group.WORLD
    owner = (lambda r: r) if world else (lambda r: dist.get_global_rank(group, r))
    shards = [(owner(md.placement.rank()), md.shard_offsets, md.shard_sizes)
              for md in value.metadata().shards_metadata if torch.Size(md.shard_sizes).numel() > 0]
    mine = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
    me = rank()
    if not world and 0 not in dist.get_process_group_ranks(group):
        every_rank_io(lambda: None, what)
        return None  # a replica of another node: rank 0's node sends its own

    def prepare() -> Any:
        if me != 0:
            return [mine[tuple(offsets)].contiguous() for r, offsets, _ in shards if r == me]
        out = torch.empty(value.shape, dtype=value.dtype, device=_shard_device(value))
        for r, offsets, sizes in shards:
            if r == 0:
                out[_region(offsets, sizes)].copy_(mine[tuple(offsets)].view(sizes))
        largest = max((torch.Size(sizes).numel() for r, _, sizes in shards if r != 0), default=0)
        return out, torch.empty(largest, dtype=value.dtype, device=out.device)

    part = every_rank_io(prepare, what)
    if me != 0:
        for tensor in part:
            dist.send(tensor, dst=0)
        return None
    out, buffer = part
    for r, offsets, sizes in shards:
        if r != 0:
            block = buffer[:torch.Size(sizes).numel()].view(sizes)
            dist.recv(block, src=r)
            out[_region(offsets, sizes)].copy_(block)
    return out


def _region(offsets: Any, sizes: Any) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every index of an array of ``shape``, in row-major order (the mesh's rank order)."""
    return list(itertools.product(*(range(n) for n in shape)))


def _shard_device(value: Any) -> torch.device:
    shards = value.local_shards()
    return shards[0].tensor.device if shards else comm_device()
