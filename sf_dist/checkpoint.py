"""Resumable checkpoints of a Schedule-Free run on torch.distributed.checkpoint (DCP).

A checkpoint holds the params as they are (y in train mode), z, the moments and every group
scalar (k, lr_max, weight_sum, train_mode), each rank writing its own shards. It loads at
another world size or into a plain unsharded model, and resumes bitwise at the same one.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .optim import COUNTERS
from .backends.deepspeed import is_deepspeed
from .distributed import agreed_train_mode, rank0_io
from .weights import own_state_dict_calls
from .wrapper import ScheduleFreeWrapper

__all__ = ["save", "load", "latest"]

log = logging.getLogger(__name__)


def save(path: str | os.PathLike, model: nn.Module, optimizer: Any, extra: Any = None) -> None:
    """Save model, optimizer and ``extra`` (any picklable object) to the directory ``path``.

    A collective: call on every rank. Written to ``<path>.tmp`` and renamed once complete, so a
    crash mid-save leaves the previous checkpoint at ``path`` intact.

    >>> sf_dist.checkpoint.save("ckpt/step_1000", model, opt, extra={"step": 1000})
    """
    path = _checked_path(path, model, optimizer)
    agreed_train_mode(optimizer)
    tmp = path + ".tmp"

    def fresh_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        os.makedirs(tmp)

    rank0_io(fresh_tmp, f"create {tmp}")
    dcp.save(_state(model, optimizer, extra), checkpoint_id=tmp)  # rank 0 writes .metadata last
    rank0_io(lambda: _publish(tmp, path), f"move {tmp} to {path}")  # its all-reduce is the barrier


def load(path: str | os.PathLike, model: nn.Module, optimizer: Any) -> Any:
    """Load a checkpoint written by :func:`save` (at any world size) and return its ``extra``.

    Build the model and optimizer as for training first; no optimizer step is taken, the
    optimizer comes back in the mode it was saved in, and training continues where it stopped.

    >>> extra = sf_dist.checkpoint.load("ckpt/step_1000", model, opt)
    """
    path = _checked_path(path, model, optimizer)
    metadata = _read_metadata(path)
    state = _state(model, optimizer, None)
    _check_model_keys(path, metadata, state["model"])
    _check_optimizer_class(path, state["optimizer_class"])
    counters = getattr(getattr(optimizer, "inner", optimizer), "counters", COUNTERS)
    chosen = [_hyperparameters(g, counters) for g in optimizer.param_groups]
    try:
        dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:  # per-rank tracebacks; the last line names the cause
        raise RuntimeError(f"checkpoint {path!r} could not be loaded into this model/optimizer (a different "
                           f"optimizer class or param grouping?): {str(e).strip().splitlines()[-1]}") from e
    set_model_state_dict(model, state["model"])
    if hasattr(optimizer, "load_sharded_state_dict"):
        optimizer.load_sharded_state_dict(state["optim"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    _keep_chosen_hyperparameters(path, optimizer, chosen)
    return pickle.loads(state["extra"])


def latest(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint directly under ``root`` (by name, e.g. ``step_00042``), or None.

    Half-written saves (``*.tmp``), replaced ones (``*.old``) and directories whose metadata or
    shard files are missing or truncated are never taken: a job killed mid-save resumes from the
    checkpoint before.

    >>> path = sf_dist.checkpoint.latest("ckpt")
    >>> start = sf_dist.checkpoint.load(path, model, opt)["step"] if path else 0
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root), reverse=True):
        path = os.path.join(root, name)
        if name.endswith((".tmp", ".old")) or not os.path.isdir(path):
            continue
        try:
            _read_metadata(path)
        except (OSError, RuntimeError):
            continue
        return path
    return None


def _checked_path(path: str | os.PathLike, model: Any, optimizer: Any) -> str:
    if isinstance(optimizer, ScheduleFreeWrapper) or isinstance(getattr(optimizer, "inner", None),
                                                                 ScheduleFreeWrapper):
        raise TypeError("sf_dist.checkpoint does not take a ScheduleFreeWrapper yet: its base optimizer creates "
                        "its state lazily, so a DCP load could not know the base's keys and would drop them. "
                        "Save wrapper.state_dict() (and the model) with torch.save on each rank instead")
    if is_deepspeed(model):
        raise TypeError("sf_dist.checkpoint does not handle DeepSpeed engines: use engine.save_checkpoint() / "
                        "engine.load_checkpoint() (see docs/deepspeed.md)")
    return os.path.normpath(os.fspath(path))  # "ckpt/" must not put the temporary inside "ckpt"


def _state(model: nn.Module, optimizer: Any, extra: Any) -> dict[str, Any]:
    """The DCP state dict: sharded model params (y), optimizer state and groups, extra."""
    with own_state_dict_calls():
        model_sd = get_model_state_dict(model)
    if hasattr(optimizer, "sharded_state_dict"):
        optim_sd = optimizer.sharded_state_dict()
    else:
        # State for every param first: the helpers would otherwise create it with a zero-grad
        # step(), which advances k and weight_sum (or raises in eval mode).
        optimizer.init_state()
        optim_sd = get_optimizer_state_dict(model, optimizer)
    # extra travels pickled: DCP drops None leaves and would flatten containers into keys.
    return {"model": model_sd, "optim": optim_sd, "extra": pickle.dumps(extra),
            "optimizer_class": pickle.dumps(_optimizer_class(optimizer))}


def _optimizer_class(optimizer: Any) -> str:
    """The optimizer's class, with the wrapped class for ZeroScheduleFree."""
    inner = getattr(optimizer, "inner", None)
    name = type(optimizer).__name__
    return f"{name}({type(inner).__name__})" if inner is not None else name


def _check_optimizer_class(path: str, mine: bytes) -> None:
    """Refuse a checkpoint of another optimizer class (AdamW and RAdam state would load silently)."""
    saved = {"optimizer_class": b""}
    dcp.load(saved, checkpoint_id=path)
    if saved["optimizer_class"] != mine:
        raise RuntimeError(f"checkpoint {path!r} was saved by {pickle.loads(saved['optimizer_class'])}, "
                           f"this optimizer is {pickle.loads(mine)}: build the same optimizer class to resume")


def _hyperparameters(group: dict[str, Any], counters: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params" and k not in counters}


def _keep_chosen_hyperparameters(path: str, optimizer: Any, chosen: list[dict[str, Any]]) -> None:
    """Hyperparameters given to the optimizer win over the checkpoint's; each change is logged."""
    for i, (group, mine) in enumerate(zip(optimizer.param_groups, chosen)):
        for key, value in mine.items():
            if group.get(key) != value:
                log.warning("checkpoint %s: param_groups[%d][%r] was %r, continuing with %r",
                            path, i, key, group.get(key), value)
                group[key] = value


def _publish(tmp: str, path: str) -> None:
    """Move the finished checkpoint into place; the previous one survives until then."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)


def _read_metadata(path: str) -> Any:
    """DCP metadata, after checking that every shard file it names is present and complete."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        hint = f"; a save was interrupted while replacing it, the previous checkpoint is in {path}.old" \
            if os.path.isdir(path + ".old") else ""
        raise FileNotFoundError(f"no sf_dist checkpoint at {path!r} (missing {path}/.metadata){hint}")
    metadata = dcp.FileSystemReader(path).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: shard file {file} is missing")
        if os.path.getsize(file) < size:
            raise RuntimeError(f"checkpoint {path!r} is corrupt: shard file {file} has "
                               f"{os.path.getsize(file)} bytes, its metadata needs {size} (truncated copy?)")
    return metadata


def _check_model_keys(path: str, metadata: Any, model_sd: dict[str, Any]) -> None:
    """Name the params that differ between the checkpoint and the model, before any collective."""
    saved = {k[len("model."):]: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    missing = sorted(set(model_sd) - set(saved))
    unexpected = sorted(set(saved) - set(model_sd))
    reshaped = sorted(k for k, v in model_sd.items() if k in saved and hasattr(v, "shape")
                      and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(v.shape))
    if missing or unexpected or reshaped:
        raise RuntimeError(f"checkpoint {path!r} was saved from a different model: missing {missing}, "
                           f"unexpected {unexpected}, shape differs {reshaped}")
