"""x from an sf_dist checkpoint directory on one CPU machine: no process group, no model code.

At save, the manifest records how each model tensor's x is derived: the DCP key of its z (and of
its fp32 master under ZeroScheduleFree with bf16/fp16 params), its offset there, and the group's
lerp weight 1 - 1/b1 and kernel flag. The export reads a piece of y and of z at a time straight
from the files, applies the same ``swap_`` call as a live ``save_eval_weights``, and streams it to
safetensors.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections import OrderedDict
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from ..kernels import swap_
from ..optim import ScheduleFreeOptimizer, local
from ..safetensors_stream import open_writer
from .manifest import read_manifest, verify_file
from .safe_dcp import METADATA, SafePlanner, SafeReader, read_metadata

__all__ = ["x_recipe", "export_checkpoint", "is_sf_checkpoint", "PIECE"]


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
    """Tensors of a checkpoint by DCP key: element ranges read straight from the files (each CRC-checked
    once) when the key's chunks are dim-0 slabs stored as plain bytes, else whole tensors through one
    dcp.load each (the last two flat buckets read are kept, since their params come one after another)."""

    def __init__(self, path: str, manifest: dict[str, Any], metadata: Any) -> None:
        self._path, self._metadata, self._files = path, metadata, manifest["files"]
        self._reader = SafeReader(path, manifest["files"])
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._slabs: dict[str, Optional[list[tuple[int, int, str, int]]]] = {}
        self._verified: set[str] = set()

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint {self._path!r} has no tensor {key!r}: its manifest and DCP metadata disagree")
        return md

    def tensor(self, key: str, keep: bool = False) -> Tensor:
        if key in self._cache:
            return self._cache[key]
        md = self._md(key)
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

    def slabs(self, key: str) -> Optional[list[tuple[int, int, str, int]]]:
        """(first flat index, element count, file, byte offset) of each stored piece of ``key`` in flat
        order, or None when they cannot be read as byte ranges."""
        if key not in self._slabs:
            self._slabs[key] = self._find_slabs(key)
        return self._slabs[key]

    def _find_slabs(self, key: str) -> Optional[list[tuple[int, int, str, int]]]:
        md = self._md(key)
        size, dtype = tuple(md.size), md.properties.dtype
        row = math.prod(size[1:])
        found = []
        for chunk in md.chunks:
            if any(o != 0 for o in chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != size[1:]:
                return None  # blocks of a 2-D mesh: not consecutive in flat order
            info = self._metadata.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))]
            at = _raw_bytes(self._path, info, dtype, tuple(chunk.sizes))
            if at is None:
                return None
            found.append((chunk.offsets[0] * row if size else 0, math.prod(chunk.sizes), info.relative_path, at))
        found.sort()
        covered = 0
        for first, count, _, _ in found:
            if first != covered:
                return None
            covered += count
        return found if covered == math.prod(size) else None

    def read(self, key: str, start: int, count: int) -> Tensor:
        """Elements ``[start, start + count)`` of ``key`` flattened (``slabs(key)`` must not be None)."""
        dtype = self._md(key).properties.dtype
        out = torch.empty(count, dtype=dtype)
        raw = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        size = out.element_size()
        for first, n, name, at in self.slabs(key):
            lo, hi = max(start, first), min(start + count, first + n)
            if lo >= hi:
                continue
            if name not in self._verified:
                verify_file(self._path, name, self._files)
                self._verified.add(name)
            with open(os.path.join(self._path, name), "rb") as f:
                f.seek(at + (lo - first) * size)
                view = raw[(lo - start) * size:(hi - start) * size]
                if f.readinto(view) != len(view):
                    raise RuntimeError(f"checkpoint {self._path!r}: {name} ends inside {key}")
        return out


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._length + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n]) if n else 0
        self._pos += got
        return got


def _raw_bytes(path: str, info: Any, dtype: torch.dtype, sizes: tuple[int, ...]) -> Optional[int]:
    """Where the elements of one stored DCP chunk start in its file: DCP writes each chunk with
    torch.save, whose zip keeps the storage as plain little-endian bytes. The chunk's pickle is read
    on the meta device (weights_only: no code, no data); None for any other form."""
    if getattr(info, "transform_descriptors", None) or sys.byteorder != "little":
        return None
    with open(os.path.join(path, info.relative_path), "rb") as f:
        try:
            meta = torch.load(_FileSlice(f, info.offset, info.length), map_location="meta", weights_only=True)
            archive = torch._C.PyTorchFileReader(_FileSlice(f, info.offset, info.length))
        except Exception:  # noqa: BLE001 - not torch.save's zip layout: the whole-tensor reader decides
            return None
        records = [r for r in archive.get_all_records() if r.split("/")[-2:-1] == ["data"]]
        if not isinstance(meta, Tensor) or meta.dtype != dtype or tuple(meta.shape) != sizes \
                or not meta.is_contiguous() or len(records) != 1 or archive.get_record("byteorder") != b"little":
            return None
        return info.offset + archive.get_record_offset(records[0]) + meta.storage_offset() * meta.element_size()


def export_checkpoint(path: str, out: str, max_shard_size: Union[int, str, None] = None) -> list[str]:
    """Write x of the sf_dist checkpoint at ``path`` to ``out`` (one safetensors file, or with
    ``max_shard_size`` the Hugging Face sharded layout in the directory ``out``); return the names.

    Streams ``PIECE`` elements at a time where the checkpoint's layout allows (everything but 2-D mesh
    blocks): peak memory is a few pieces, not the largest tensor.

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
            for piece in _x_pieces(loader, name, how.get(name) if recipe["train_mode"] else None, dtype, shape):
                writer.write(name, piece, part=True)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return names


PIECE = 1 << 20  # elements per read in the streamed export


def _x_pieces(loader: _Loader, name: str, entry: Optional[dict[str, Any]], dtype: torch.dtype,
              shape: tuple[int, ...]) -> Iterator[Tensor]:
    """x of one model tensor, flat, in consecutive pieces: as saved (eval mode, buffers), or
    lerp(y, z, 1 - 1/b1) with the live export's kernel call."""
    n = math.prod(shape)
    y_key, y_at = "model." + name, 0
    if entry is not None and "master" in entry:
        y_key, y_at = entry["master"], entry["offset"]
    keys = [y_key] + ([entry["z"]] if entry is not None else [])
    if not all(loader.slabs(k) is not None for k in keys):
        yield _x(loader, name, entry, dtype, shape).reshape(-1)
        return
    z_at = entry["offset"] if entry is not None and entry.get("flat") else 0
    for start in range(0, n, PIECE) if n else [0]:
        count = min(PIECE, n - start)
        y = loader.read(y_key, y_at + start, count)
        if entry is not None:
            swap_([y], [loader.read(entry["z"], z_at + start, count)], entry["weight"], foreach=entry["foreach"])
        yield y.to(dtype)


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
