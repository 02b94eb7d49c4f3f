"""ZeroScheduleFree state: per-rank dicts, a consolidated single-process dict, DCP sharded dicts.

Every bucket's state is a flat shard [lo, hi) of its unpadded length N, so the consolidated
form concatenates shards and the sharded form is a 1-D Shard(0) DTensor of length N: DCP can
then load it at another world size, because buckets depend only on the params, not on W.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...optim import host_values
from .buckets import Bucket

# ``opt`` below is a ZeroScheduleFree (not imported: optimizer.py imports this module).


def _keys(opt: Any, g: int) -> list[str]:
    """The state keys of param group ``g``'s pieces: z and that group's moments."""
    return ["z", *opt.inner.state_keys(opt.inner.param_groups[g])]


def _set_groups(opt: Any, groups: list[dict[str, Any]]) -> None:
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"the state has {len(groups)} param groups, this optimizer {len(opt.param_groups)}: "
                         "build the optimizer with the same groups as the run that saved it")
    for outer, inner, saved in zip(opt.param_groups, opt.inner.param_groups, groups):
        values = host_values(saved)
        inner.update(values)
        outer.update(values)


def _shard_of(opt: Any, b: Bucket, key: str) -> Tensor:
    """This rank's [lo, hi) of one state key, concatenated over the bucket's pieces (a copy)."""
    parts = [opt.inner.state[piece][key].reshape(-1) for _, piece in b.pieces]
    return torch.cat(parts) if parts else b.master.new_zeros(0)


def _fill_pieces(opt: Any, b: Bucket, key: str, shard: Tensor) -> None:
    at = 0
    for _, piece in b.pieces:
        opt.inner.state[piece][key].reshape(-1).copy_(shard[at:at + piece.numel()])
        at += piece.numel()


def _after_load(opt: Any) -> None:
    opt.forget_saved_y()
    opt.publish()


# ---- per rank ----------------------------------------------------------------------------------
def _layout(opt: Any) -> list[list[int]]:
    return [[b.numel for b in bs] for bs in opt.buckets]


def rank_state_dict(opt: Any) -> dict[str, Any]:
    """This rank's inner optimizer state, its separate fp32 masters, and the layout they fit."""
    return {"zero": {"world_size": opt.buckets[0][0].world, "rank": opt.buckets[0][0].rank,
                     "layout": _layout(opt)},
            "inner": opt.inner.state_dict(),
            "master": [b.master for b in opt.all_buckets() if b.separate_master]}


def load_rank_state_dict(opt: Any, sd: dict[str, Any]) -> None:
    """Load rank_state_dict() output saved by this rank, or slice a full single-process dict."""
    if "zero" not in sd:
        _load_full(opt, sd)
        return
    meta, b0 = sd["zero"], opt.buckets[0][0]
    if (meta["world_size"], meta["rank"], meta["layout"]) != (b0.world, b0.rank, _layout(opt)):
        raise ValueError(f"this state dict was saved by rank {meta['rank']} of {meta['world_size']} with bucket "
                         f"sizes {meta['layout']}; this is rank {b0.rank} of {b0.world} with {_layout(opt)}. "
                         "To change world size use sf_dist.checkpoint.save/load (resharding) or "
                         "consolidated_state_dict()")
    opt.inner.load_state_dict(sd["inner"])
    with torch.no_grad():
        for b, m in zip([b for b in opt.all_buckets() if b.separate_master], sd["master"]):
            b.master.copy_(m)
    opt.pull_counters()
    _after_load(opt)


@torch.no_grad()
def _load_full(opt: Any, sd: dict[str, Any]) -> None:
    """Every rank takes its slices of a single-process state dict (e.g. consolidated_state_dict)."""
    _set_groups(opt, sd["param_groups"])
    index = [i for g in sd["param_groups"] for i in g["params"]]
    if len(index) != sum(len(g["params"]) for g in opt.param_groups):
        raise ValueError(f"the state dict has {len(index)} params, this optimizer "
                         f"{sum(len(g['params']) for g in opt.param_groups)}")
    n = 0
    for g, bs in enumerate(opt.buckets):
        for b in bs:
            for i, piece in b.pieces:
                saved = sd["state"].get(index[n + i])
                if not saved:
                    opt.inner.state.pop(piece, None)
                    continue
                start = max(b.offsets[i], b.lo) - b.offsets[i]
                dtype = opt.inner.param_groups[g].get("state_dtype") or piece.dtype
                opt.inner.state[piece] = {k: saved[k].reshape(-1)[start:start + piece.numel()]
                                          .to(piece.device, dtype, copy=True) for k in _keys(opt, g)}
            if b.separate_master:
                b.master.copy_(b.flat[b.lo:b.hi])
            n += len(b.params)
    _after_load(opt)


# ---- consolidated (one rank gets everything) -------------------------------------------------------
@torch.no_grad()
def consolidated_state_dict(opt: Any, to: int = 0) -> dict[str, Any]:
    """Gather the full state to group rank ``to`` as a plain single-process state dict (on CPU)."""
    opt.inner.init_state()
    pg = opt.process_group
    me = dist.get_rank(pg)
    state: dict[int, dict[str, Tensor]] = {}
    n = 0
    for g, bs in enumerate(opt.buckets):
        for b in bs:
            for key in _keys(opt, g):
                mine = b.master.new_zeros(b.shard)
                mine[:b.hi - b.lo] = _shard_of(opt, b, key)
                parts = [torch.empty_like(mine) for _ in range(b.world)] if me == to else None
                dist.gather(mine, parts, group=pg, group_dst=to)
                if me != to:
                    continue
                flat = torch.cat(parts)[:b.numel].cpu()
                for i, p in enumerate(b.params):
                    state.setdefault(n + i, {})[key] = flat[b.offsets[i]:b.offsets[i + 1]].view_as(p).clone()
            n += len(b.params)
    if me != to:
        return {}
    groups, n = [], 0
    for g in opt.param_groups:
        groups.append({**host_values(g), "params": list(range(n, n + len(g["params"])))})
        n += len(g["params"])
    return {"state": state, "param_groups": groups}


# ---- sharded (torch.distributed.checkpoint) ----------------------------------------------------------
def _mesh(opt: Any, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh
    meshes = opt.__dict__.setdefault("_meshes", {})
    if device_type not in meshes:
        meshes[device_type] = DeviceMesh.from_group(opt.process_group, device_type)
    return meshes[device_type]


def _dtensor(opt: Any, b: Bucket, shard: Tensor):
    from torch.distributed.tensor import DTensor, Shard
    return DTensor.from_local(shard, _mesh(opt, shard.device.type), [Shard(0)], run_check=False,
                              shape=torch.Size([b.numel]), stride=(1,))


@torch.no_grad()
def sharded_state_dict(opt: Any) -> dict[str, Any]:
    """{"param_groups": scalars and hyperparameters, "buckets": {name: {key: DTensor}}}.

    The y of fp32/fp64 params is the model's own weights (saved with the model); bf16/fp16
    params add their fp32 master shard under "master".
    """
    opt.inner.init_state()
    buckets = {}
    for g, bs in enumerate(opt.buckets):
        for j, b in enumerate(bs):
            entry = {key: _dtensor(opt, b, _shard_of(opt, b, key)) for key in _keys(opt, g)}
            if b.separate_master:
                entry["master"] = _dtensor(opt, b, b.master)
            buckets[f"group{g}_bucket{j}"] = entry
    return {"param_groups": [host_values(g) for g in opt.inner.param_groups], "buckets": buckets}


@torch.no_grad()
def load_sharded_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Copy a sharded_state_dict() that DCP filled in place back into the optimizer, then publish y."""
    _set_groups(opt, state["param_groups"])
    opt.inner.init_state()
    for g, bs in enumerate(opt.buckets):
        for j, b in enumerate(bs):
            entry = state["buckets"][f"group{g}_bucket{j}"]
            for key in _keys(opt, g):
                _fill_pieces(opt, b, key, entry[key].to_local())
            if b.separate_master:
                b.master.copy_(entry["master"].to_local())
    _after_load(opt)
