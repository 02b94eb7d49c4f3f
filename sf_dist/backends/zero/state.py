"""ZeroScheduleFree state: per-rank dicts, a consolidated single-process dict, DCP sharded dicts.

Every bucket's state is a flat shard [lo, hi) of its unpadded length N, so the consolidated
form concatenates shards and the sharded form is a 1-D Shard(0) DTensor of length N: DCP can
then load it at another world size, because buckets depend only on the params, not on W.
Around a ScheduleFreeWrapper the base optimizer's state of each piece joins z under "base."
keys: its elementwise buffers shard like z, its per-param scalars (Adam's step) are one
replicated vector per bucket.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ...distributed import comm_device
from ...optim import host_values
from ...wrapper import BASE, ScheduleFreeWrapper
from .buckets import Bucket

# ``opt`` below is a ZeroScheduleFree (not imported: optimizer.py imports this module).


def _keys(opt: Any, g: int) -> list[str]:
    """The state keys of param group ``g``'s pieces: z and that group's moments."""
    return ["z", *opt.inner.state_keys(opt.inner.param_groups[g])]


def _base(opt: Any) -> Optional[torch.optim.Optimizer]:
    """The base optimizer of a ScheduleFreeWrapper inside (its state is kept beside z), else None."""
    return opt.inner.base if isinstance(opt.inner, ScheduleFreeWrapper) else None


def _groups(g: dict[str, Any], base_group: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A group's saved values: ours, and the base's under "base." keys."""
    return {**host_values(g), **{BASE + k: v for k, v in (base_group or {}).items() if k != "params"}}


def _set_groups(opt: Any, groups: list[dict[str, Any]]) -> None:
    """Take the saved group values (the base's into the base's groups), after checking all of them."""
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"the state has {len(groups)} param groups, this optimizer {len(opt.param_groups)}: "
                         "build the optimizer with the same groups as the run that saved it")
    base = _base(opt)
    saved_base = any(k.startswith(BASE) for g in groups for k in g)
    if saved_base != (base is not None):
        raise ValueError(f"this state dict {'holds' if saved_base else 'lacks'} a base optimizer's state (\"base.\" "
                         f"keys, a ScheduleFreeWrapper's), but this ZeroScheduleFree runs {type(opt.inner).__name__}: "
                         "build the same optimizer_class as the run that saved it")
    theirs = [{k[len(BASE):]: v for k, v in g.items() if k.startswith(BASE)} for g in groups]
    for saved, base_group in zip(theirs, base.param_groups if base is not None else ()):
        if set(saved) != set(base_group) - {"params"}:
            raise ValueError(f"this state dict's base optimizer has the group keys {sorted(saved)}, this "
                             f"{type(base).__name__} {sorted(set(base_group) - {'params'})}: build the same base "
                             "class as the run that saved it")
    for outer, inner, saved in zip(opt.param_groups, opt.inner.param_groups, groups):
        values = host_values({k: v for k, v in saved.items() if not k.startswith(BASE)})
        inner.update(values)
        outer.update(values)
    for saved, base_group in zip(theirs, base.param_groups if base is not None else ()):
        base_group.update(saved)


def _shard_of(state: Any, b: Bucket, key: str, dtype: Optional[torch.dtype] = None) -> Tensor:
    """This rank's [lo, hi) of one state key, concatenated over the bucket's pieces (a copy)."""
    parts = [state[piece][key].reshape(-1) for _, piece in b.pieces]
    return torch.cat(parts) if parts else b.master.new_zeros(0, dtype=dtype)


def _fill_pieces(state: Any, b: Bucket, key: str, shard: Tensor) -> None:
    at = 0
    for _, piece in b.pieces:
        state[piece][key].reshape(-1).copy_(shard[at:at + piece.numel()])
        at += piece.numel()


# ---- the base's state, around a ScheduleFreeWrapper ---------------------------------------------
def _base_keys(opt: Any) -> list[dict[str, tuple[bool, torch.dtype]]]:
    """Per param group, the base's state keys -> (a per-param scalar?, dtype), agreed by every rank
    (one that holds no piece of a group still saves its empty shards). Empty without a wrapper."""
    base = _base(opt)
    if base is None:
        return [{} for _ in opt.buckets]
    mine: list[Optional[dict[str, tuple[bool, torch.dtype]]]] = []
    for bs in opt.buckets:
        pieces = [piece for b in bs for _, piece in b.pieces if base.state.get(piece)]
        mine.append({k: _kind(base, k, v, pieces[0]) for k, v in base.state[pieces[0]].items()} if pieces else None)
    every: list[Any] = [None] * dist.get_world_size(opt.process_group)
    dist.all_gather_object(every, mine, group=opt.process_group)
    out = []
    for g in range(len(opt.buckets)):
        seen = [theirs[g] for theirs in every if theirs[g] is not None]
        if any(s != seen[0] for s in seen):
            raise RuntimeError(f"the ranks' {type(base).__name__} keep different state in param group {g}: {seen}")
        out.append(seen[0] if seen else {})
    return out


def _kind(base: torch.optim.Optimizer, key: str, value: Any, piece: Tensor) -> tuple[bool, torch.dtype]:
    if isinstance(value, Tensor) and value.dim() == 0:
        return True, value.dtype
    if isinstance(value, Tensor) and value.numel() == piece.numel():
        return False, value.dtype
    raise TypeError(f"ZeroScheduleFree cannot shard {type(base).__name__}'s state {key!r} ({type(value).__name__}"
                    f"{' of shape ' + str(tuple(value.shape)) if isinstance(value, Tensor) else ''}): only buffers "
                    "the size of the param and per-param scalar tensors can be saved from slices")


def _base_scalars(opt: Any, keys: list[dict[str, tuple[bool, torch.dtype]]]) -> dict[tuple[int, int, str], Tensor]:
    """Per (group, bucket, scalar key) of the base, each param's value on every rank: the ranks that
    hold a piece of it fill it in, one MAX all-reduce for all (0 for an empty param, held nowhere)."""
    base = _base(opt)
    slots = [(g, j, key) for g, bs in enumerate(opt.buckets) for j in range(len(bs))
             for key, (scalar, _) in keys[g].items() if scalar]
    if not slots:
        return {}
    parts = []
    for g, j, key in slots:
        b = opt.buckets[g][j]
        v = torch.full((len(b.params),), -math.inf, dtype=torch.float64)
        for i, piece in b.pieces:
            v[i] = base.state[piece][key]
        parts.append(v)
    flat = torch.cat(parts)
    if dist.get_world_size(opt.process_group) > 1:
        flat = flat.to(comm_device(opt.process_group))
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=opt.process_group)
        flat = flat.cpu()
    flat[flat == -math.inf] = 0
    out, at = {}, 0
    for (g, j, key), v in zip(slots, parts):
        out[g, j, key] = flat[at:at + v.numel()].to(keys[g][key][1])
        at += v.numel()
    return out


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
    base_state: dict[Tensor, dict[str, Any]] = {}
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
                base_state[piece] = {k[len(BASE):]: v.reshape(-1)[start:start + piece.numel()].clone()
                                     if isinstance(v, Tensor) and v.dim() > 0 else copy.deepcopy(v)
                                     for k, v in saved.items() if k.startswith(BASE)}
            if b.separate_master:
                b.master.copy_(b.flat[b.lo:b.hi])
            n += len(b.params)
    base = _base(opt)
    if base is not None:
        _load_base(base, base_state)
    _after_load(opt)


def _load_base(base: torch.optim.Optimizer, state: dict[Tensor, dict[str, Any]]) -> None:
    """Give the base its pieces' saved state through its own load_state_dict, so torch's rules for
    dtype and device (Adam's step on the param's device when capturable or fused) apply."""
    at = {p: i for i, p in enumerate(p for g in base.param_groups for p in g["params"])}
    groups, n = [], 0
    for g in base.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(n, n + len(g["params"])))})
        n += len(g["params"])
    base.load_state_dict({"state": {at[p]: s for p, s in state.items() if s}, "param_groups": groups})


# ---- consolidated (one rank gets everything) -------------------------------------------------------
def _gather(opt: Any, b: Bucket, shard: Tensor, to: int, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """One key's flat [0, N) of a bucket on group rank ``to`` (on CPU, in ``dtype`` or the master's),
    None on the others."""
    mine = b.master.new_zeros(b.shard, dtype=dtype)
    mine[:b.hi - b.lo] = shard
    parts = [torch.empty_like(mine) for _ in range(b.world)] if dist.get_rank(opt.process_group) == to else None
    dist.gather(mine, parts, group=opt.process_group, group_dst=to)
    return None if parts is None else torch.cat(parts)[:b.numel].cpu()


@torch.no_grad()
def consolidated_state_dict(opt: Any, to: int = 0) -> dict[str, Any]:
    """Gather the full state to group rank ``to`` as a plain single-process state dict (on CPU)."""
    opt.inner.init_state()
    base = _base(opt)
    base_keys = _base_keys(opt)
    scalars = _base_scalars(opt, base_keys)
    mine = dist.get_rank(opt.process_group) == to
    state: dict[int, dict[str, Tensor]] = {}
    n = 0
    for g, bs in enumerate(opt.buckets):
        for j, b in enumerate(bs):
            flats = {key: _gather(opt, b, _shard_of(opt.inner.state, b, key), to) for key in _keys(opt, g)}
            for key, (scalar, dtype) in base_keys[g].items():
                flats[BASE + key] = None if scalar else _gather(opt, b, _shard_of(base.state, b, key, dtype), to, dtype)
            for i, p in enumerate(b.params if mine else ()):
                into = state.setdefault(n + i, {})
                for key, flat in flats.items():
                    into[key] = flat[b.offsets[i]:b.offsets[i + 1]].view_as(p).clone() if flat is not None \
                        else scalars[g, j, key[len(BASE):]][i].clone()
            n += len(b.params)
    if not mine:
        return {}
    groups, n = [], 0
    base_groups = base.param_groups if base is not None else [None] * len(opt.param_groups)
    for g, base_group in zip(opt.param_groups, base_groups):
        groups.append({**_groups(g, base_group), "params": list(range(n, n + len(g["params"])))})
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
    params add their fp32 master shard under "master". Around a ScheduleFreeWrapper, the base's
    buffers are "base.<key>" DTensors and its per-param scalars "base.<key>" vectors.
    """
    opt.inner.init_state()
    base = _base(opt)
    base_keys = _base_keys(opt)
    scalars = _base_scalars(opt, base_keys)
    buckets = {}
    for g, bs in enumerate(opt.buckets):
        for j, b in enumerate(bs):
            entry: dict[str, Any] = {key: _dtensor(opt, b, _shard_of(opt.inner.state, b, key)) for key in _keys(opt, g)}
            for key, (scalar, dtype) in base_keys[g].items():
                entry[BASE + key] = scalars[g, j, key] if scalar else \
                    _dtensor(opt, b, _shard_of(base.state, b, key, dtype))
            if b.separate_master:
                entry["master"] = _dtensor(opt, b, b.master)
            buckets[f"group{g}_bucket{j}"] = entry
    base_groups = base.param_groups if base is not None else [None] * len(opt.inner.param_groups)
    return {"param_groups": [_groups(g, bg) for g, bg in zip(opt.inner.param_groups, base_groups)],
            "buckets": buckets}


@torch.no_grad()
def load_sharded_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Copy a sharded_state_dict() that DCP filled in place back into the optimizer, then publish y."""
    _set_groups(opt, state["param_groups"])
    opt.inner.init_state()
    base = _base(opt)
    for g, bs in enumerate(opt.buckets):
        for j, b in enumerate(bs):
            entry = state["buckets"][f"group{g}_bucket{j}"]
            for key in _keys(opt, g):
                _fill_pieces(opt.inner.state, b, key, entry[key].to_local())
            for key, value in entry.items():
                if not key.startswith(BASE):
                    continue
                if hasattr(value, "to_local"):
                    _fill_pieces(base.state, b, key[len(BASE):], value.to_local())
                else:
                    for i, piece in b.pieces:
                        base.state[piece][key[len(BASE):]].copy_(value[i])
            if b.separate_master:
                b.master.copy_(entry["master"].to_local())
    _after_load(opt)
