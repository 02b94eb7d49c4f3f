"""DeepSpeed universal checkpoints of Schedule-Free state: resume at another data-parallel size.

DeepSpeed changes the number of ranks only through a universal checkpoint, and its converter
(``deepspeed.checkpoint.ds_to_universal``) knows Adam's ``exp_avg``/``exp_avg_sq`` only. This
converter writes the same layout from a ZeRO-1/2/3 checkpoint of an sf_dist optimizer::

    python -m sf_dist.ds_to_universal --input_folder ckpt/global_step100 --output_folder ckpt/global_step100_universal

``zero/<param>/<key>.pt`` holds the whole tensor of every per-element state: ``fp32`` (the
masters: y, or x if saved in eval mode), ``z``, the second moment and any other key the optimizer
keeps. ``zero/optimizer_state.pt`` holds DeepSpeed's global state and every param group (k,
weight_sum, lr_max, train_mode and the hyperparameters). DeepSpeed's ZeRO-1/2 loader reads every
key generically but raises on a rank that holds no element of some group; its ZeRO-3 loader
hard-codes Adam's keys and copies group 0 into every group. The engine optimizer that
``sf_dist.deepspeed.initialize``/``attach`` set up loads with ``load_stage12``/``load_stage3``
below instead (DeepSpeed's own per-param slicing, run for our optimizers only).

z is weight-like, not a moment. Without tensor parallelism every key is cut and joined the same
way (whole tensors, then DeepSpeed re-partitions them flat), so the distinction never arises;
tensor- or pipeline-parallel checkpoints are refused. DeepSpeed's loader scales an unknown key
like ``fp32`` when a TP affine map applies (``SCALE_POWER_BY_STATE`` defaults to 1), which is
z's right treatment.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch

from ...safetensors_stream import atomic_write

__all__ = ["convert", "load_stage12", "load_stage3", "main"]

# Keys of DeepSpeed's checkpoint files (deepspeed/checkpoint/constants.py).
_OPTIM = "optimizer_state_dict"
_BASE_12 = "base_optimizer_state"
_FP32_12 = "single_partition_of_fp32_groups"
_SLICES_12 = "param_slice_mappings"
_FP32_3 = "fp32_flat_groups"
_PARAM = "param"
_CAT_DIM = "cat_dim"
_FP32 = "fp32"


def convert(input_folder: str, output_folder: str) -> list[str]:
    """Write the universal form of the ZeRO checkpoint in ``input_folder`` (a tag directory) to
    ``output_folder`` and name it in ``<parent>/latest_universal``; return the params written.

    >>> convert("ckpt/global_step100", "ckpt/global_step100_universal")
    """
    optim_files = _rank_files(input_folder, "optim_states.pt")
    model_files = _rank_files(input_folder, "model_states.pt")
    if not optim_files or not model_files:
        raise FileNotFoundError(f"{input_folder} holds no *_optim_states.pt / *_model_states.pt: pass a tag directory "
                                "written by engine.save_checkpoint at ZeRO-1, 2 or 3 (e.g. ckpt/global_step100)")
    if any("_mp_rank_00_" not in os.path.basename(f) for f in optim_files):
        raise ValueError(f"{input_folder} holds tensor- or pipeline-parallel shards (mp_rank > 0): sf_dist converts "
                         "data-parallel ZeRO checkpoints only")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise ValueError(f"--output_folder {output_folder} is the input folder: pick a new directory")
    if os.path.isdir(output_folder) and os.listdir(output_folder):
        raise FileExistsError(f"--output_folder {output_folder} is not empty: remove it or pick a new directory")
    optim = [_load(f)[_OPTIM] for f in optim_files]
    model = _load(model_files[0])
    _check_ranks(input_folder, optim)
    stage3 = _FP32_3 in optim[0]
    base = [sd[_OPTIM] if stage3 else sd[_BASE_12] for sd in optim]
    _check_schedule_free(input_folder, base[0])

    zero_dir = os.path.join(output_folder, "zero")
    written = []
    tensors = _stage3_tensors(optim, base, model["param_shapes"]) if stage3 else _stage12_tensors(optim, base, model)
    for name, key, tensor in tensors:
        _atomic_save({_PARAM: tensor, _CAT_DIM: 0}, os.path.join(zero_dir, name, f"{key}.pt"))
        if key == _FP32:
            written.append(name)
    _atomic_save(_global_state(optim[0], base[0]), os.path.join(zero_dir, "optimizer_state.pt"))
    for f in model_files:
        _atomic_copy(f, os.path.join(output_folder, os.path.basename(f)))
    parent, tag = os.path.split(os.path.abspath(output_folder))
    _atomic_write_text(os.path.join(parent, "latest_universal"), tag)
    return written


def _stage12_tensors(optim: list[dict], base: list[dict], model: dict) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, key, whole tensor) per param and key, joined from each rank's fragment (ZeRO-1/2)."""
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    for g, group_shapes in enumerate(model["param_shapes"]):
        flat = [_flat_states(sd[_FP32_12][g], b, g) for sd, b in zip(optim, base)]
        for name in group_shapes:
            for key in flat[0]:
                pieces = [states[key].narrow(0, m[g][name].start, m[g][name].numel)
                          for states, m in zip(flat, (sd[_SLICES_12] for sd in optim)) if name in m[g]]
                whole = torch.cat(pieces).float()
                if whole.numel() != math.prod(shapes[name]):
                    raise ValueError(f"{name}: the ranks' fragments hold {whole.numel()} elements, the model "
                                     f"states say shape {tuple(shapes[name])}")
                yield name, key, whole.view(shapes[name]).clone()


def _stage3_tensors(optim: list[dict], base: list[dict], param_shapes: list[dict]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """ZeRO-3: each param is cut into ceil(numel/W) pieces, one per rank, laid in order on each rank."""
    world = len(optim)
    per_rank = []  # [rank][key] -> that rank's flat partitions (sub-groups, in order), memory-mapped
    for sd, b in zip(optim, base):
        ids = [i for group in b["param_groups"] for i in group["params"]]
        states = [_flat_states(master, b, i) for i, master in zip(ids, sd[_FP32_3])]
        per_rank.append({key: [s[key] for s in states] for key in states[0]})
    offset = 0
    for group in param_shapes:
        for name, shape in group.items():
            n = math.prod(shape)
            piece = math.ceil(n / world)
            for key in per_rank[0]:
                whole = torch.cat([_span(r[key], offset, piece) for r in per_rank])[:n]
                yield name, key, whole.float().view(shape).clone()
            offset += piece
    held = sum(t.numel() for t in per_rank[0][_FP32])
    if offset != held:
        raise ValueError(f"params use {offset} elements per rank, the partitions hold {held}")


def _span(parts: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start+length) of the concatenation of ``parts``, without concatenating them."""
    pieces, base = [], 0
    for t in parts:
        lo, hi = max(start, base), min(start + length, base + t.numel())
        if lo < hi:
            pieces.append(t[lo - base:hi - base])
        base += t.numel()
    if sum(p.numel() for p in pieces) != length:
        raise ValueError(f"a ZeRO-3 partition holds {base} elements, a param needs [{start}, {start + length})")
    return torch.cat(pieces)


def _flat_states(master: torch.Tensor, base: dict, index: int) -> dict[str, torch.Tensor]:
    """The fp32 master and every per-element optimizer state of one flat partition, by key.

    (ZeRO-1/2 saves the last rank's master without its alignment padding, the state with it.)
    """
    state = base["state"].get(index, {})
    out = {_FP32: master}
    for key, value in state.items():
        if not (torch.is_tensor(value) and value.dim() == 1 and value.numel() >= master.numel()):
            raise ValueError(f"optimizer state {key!r} of partition {index} is not a per-element tensor of "
                             f"{master.numel()} elements ({type(value).__name__}): this converter carries "
                             "per-element state and param-group scalars only")
        out[key] = value[: master.numel()]
    return out


def _global_state(sd: dict, base: dict) -> dict:
    """DeepSpeed's rank-independent optimizer state plus every param group, hyperparameters and scalars."""
    sharded = {_BASE_12, _FP32_12, _SLICES_12, _OPTIM, _FP32_3}
    out = {k: v for k, v in sd.items() if k not in sharded}
    out["param_groups"] = base["param_groups"]
    return out


def _check_ranks(folder: str, optim: list[dict]) -> None:
    count = optim[0].get("partition_count")
    count = max(count) if isinstance(count, (list, tuple)) else count
    if count is not None and count != len(optim):
        raise ValueError(f"{folder} has {len(optim)} *_optim_states.pt files but was saved by {count} ranks: "
                         "a checkpoint overwritten in part, or one rank's save missing")


def _check_schedule_free(folder: str, base: Any) -> None:
    if isinstance(base, list):
        raise ValueError(f"{folder} is an elastic ZeRO checkpoint: it keeps no param-group scalars. Save with "
                         "zero_optimization.elastic_checkpoint=false")
    groups = base.get("param_groups", [])
    if not groups or any("weight_sum" not in g or "train_mode" not in g for g in groups):
        raise ValueError(f"{folder} was not saved by an sf_dist Schedule-Free optimizer (its param groups lack "
                         "k/weight_sum/train_mode): use DeepSpeed's own python -m deepspeed.checkpoint.ds_to_universal")


# ---- the loads, for the engine optimizer's mixins ------------------------------------------------

@torch.no_grad()
def load_stage12(engine_optimizer: Any, lp_groups: list[list[torch.Tensor]], checkpoint_dir: str) -> None:
    """Load a universal checkpoint into DeepSpeed's ZeRO-1/2 (or BF16) optimizer around an sf_dist
    optimizer: DeepSpeed's own per-param loads, also on a rank that holds no element of a group
    (DeepSpeed's loader raises IndexError there: 8 bias elements over 3 ranks), then each group's values."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    if getattr(engine_optimizer, "mpu", None) is not None:
        raise ValueError("universal checkpoints with tensor/pipeline parallelism (mpu) are not supported by sf_dist: "
                         "resume at the same model-parallel layout")
    zero_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = _load(os.path.join(zero_dir, "optimizer_state.pt"))
    groups, loaded = engine_optimizer.optimizer.param_groups, _saved_groups(checkpoint_dir, optim_sd, engine_optimizer)
    engine_optimizer._load_global_state(optim_sd)
    names = engine_optimizer.param_names
    for group, saved, lps in zip(groups, loaded, lp_groups):
        keys: set[str] = set()
        for lp in lps:
            if lp._hp_mapping is not None:  # this rank holds part of lp
                lp.load_hp_checkpoint_state(os.path.join(zero_dir, names[lp]), 0, 1)
                keys.update(lp._hp_mapping.get_optim_state_keys())
        map_to_flat_opt_states(group["params"][0], lps, engine_optimizer.optimizer.state, keys)
        group.update({k: v for k, v in saved.items() if k != "params"})


def _saved_groups(checkpoint_dir: str, optim_sd: dict, engine_optimizer: Any) -> list[dict]:
    loaded, count = optim_sd["param_groups"], len(engine_optimizer.optimizer.param_groups)
    if len(loaded) != count:
        raise ValueError(f"{checkpoint_dir} has {len(loaded)} param groups, this optimizer {count}: build the "
                         "engine with the same param groups as the run that saved it")
    return loaded


@torch.no_grad()
def load_stage3(engine_optimizer: Any, checkpoint_dir: str) -> None:
    """Load a universal checkpoint into DeepSpeed's ZeRO-3 optimizer around an sf_dist optimizer:
    every per-element key found under ``zero/<param>/`` and each param group's own values."""
    zero_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = _load(os.path.join(zero_dir, "optimizer_state.pt"))
    groups, loaded = engine_optimizer.optimizer.param_groups, _saved_groups(checkpoint_dir, optim_sd, engine_optimizer)
    engine_optimizer._load_global_state_stage3(optim_sd)
    names = engine_optimizer.param_names
    for sub_group_id, params in enumerate(engine_optimizer.fp16_groups):
        master = engine_optimizer.fp32_partitioned_groups_flat[sub_group_id]
        folder = os.path.join(zero_dir, names[params[0]])
        keys = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".pt") and f != "step.pt")
        if _FP32 not in keys:
            raise FileNotFoundError(f"{folder} has no fp32.pt: not a universal checkpoint")
        for key in keys:
            flat = torch.zeros_like(master)
            offset = 0
            for p in params:
                part = engine_optimizer.load_hp_checkpoint_state(os.path.join(zero_dir, names[p]), key, param=p)
                flat.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if key == _FP32:
                master.copy_(flat)
            else:
                engine_optimizer.optimizer.state[master][key] = flat
    for group, saved in zip(groups, loaded):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for sub_group_id in range(len(engine_optimizer.fp16_groups)):  # masters into the model's shards
        engine_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group_id)


# ---- files ---------------------------------------------------------------------------------------

def _safe_globals() -> list:
    """The DeepSpeed classes a ZeRO checkpoint pickles: loaded as data, nothing else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: str) -> dict:
    """A checkpoint file, memory-mapped, with torch's weights-only unpickler (no code runs)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _rank_files(folder: str, suffix: str) -> list[str]:
    """Files ending in ``suffix``, sorted by rank number (rank 10 after rank 9)."""
    key = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    names = sorted((n for n in os.listdir(folder) if n.endswith(suffix)), key=key) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def _atomic_save(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def _atomic_copy(src: str, path: str) -> None:
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    _atomic(path, copy)


def _atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def _atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Create ``path``'s folder, then write it atomically (temporary, fsync, rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, write)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m sf_dist.ds_to_universal --input_folder TAG_DIR --output_folder OUT_DIR`` (DeepSpeed's flags)."""
    parser = argparse.ArgumentParser(prog="python -m sf_dist.ds_to_universal",
                                     description="Universal checkpoint of a DeepSpeed ZeRO-1/2/3 checkpoint of an "
                                                 "sf_dist Schedule-Free optimizer, to resume at another DP size.")
    parser.add_argument("--input_folder", required=True, help="tag directory written by engine.save_checkpoint")
    parser.add_argument("--output_folder", required=True, help="new directory; its parent gets latest_universal")
    ignored = "accepted for DeepSpeed's command lines; no effect here (one tensor at a time, no temp folder)"
    parser.add_argument("--num_extract_workers", type=int, default=4, help=ignored)
    parser.add_argument("--num_merge_workers", type=int, default=2, help=ignored)
    parser.add_argument("--keep_temp_folder", action="store_true", help=ignored)
    parser.add_argument("--no_strict", dest="strict", action="store_false", help=ignored)
    parser.add_argument("--inject_missing_state", action="store_true", help=ignored)
    args = parser.parse_args(argv)
    names = convert(args.input_folder, args.output_folder)
    print(f"wrote a universal checkpoint of {len(names)} params to {args.output_folder}; resume with "
          '"checkpoint": {"load_universal": true} and engine.load_checkpoint on the parent directory')
