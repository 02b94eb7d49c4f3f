"""Offline export of x, the Schedule-Free eval weights, from a DeepSpeed ZeRO checkpoint.

DeepSpeed's zero_to_fp32 rebuilds the fp32 masters, which hold y while training. This rebuilds
them too, on a machine with no GPU and no process group, but first turns each rank's flat
partition into x = lerp(y, z, 1 - 1/b1) with the b1 saved in its param group (a checkpoint saved
in eval mode already holds x). Usage::

    python -m sf_dist.export CHECKPOINT_DIR OUT.safetensors [--tag TAG]

CHECKPOINT_DIR is the directory given to ``engine.save_checkpoint`` (the tag is read from its
``latest`` file unless ``--tag`` names one) or a tag directory itself. OUT gets fp32 params and
the module's buffers (as saved) under plain module names, ready for ``model.load_state_dict``.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import math
import os
import pickle
import re
from typing import Any, Callable, Optional, Union

import torch

from ...safetensors_stream import open_writer

# Keys of DeepSpeed's checkpoint files (deepspeed/checkpoint/constants.py), kept here so that
# exporting needs torch and safetensors only, not DeepSpeed.
_OPTIM = "optimizer_state_dict"
_BASE_STATE = "base_optimizer_state"
_FP32_12 = "single_partition_of_fp32_groups"
_FP32_3 = "fp32_flat_groups"
_GROUP_PADDINGS = "group_paddings"
_PARAM_PADDINGS = "param_alignment_paddings"
_PARTITION_COUNT = "partition_count"
_ZERO_STAGE = "zero_stage"


def export(checkpoint_dir: str, out: str, tag: Optional[str] = None,
           max_shard_size: Union[int, str, None] = None) -> list[str]:
    """Write x from a DeepSpeed checkpoint to ``out`` (safetensors, replaced atomically) and return the
    names. With ``max_shard_size``, ``out`` is a directory in the Hugging Face sharded layout. One param
    is held at a time: each is cut from the memory-mapped partitions and turned into x as it is written."""
    plan = _plan(checkpoint_dir, tag)
    writer = open_writer(out, [(name, dtype, shape) for name, dtype, shape, _ in plan], max_shard_size)
    try:
        for name, _, _, make in plan:
            writer.write(name, make())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return [name for name, _, _, _ in plan]


def eval_state_dict_from_checkpoint(checkpoint_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """x of every trained param (fp32) plus buffers and frozen params, by plain module name."""
    return {name: make() for name, _, _, make in _plan(checkpoint_dir, tag)}


_Plan = list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]


def _plan(checkpoint_dir: str, tag: Optional[str]) -> _Plan:
    """(name, dtype, shape, make the tensor) for buffers, frozen params, trained params (as x), aliases."""
    tag_dir = _tag_dir(checkpoint_dir, tag)
    optim_files = _sorted_glob(tag_dir, "*_optim_states.pt")
    if not optim_files:
        raise FileNotFoundError(f"no *_optim_states.pt in {tag_dir}: this is not a ZeRO-1/2/3 checkpoint. At "
                                "ZeRO-0 the model states file holds the plain model: load it into the engine and "
                                "use sf_dist.save_eval_weights(engine, optimizer, path)")
    if any("_mp_rank_00_" not in os.path.basename(f) for f in optim_files):
        raise ValueError(f"{tag_dir} holds tensor- or pipeline-parallel shards (mp_rank > 0): only data-parallel "
                         "ZeRO checkpoints can be exported, as with DeepSpeed's zero_to_fp32")
    optim = [_load(f)[_OPTIM] for f in optim_files]
    count = optim[0].get(_PARTITION_COUNT)
    count = max(count) if isinstance(count, (list, tuple)) else count
    if count is not None and count != len(optim):
        raise ValueError(f"{tag_dir} has {len(optim)} *_optim_states.pt files but was saved by {count} ranks: "
                         "a checkpoint overwritten in part, or one rank's save missing")
    model_files = _sorted_glob(tag_dir, "*_model_states.pt")
    model = _load(model_files[0])
    stage3 = _FP32_3 in optim[0]
    partitions = [_x_partitions(sd, stage3) for sd in optim]  # [rank][group] flat x, taken per range

    plan: _Plan = []
    buffers = set(model.get("buffer_names") or ())
    plan += [(name, value.dtype, tuple(value.shape), lambda value=value: value)
             for name, value in model["module"].items() if name in buffers]
    if model.get("frozen_param_shapes"):
        plan += [(name, value.dtype, tuple(value.shape), lambda value=value: value)
                 for name, value in _frozen(model, model_files, stage3).items()]
    if stage3:
        plan += _params_stage3(partitions, model["param_shapes"])
    else:
        plan += _params_stage12(partitions, model["param_shapes"], optim[0].get(_PARAM_PADDINGS))
    made = {name: (dtype, shape, make) for name, dtype, shape, make in plan}
    for alias, source in (model.get("shared_params") or {}).items():
        if source in made:
            plan.append((alias, *made[source]))
    return plan


class _Partition:
    """One rank's flat fp32 partition of a group, memory-mapped: y, and z where x must be derived."""

    def __init__(self, y: torch.Tensor, z: Optional[torch.Tensor], weight: float) -> None:
        self.y, self.z, self.weight = y, z, weight

    def numel(self) -> int:
        return self.y.numel()

    @torch.no_grad()  # DeepSpeed saves its masters as Parameters
    def x_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements [lo, hi) of x into ``out``: lerp(y, z, 1 - 1/b1), or y as saved (eval mode)."""
        y = self.y[lo:hi].float()
        if self.z is None:
            out.copy_(y)
        else:
            torch.lerp(y, self.z[lo:hi].float(), self.weight, out=out)


class _Concat:
    """Partitions laid end to end (a group's over the ranks, or a ZeRO-3 rank's over its groups)."""

    def __init__(self, parts: list[_Partition]) -> None:
        self.parts, self.starts = parts, list(itertools.accumulate((p.numel() for p in parts), initial=0))

    def numel(self) -> int:
        return self.starts[-1]

    def x_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        for part, start, end in zip(self.parts, self.starts, self.starts[1:]):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                part.x_into(a - start, b - start, out[a - lo:b - lo])


def _x_partitions(sd: dict[str, Any], stage3: bool) -> list[_Partition]:
    """This rank's flat fp32 partitions (padding removed at ZeRO-1/2), each with what turns it into x."""
    if stage3:
        masters, base = sd[_FP32_3], sd[_OPTIM]
    else:
        masters, base = sd[_FP32_12], sd[_BASE_STATE]
        if isinstance(base, list):
            raise ValueError("elastic ZeRO checkpoint: it keeps no Schedule-Free group scalars (k, betas, "
                             "train_mode). Save with zero_optimization.elastic_checkpoint=false")
        paddings = sd.get(_GROUP_PADDINGS) if _ZERO_STAGE not in sd else None  # BF16_Optimizer keeps padding
        if paddings:
            masters = [m[: m.numel() - pad] for m, pad in zip(masters, paddings)]
    ids = [i for group in base["param_groups"] for i in group["params"]]
    group_of = {i: group for group in base["param_groups"] for i in group["params"]}
    if len(ids) != len(masters):
        raise ValueError(f"checkpoint has {len(masters)} fp32 partitions but {len(ids)} optimizer params")
    parts = []
    for i, y in zip(ids, masters):
        group, state = group_of[i], base["state"].get(i, {})
        if group.get("train_mode", False) and "z" in state:
            b1 = group["betas"][0] if "betas" in group else group["momentum"]
            parts.append(_Partition(y, state["z"][: y.numel()], 1 - 1 / b1))
        else:
            parts.append(_Partition(y, None, 0.0))
    return parts


def _params_stage12(partitions: list[list[_Partition]], param_shapes: list[dict],
                    param_paddings: Optional[list[list[int]]]) -> _Plan:
    """ZeRO-1/2: a group is the concatenation of the ranks' partitions; params lie in order in it."""
    plan: _Plan = []
    for g, shapes in enumerate(param_shapes):
        flat = _Concat([rank[g] for rank in partitions])
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            plan.append((name, torch.float32, tuple(shape),
                         lambda flat=flat, o=offset, n=n, s=shape: _cut(flat, o, n, s)))
            offset += n + (param_paddings[g][j] if param_paddings else 0)
        if offset > flat.numel():
            raise ValueError(f"group {g}: params need {offset} elements, the partitions hold {flat.numel()}")
    return plan


def _cut(flat: _Concat, offset: int, n: int, shape: Any) -> torch.Tensor:
    """x of the ``n`` elements at ``offset`` of a group, as a param of ``shape``."""
    out = torch.empty(n, dtype=torch.float32)
    flat.x_into(offset, offset + n, out)
    return out.view(shape)


def _params_stage3(partitions: list[list[_Partition]], param_shapes: list[dict]) -> _Plan:
    """ZeRO-3: each param is cut into ceil(numel/W) pieces, one per rank, laid in order on each rank."""
    world = len(partitions)
    flats = [_Concat(rank) for rank in partitions]
    plan: _Plan = []
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            piece = math.ceil(n / world)
            plan.append((name, torch.float32, tuple(shape),
                         lambda o=offset, n=n, piece=piece, s=shape: _gather_pieces(flats, o, n, piece, s)))
            offset += piece
    if offset != flats[0].numel():
        raise ValueError(f"params use {offset} elements per rank, the partitions hold {flats[0].numel()}")
    return plan


def _gather_pieces(flats: list[_Concat], offset: int, n: int, piece: int, shape: Any) -> torch.Tensor:
    """x of a ZeRO-3 param: rank r's ``piece`` elements at ``offset`` are elements [r*piece, (r+1)*piece)."""
    out = torch.empty(n, dtype=torch.float32)
    for r, flat in enumerate(flats):
        lo, hi = min(r * piece, n), min((r + 1) * piece, n)
        if hi > lo:
            flat.x_into(offset, offset + hi - lo, out[lo:hi])
    return out.view(shape)


def _frozen(model: dict[str, Any], model_files: list[str], stage3: bool) -> dict[str, torch.Tensor]:
    """Params DeepSpeed did not train: saved whole at ZeRO-1/2, as per-rank fragments at ZeRO-3."""
    shapes = model["frozen_param_shapes"]
    if not stage3:
        return {name: model["frozen_param_fragments"][name].float() for name in shapes}
    fragments = [_load(f)["frozen_param_fragments"]
                 for f in model_files]
    return {name: torch.cat([fr[name].flatten() for fr in fragments])[: math.prod(shape)].view(shape).float()
            for name, shape in shapes.items()}


class _Opaque:
    """Stands in for DeepSpeed's own pickled objects (loss scaler, stage enum, slice mappings):
    built from their data, never from DeepSpeed's code, and not needed for the weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# What DeepSpeed 0.1x pickles besides tensors and containers; anything else is refused.
_STAND_INS = [(_Opaque, f"deepspeed.{name}") for name in (
    "runtime.fp16.loss_scaler.LossScaler", "runtime.fp16.loss_scaler.DynamicLossScaler",
    "runtime.zero.config.ZeroStageEnum", "utils.tensor_fragment.fragment_address",
    "checkpoint.constants.ZeroStageEnum")]


def _load(path: str) -> dict[str, Any]:
    """A checkpoint file, memory-mapped (the moments and anything else unused are never read), with
    ``weights_only=True``: tensors, containers and the stand-ins above, no other code."""
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        name = found.group(1) if found else "an object that is not plain data"
        raise pickle.UnpicklingError(
            f"{path}: refused to load global {name}: a DeepSpeed checkpoint holds tensors, containers and "
            f"DeepSpeed's own loss scaler / stage / fragment records only. The file was crafted or written "
            "by something else; it is not loaded") from None


def _tag_dir(checkpoint_dir: str, tag: Optional[str]) -> str:
    if tag is not None:
        return os.path.join(checkpoint_dir, tag)
    latest = os.path.join(checkpoint_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(checkpoint_dir, f.read().strip())
    if _sorted_glob(checkpoint_dir, "*_model_states.pt"):
        return checkpoint_dir
    raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file and no *_model_states.pt: pass the directory "
                            "given to engine.save_checkpoint, a tag directory, or --tag")


def _sorted_glob(directory: str, pattern: str) -> list[str]:
    """Files sorted by rank number (rank 10 after rank 9)."""
    key = lambda path: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]
    return sorted(glob.glob(os.path.join(directory, pattern)), key=key)


def main(argv: Optional[list[str]] = None) -> None:
    """Command line entry: ``python -m sf_dist.export CHECKPOINT_DIR OUT.safetensors [--tag TAG]``."""
    parser = argparse.ArgumentParser(prog="python -m sf_dist.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="directory given to engine.save_checkpoint, or a tag directory")
    parser.add_argument("out", help="output .safetensors file (fp32 x under plain module names)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in CHECKPOINT_DIR/latest)")
    args = parser.parse_args(argv)
    names = export(args.checkpoint_dir, args.out, args.tag)
    print(f"wrote {len(names)} tensors of x to {args.out}")


if __name__ == "__main__":
    main()
