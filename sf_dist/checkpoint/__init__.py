"""Resumable checkpoints of a Schedule-Free run on torch.distributed.checkpoint (DCP).

A checkpoint holds the params as they are (y in train mode), z, the moments and every group
scalar (k, lr_max, weight_sum, train_mode), each rank writing its own shards, plus sf_dist's
JSON manifest (step, optimizer class, group structure, CRC-32 of every file) and one JSON
``extra`` per rank. It loads at another world size or into a plain unsharded model, and resumes
bitwise at the same one. Loading runs no code from the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..backends.deepspeed import is_deepspeed
from ..distributed import agreed_train_mode, every_rank_io, multi_rank, rank, rank0_io
from ..frameworks import unwrap_optimizer
from ..optim import COUNTERS
from ..safetensors_stream import atomic_write, fsync_dir
from ..weights import own_state_dict_calls
from .manifest import (FORMAT, MANIFEST, crc32_file, decode, dumps, encode, extra_name, read_manifest,
                       verify_file)
from .offline import x_recipe
from .safe_dcp import METADATA, SafePlanner, SafeReader, UnsafeCheckpointError, read_metadata

__all__ = ["save", "load", "latest", "verify", "UnsafeCheckpointError"]

log = logging.getLogger(__name__)


def save(path: str | os.PathLike, model: nn.Module, optimizer: Any, extra: Any = None) -> None:
    """Save model, optimizer and this rank's ``extra`` to the directory ``path``.

    A collective: call on every rank. ``extra`` is per rank (data position, RNG state) and holds
    JSON data and tensors only: None, bool, int, float, str, list, tuple, dict with str keys,
    torch.Tensor. Written to ``<path>.tmp`` and renamed once complete, so a crash mid-save leaves
    the previous checkpoint intact. ``path`` must be absent, empty, or an sf_dist checkpoint.

    >>> sf_dist.checkpoint.save("ckpt/step_1000", model, opt, extra={"step": 1000})
    """
    optimizer = unwrap_optimizer(optimizer)
    path = _checked_path(path, model, optimizer)
    agreed_train_mode(optimizer)
    encoded = every_rank_io(lambda: dumps(encode(extra)), "store extra (JSON data and tensors only)")
    tmp = path + ".tmp"
    rank0_io(lambda: _prepare(path, tmp), f"prepare {tmp}")
    every_rank_io(lambda: _write_file(os.path.join(tmp, extra_name(rank())), encoded), f"write {tmp}")
    state = _state(model, optimizer)
    try:
        dcp.save(state, checkpoint_id=tmp)  # rank 0 writes .metadata last
    except CheckpointException as e:  # torch's writer can hide ENOSPC ("unexpected pos"): say what is free
        raise _ordinary(e, f"checkpoint {path!r} could not be written ({shutil.disk_usage(tmp).free} bytes "
                           f"free on the disk holding {tmp})") from None
    mine = every_rank_io(lambda: _checksums(tmp), f"checksum {tmp}")
    sums = _merged(mine)
    manifest = {"format": FORMAT, "step": _step(optimizer), "saved_at": time.time(),
                "world_size": dist.get_world_size() if multi_rank() else 1,
                "optimizer_class": _optimizer_class(optimizer), "param_groups": _group_sizes(optimizer),
                "files": sums, "x": x_recipe(model, optimizer, state)}
    rank0_io(lambda: _finish(tmp, path, manifest), f"publish {path}")  # its exchange is the barrier


def load(path: str | os.PathLike, model: nn.Module, optimizer: Any) -> Any:
    """Load a checkpoint written by :func:`save` (at any world size) and return this rank's ``extra``.

    Build the model and optimizer as for training first; no optimizer step is taken, the
    optimizer comes back in the mode it was saved in, and training continues where it stopped.
    At another world size every rank gets rank 0's ``extra`` (a warning says so). Every file read
    is checked against the CRC-32 recorded at save.

    >>> extra = sf_dist.checkpoint.load("ckpt/step_1000", model, opt)
    """
    optimizer = unwrap_optimizer(optimizer)
    path = _checked_path(path, model, optimizer)
    path, manifest = _resolve(path)
    _check_optimizer(path, manifest, optimizer)
    metadata = read_metadata(path)
    state = _state(model, optimizer)
    _check_model(path, metadata, state["model"])
    _check_buckets(path, metadata, state["optim"])
    counters = getattr(getattr(optimizer, "inner", optimizer), "counters", COUNTERS)
    chosen = [_hyperparameters(g, counters) for g in optimizer.param_groups]
    try:
        dcp.load(state, storage_reader=SafeReader(path, manifest["files"]), planner=SafePlanner(path))
    except CheckpointException as e:
        raise _ordinary(e, f"checkpoint {path!r} could not be loaded into this model/optimizer") from None
    set_model_state_dict(model, state["model"])
    if hasattr(optimizer, "load_sharded_state_dict"):
        optimizer.load_sharded_state_dict(state["optim"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    _keep_chosen_hyperparameters(path, optimizer, chosen)
    return _read_extra(path, manifest)


def latest(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint directly under ``root`` (by the step saved in it), or None.

    Half-written saves and directories whose manifest, metadata or files are missing, truncated or
    unsafe are skipped (with a warning), so a job killed mid-save resumes from the checkpoint
    before. A save killed between its two renames leaves ``<name>.tmp`` or ``<name>.old``: the
    newest complete one is returned as it lies.

    >>> path = sf_dist.checkpoint.latest("ckpt")
    >>> start = sf_dist.checkpoint.load(path, model, opt)["step"] if path else 0
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    best: Optional[tuple[tuple[int, float, list], str]] = None
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, MANIFEST)):
            continue
        try:
            manifest = _complete(path)
        except (OSError, RuntimeError) as e:
            log.warning("checkpoint.latest: skipping %s: %s", path, e)
            continue
        key = (int(manifest["step"]), float(manifest["saved_at"]), _natural(name))
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


def verify(path: str | os.PathLike) -> None:
    """Check every file of the checkpoint at ``path`` against its recorded CRC-32; raise if one differs.

    ``load`` checks the files it reads; this reads them all, e.g. in a separate process right
    after a save, off the training loop.

    >>> sf_dist.checkpoint.verify("ckpt/step_1000")
    """
    path = os.path.normpath(os.fspath(path))
    manifest = _complete(path)
    for name in sorted(manifest["files"]):
        verify_file(path, name, manifest["files"])


# ---- saving ------------------------------------------------------------------------------------
def _checked_path(path: str | os.PathLike, model: Any, optimizer: Any) -> str:
    if is_deepspeed(model):
        raise TypeError("sf_dist.checkpoint does not handle DeepSpeed engines: use engine.save_checkpoint() / "
                        "engine.load_checkpoint() (see docs/deepspeed.md)")
    return os.path.normpath(os.fspath(path))  # "ckpt/" must not put the temporary inside "ckpt"


def _prepare(path: str, tmp: str) -> None:
    """Refuse a target that is not ours; put a checkpoint left between renames back; fresh ``tmp``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"checkpoint.save: {path!r} is a file, not a checkpoint directory: choose another path")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
        raise FileExistsError(f"checkpoint.save: {path!r} holds {sorted(os.listdir(path))[:5]} but no {MANIFEST}: "
                              "it is not an sf_dist checkpoint and would be deleted. Choose another path, or "
                              "empty it yourself")
    if not os.path.exists(path):
        survivor = _newest_complete([tmp, path + ".old"])
        if survivor is not None:  # a save killed between its renames: keep the newest complete one
            os.rename(survivor, path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    if os.path.isdir(os.path.dirname(os.path.abspath(path))):
        _sweep(os.path.dirname(os.path.abspath(path)))
    os.makedirs(tmp)


# What a save puts in its directory: DCP's shards and metadata (and its temporary), extra, the manifest.
_OURS = re.compile(r"__\d+_\d+\.distcp|(__\d+)?\.metadata(\.tmp)?|extra_\d+\.json|sf_dist\.json"
                   r"|\.sf_dist\.json\.[a-z0-9_]{8}\.tmp")


def _sweep(root: str) -> None:
    """Remove what killed saves left in ``root``: ``<name>.tmp`` / ``<name>.old`` directories holding only
    our files, unless one is a complete checkpoint newer than ``<name>`` (then load() and latest() take
    it). A directory with any other file is left alone."""
    for entry in sorted(os.listdir(root)):
        base, dot, kind = entry.rpartition(".")
        leftover = os.path.join(root, entry)
        if not dot or kind not in ("tmp", "old") or not os.path.isdir(leftover) \
                or not all(_OURS.fullmatch(f) for f in os.listdir(leftover)):
            continue
        final = os.path.join(root, base)
        if _newest_complete([leftover, final]) in (None, final):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The DCP state dict: sharded model params (y), optimizer state and groups."""
    with own_state_dict_calls():
        model_sd = get_model_state_dict(model)
    if hasattr(optimizer, "sharded_state_dict"):
        optim_sd = optimizer.sharded_state_dict()
    else:
        # State for every param first: the helpers would otherwise create it with a zero-grad
        # step(), which advances k and weight_sum (or raises in eval mode).
        optimizer.init_state()
        optim_sd = get_optimizer_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _checksums(tmp: str) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of the files this rank wrote (DCP names them ``__<rank>_<n>.distcp``);
    rank 0 also takes the metadata and anything unclaimed."""
    me, names = rank(), os.listdir(tmp)
    owned = re.compile(rf"__{me}_\d+\.distcp|extra_{me}\.json")
    claimed = re.compile(r"__\d+_\d+\.distcp|extra_\d+\.json")
    mine = [n for n in names if owned.fullmatch(n) or (me == 0 and not claimed.fullmatch(n))]
    return {n: crc32_file(os.path.join(tmp, n)) for n in sorted(mine)}


def _merged(mine: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    if not multi_rank():
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _finish(tmp: str, path: str, manifest: dict[str, Any]) -> None:
    """Write the manifest (the mark of a complete save), then move the checkpoint into place."""
    atomic_write(os.path.join(tmp, MANIFEST), lambda f: f.write(dumps(manifest)))
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _step(optimizer: Any) -> int:
    return max((int(g.get("k", 0)) for g in optimizer.param_groups), default=0)


def _optimizer_class(optimizer: Any) -> str:
    """The optimizer's class, with the wrapped class for ZeroScheduleFree."""
    inner = getattr(optimizer, "inner", None)
    name = type(optimizer).__name__
    return f"{name}({type(inner).__name__})" if inner is not None else name


def _group_sizes(optimizer: Any) -> list[int]:
    return [len(g["params"]) for g in optimizer.param_groups]


# ---- finding and checking ----------------------------------------------------------------------
def _complete(path: str) -> dict[str, Any]:
    """The manifest of a complete, safe checkpoint at ``path``: files present at their sizes, the
    metadata's CRC-32 right and the metadata parseable by the restricted reader."""
    manifest = read_manifest(path)
    verify_file(path, METADATA, manifest["files"])
    read_metadata(path)
    return manifest


def _newest_complete(paths: list[str]) -> Optional[str]:
    found = []
    for p in paths:
        if os.path.isdir(p):
            try:
                m = _complete(p)
            except (OSError, RuntimeError):
                continue
            found.append(((int(m["step"]), float(m["saved_at"])), p))
    return max(found)[1] if found else None


def _resolve(path: str) -> tuple[str, dict[str, Any]]:
    """``path`` and its manifest, or the newest complete of ``path``, ``<path>.tmp`` and
    ``<path>.old``: a save killed after its manifest was written but before its renames finished."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)) \
            and os.path.exists(os.path.join(path, METADATA)):
        raise RuntimeError(f"{path!r} is a DCP checkpoint without {MANIFEST} (written by another tool or an older "
                           "sf_dist that pickled extra): sf_dist.checkpoint.load refuses it, since it cannot be "
                           "loaded without trusting pickled code. If you trust the file, convert it once with "
                           f"`python -m sf_dist.checkpoint.migrate {path} NEW --trust-pickle` and load NEW")
    survivor = _newest_complete([path, path + ".tmp", path + ".old"])
    if survivor is None:
        return path, _complete(path)  # raises, naming what is missing or damaged
    if survivor != path:
        log.warning("checkpoint %s: a save was interrupted between its renames; loading the newest complete "
                    "copy, %s", path, survivor)
    return survivor, _complete(survivor)


def _check_optimizer(path: str, manifest: dict[str, Any], optimizer: Any) -> None:
    """Refuse another optimizer class (AdamW and RAdam state would load silently) or other groups."""
    mine = _optimizer_class(optimizer)
    if manifest["optimizer_class"] != mine:
        raise RuntimeError(f"checkpoint {path!r} was saved by {manifest['optimizer_class']}, this optimizer is "
                           f"{mine}: build the same optimizer class to resume")
    saved, groups = manifest["param_groups"], _group_sizes(optimizer)
    if saved != groups:
        raise RuntimeError(f"checkpoint {path!r} has {len(saved)} param groups of {saved} params, this optimizer "
                           f"{len(groups)} of {groups}: build the optimizer with the same param groups, in the "
                           "same order, as the run that saved it (each group keeps its own lr schedule)")


def _check_model(path: str, metadata: Any, model_sd: dict[str, Any]) -> None:
    """Name the params that differ between the checkpoint and the model, before any collective;
    log the ones whose dtype differs (they are cast on load)."""
    saved = {k[len("model."):]: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    missing = sorted(set(model_sd) - set(saved))
    unexpected = sorted(set(saved) - set(model_sd))
    reshaped = sorted(k for k, v in model_sd.items() if k in saved and hasattr(v, "shape")
                      and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(v.shape))
    if missing or unexpected or reshaped:
        raise RuntimeError(f"checkpoint {path!r} was saved from a different model: missing {missing}, "
                           f"unexpected {unexpected}, shape differs {reshaped}")
    cast = sorted(f"{k} ({saved[k].properties.dtype} -> {v.dtype})" for k, v in model_sd.items()
                  if hasattr(v, "dtype") and hasattr(saved[k], "properties") and saved[k].properties.dtype != v.dtype)
    if cast:
        log.warning("checkpoint %s: %d tensors are cast to the model's dtype on load: %s",
                    path, len(cast), ", ".join(cast))


def _check_buckets(path: str, metadata: Any, optim_sd: dict[str, Any]) -> None:
    """ZeroScheduleFree: refuse state this optimizer would not keep or cannot find (a base optimizer
    built with other options, amsgrad say), which DCP would drop or fail on."""
    if "buckets" not in optim_sd:
        return
    mine = {f"optim.buckets.{name}.{key}" for name, entry in optim_sd["buckets"].items() for key in entry}
    saved = {k for k in metadata.state_dict_metadata if k.startswith("optim.buckets.")}
    if mine != saved:
        raise RuntimeError(f"checkpoint {path!r} holds other optimizer state than this optimizer keeps: missing "
                           f"{sorted(mine - saved)}, unexpected {sorted(saved - mine)}. Build the optimizer (and a "
                           "ScheduleFreeWrapper's base) with the same options as the run that saved it")


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


def _read_extra(path: str, manifest: dict[str, Any]) -> Any:
    """This rank's extra at the saved world size, else rank 0's."""
    world = dist.get_world_size() if multi_rank() else 1
    source = rank() if world == manifest["world_size"] else 0
    if world != manifest["world_size"] and rank() == 0:
        log.warning("checkpoint %s was saved by %d ranks, loaded by %d: every rank gets rank 0's extra",
                    path, manifest["world_size"], world)
    name = extra_name(source)
    verify_file(path, name, manifest["files"])
    with open(os.path.join(path, name)) as f:
        return decode(json.load(f))


def _ordinary(error: CheckpointException, what: str) -> Exception:
    """DCP's CheckpointException (a BaseException holding every rank's error) as an ordinary one:
    the first rank's refusal of an unsafe file keeps its type, anything else is a RuntimeError
    that names the rank and the cause."""
    failures = sorted(getattr(error, "failures", {}).items())
    for r, wrapped in failures:
        cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(cause, UnsafeCheckpointError):
            return UnsafeCheckpointError(str(cause))
    if failures:
        r, wrapped = failures[0]
        cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return RuntimeError(f"{what}: rank {r}: {type(cause).__name__}: {cause}")
    lines = str(error).strip().splitlines()
    return RuntimeError(f"{what}: {lines[-1] if lines else type(error).__name__}")


def _natural(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]
