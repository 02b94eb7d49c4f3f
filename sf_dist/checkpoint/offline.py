"""x from an sf_dist checkpoint directory on one CPU machine: no process group, no model code.

At save, the manifest records how each model tensor's x is derived: the DCP key of its z (and of
its fp32 master under ZeroScheduleFree with bf16/fp16 params), its offset there, and the group's
lerp weight 1 - 1/b1 and kernel flag. The export reads one tensor (and its z) at a time, applies
the same ``swap_`` call as a live ``save_eval_weights``, and streams it to safetensors.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..kernels import swap_
from ..optim import ScheduleFreeOptimizer, local
from ..safetensors_stream import open_writer
from .manifest import read_manifest, verify_file
from .safe_dcp import METADATA, SafePlanner, SafeReader, read_metadata

__all__ = ["x_recipe", "export_checkpoint", "is_sf_checkpoint"]


def is_sf_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory written by sf_dist.checkpoint.save."""
    return os.path.isfile(os.path.join(path, "sf_dist.json"))


def x_recipe(model: Any, optimizer: Any, state: dict[str, Any]) -> Optional[dict[str, Any]]:
    """How the offline export derives x for each model tensor, or None for optimizers it cannot
    read (then the export refuses). ``state`` is the DCP state dict being saved."""
    train_mode = bool(optimizer.train_mode)
    if hasattr(optimizer, "buckets") and isinstance(getattr(optimizer, "inner", None), ScheduleFreeOptimizer):
        return {"train_mode": train_mode, "params": _zero_entries(model, optimizer)}
    if not isinstance(optimizer, ScheduleFreeOptimizer):
        return None
    by_ptr: dict[int, dict[str, Any]] = {}
    entries = []
    for group, saved in zip(optimizer.param_groups, state["optim"]["param_groups"]):
        weight, foreach = 1 - 1 / optimizer.interpolation(group), bool(group["foreach"])
        for p, fqn in zip(group["params"], saved["params"]):
            entry = {"name": fqn, "z": f"optim.state.{fqn}.z", "offset": 0, "weight": weight, "foreach": foreach}
            entries.append(entry)
            if local(p).numel() > 0:
                by_ptr[local(p).data_ptr()] = entry
    named = {e["name"] for e in entries}
    for name, value in state["model"].items():  # tied weights: a second name of the same param
        if name not in named and isinstance(value, Tensor) and local(value).numel() > 0:
            found = by_ptr.get(local(value).data_ptr())
            if found is not None:
                entries.append({**found, "name": name})
    return {"train_mode": train_mode, "params": entries}


def _zero_entries(model: Any, optimizer: Any) -> list[dict[str, Any]]:
    """ZeroScheduleFree: z (and a bf16/fp16 bucket's fp32 master) is one flat DTensor per bucket."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    entries = []
    for g, buckets in enumerate(optimizer.buckets):
        group = optimizer.inner.param_groups[g]
        weight, foreach = 1 - 1 / optimizer.inner.interpolation(group), bool(group["foreach"])
        for j, b in enumerate(buckets):
            key = f"optim.buckets.group{g}_bucket{j}"
            for i, p in enumerate(b.params):
                for name in names.get(id(p), []):
                    entry = {"name": name, "z": f"{key}.z", "flat": True, "offset": b.offsets[i],
                             "weight": weight, "foreach": foreach}
                    if b.separate_master:
                        entry["master"] = f"{key}.master"
                    entries.append(entry)
    return entries


class _Loader:
    """Whole tensors by DCP key, one dcp.load each, through the safe reader (each file is
    CRC-checked once); the last flat bucket read is kept, since its params come one after another."""

    def __init__(self, path: str, manifest: dict[str, Any], metadata: Any) -> None:
        self._path, self._metadata = path, metadata
        self._reader = SafeReader(path, manifest["files"])
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def tensor(self, key: str, keep: bool = False) -> Tensor:
        if key in self._cache:
            return self._cache[key]
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint {self._path!r} has no tensor {key!r}: its manifest and DCP metadata disagree")
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        try:
            dcp.load({key: out}, storage_reader=self._reader, planner=SafePlanner(self._path), no_dist=True)
        except CheckpointException as e:
            failure = next(iter(getattr(e, "failures", {}).values()), None)
            cause = failure[0] if isinstance(failure, tuple) else e
            raise RuntimeError(f"checkpoint {self._path!r}: reading {key} failed: {type(cause).__name__}: {cause}") \
                from None
        if keep:  # a bucket's z and master: two flat tensors at a time
            self._cache[key] = out
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return out


def export_checkpoint(path: str, out: str, max_shard_size: Union[int, str, None] = None) -> list[str]:
    """Write x of the sf_dist checkpoint at ``path`` to ``out`` (one safetensors file, or with
    ``max_shard_size`` the Hugging Face sharded layout in the directory ``out``); return the names.

    >>> export_checkpoint("ckpt/step_1000", "model.safetensors")  # doctest: +SKIP
    """
    path = os.path.normpath(path)
    manifest = read_manifest(path)
    verify_file(path, METADATA, manifest["files"])
    recipe = manifest.get("x")
    if recipe is None:
        raise ValueError(f"checkpoint {path!r} was saved with {manifest['optimizer_class']}, whose x the offline "
                         "export cannot derive: export from the live job with sf_dist.save_eval_weights")
    metadata = read_metadata(path)
    loader = _Loader(path, manifest, metadata)
    names = [k[len("model."):] for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)]
    specs = [(n, metadata.state_dict_metadata["model." + n].properties.dtype,
              tuple(metadata.state_dict_metadata["model." + n].size)) for n in names]
    how = {e["name"]: e for e in recipe["params"]}
    writer = open_writer(out, specs, max_shard_size)
    try:
        for name, dtype, shape in specs:
            writer.write(name, _x(loader, name, how.get(name) if recipe["train_mode"] else None, dtype, shape))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return names


def _x(loader: _Loader, name: str, entry: Optional[dict[str, Any]], dtype: torch.dtype,
       shape: tuple[int, ...]) -> Tensor:
    """x of one model tensor: as saved (eval mode, buffers), or lerp(y, z, 1 - 1/b1)."""
    if entry is None:
        return loader.tensor("model." + name)

    def part(key: str) -> Tensor:
        if not entry.get("flat"):
            return loader.tensor(key)
        n = torch.Size(shape).numel()
        return loader.tensor(key, keep=True)[entry["offset"]:entry["offset"] + n].view(shape)

    z = part(entry["z"])
    y = part(entry["master"]).clone() if "master" in entry else loader.tensor("model." + name)
    swap_([y], [z], entry["weight"], foreach=entry["foreach"])
    return y.to(dtype)
