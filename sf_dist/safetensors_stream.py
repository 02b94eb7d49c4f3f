"""Safetensors files written one tensor at a time and published atomically, as one file or as the
Hugging Face sharded layout (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``)."""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import tempfile
from typing import Any, Callable, Union

import torch
from torch import Tensor

__all__ = ["SAFETENSORS_DTYPES", "Spec", "check_specs", "atomic_write", "parse_size", "SafetensorsWriter",
           "ShardedSafetensorsWriter", "open_writer", "sweep_temporaries", "INDEX_NAME"]

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
INDEX_NAME = "model.safetensors.index.json"  # what transformers' from_pretrained looks for
Spec = tuple[str, torch.dtype, tuple[int, ...]]
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def check_specs(specs: list[Spec]) -> None:
    """Refuse a dtype safetensors cannot store, before anything is written (call on every rank)."""
    for name, dtype, _ in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"save_eval_weights: tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
                            f"supported: {sorted(map(str, SAFETENSORS_DTYPES))}. Cast or drop that buffer first")


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``5GB`` / ``500MiB`` / ``1000`` (the convention of transformers' max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give a positive number of bytes or a string such as "
                         "'5GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary in ``path``'s directory, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never a part (also after SIGKILL or a full disk)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Streams tensors into the safetensors layout: 8-byte header size, JSON header, raw bytes.

    The header is written first from shapes and dtypes alone, so no tensor needs to be held while
    the others are gathered. Bytes go to a temporary next to ``path`` (a killed export's temporary
    for ``path`` is removed first); ``close()`` fsyncs and renames it over ``path``, ``abort()``
    removes it: ``path`` is never a partial file.
    """

    def __init__(self, path: str, specs: list[Spec]) -> None:
        check_specs(specs)
        header: dict[str, Any] = {}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}  # what transformers' from_pretrained checks for
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path, self._next, self._filled = path, 0, 0
        directory = os.path.dirname(os.path.abspath(path))
        sweep_temporaries(directory, re.compile(re.escape(os.path.basename(path))))  # of a killed export
        fd, self._tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        try:
            self._file.write(struct.pack("<Q", len(blob)) + blob)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor, part: bool = False) -> None:
        """The tensor ``name``, next in header order: whole, or with ``part`` its next consecutive
        elements (it is complete once its header's bytes are all written)."""
        if self._next == len(self._order):
            raise RuntimeError(f"safetensors stream: {name!r} written after the last tensor")
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors stream out of order: got {name!r}, expected {expected!r}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if (data.numel() != nbytes) if not part else (self._filled + data.numel() > nbytes):
            raise RuntimeError(f"tensor {name!r} has {self._filled + data.numel()} bytes, its header says {nbytes}")
        self._file.write(memoryview(data.numpy()))  # the tensor's own buffer: no second copy
        self._filled += data.numel()
        if self._filled == nbytes:
            self._next, self._filled = self._next + 1, 0

    def close(self) -> None:
        """Flush, fsync and rename the finished file into place."""
        self.finish()
        self.publish()

    def finish(self) -> None:
        """Flush and fsync the temporary (every tensor must have been written)."""
        if self._next != len(self._order):
            self.abort()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()
            raise

    def publish(self) -> None:
        """Rename the finished temporary over ``path``."""
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Drop the temporary; whatever was at ``path`` before stays as it was."""
        try:
            self._file.close()
        except OSError:
            pass  # e.g. ENOSPC flushing the buffer: the temporary goes anyway
        _remove_quietly(self._tmp)


class ShardedSafetensorsWriter:
    """The Hugging Face layout in ``directory``: tensors in order, a new file once the next tensor
    would pass ``max_bytes``; ``model.safetensors`` alone when everything fits in one.

    Atomic as a set for readers: the shards are finished in temporaries and renamed to names no file
    of the previous export holds (``model-0000k-of-0000n.safetensors``, or with a fresh
    ``-<hex>`` suffix while those are taken), then the index is renamed into place, the one step that
    switches readers from the old set to the new; only then are the old files removed.
    """

    def __init__(self, directory: str, specs: list[Spec], max_bytes: int) -> None:
        check_specs(specs)
        shards: list[list[Spec]] = [[]]
        size = 0
        for spec in specs:
            nbytes = _nbytes(spec[1], spec[2])
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        os.makedirs(directory, exist_ok=True)
        sweep_temporaries(directory, _OUR_FILES)
        self.names = _fresh_names(directory, len(shards))
        self._directory = directory
        self._total = sum(_nbytes(d, s) for _, d, s in specs)
        self._where = {name: i for i, shard in enumerate(shards) for name, _, _ in shard}
        self._writers: list[SafetensorsWriter] = []
        try:
            for name, shard in zip(self.names, shards):
                self._writers.append(SafetensorsWriter(os.path.join(directory, name), shard))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: Tensor, part: bool = False) -> None:
        if name not in self._where:
            raise RuntimeError(f"safetensors stream: {name!r} is not in the planned shards")
        self._writers[self._where[name]].write(name, tensor, part)

    def close(self) -> None:
        """Finish every shard, publish them under their fresh names, then the index; then drop the
        previous export's files (the index first when the new export is one file)."""
        for writer in self._writers:
            writer.finish()
        for writer in self._writers:
            writer.publish()
        index_path = os.path.join(self._directory, INDEX_NAME)
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self._total},
                     "weight_map": {name: self.names[i] for name, i in self._where.items()}}
            atomic_write(index_path, lambda f: f.write(json.dumps(index, indent=2, sort_keys=True).encode()))
        else:
            _remove_quietly(index_path)  # readers of the index now find model.safetensors alone
        keep = set(self.names) | ({INDEX_NAME} if len(self.names) > 1 else set())
        for f in sorted(os.listdir(self._directory)):
            if f not in keep and _SHARD.fullmatch(f):
                _remove_quietly(os.path.join(self._directory, f))
        fsync_dir(self._directory)

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()


# The files of our exports in a directory, and the temporaries mkstemp names after them (".<name>.<8>.tmp").
_SHARD = re.compile(r"model\.safetensors|model-\d{5}-of-\d{5}(-[0-9a-f]{8})?\.safetensors")
_OUR_FILES = re.compile(rf"{_SHARD.pattern}|model\.safetensors\.index\.json")


def sweep_temporaries(directory: str, names: "re.Pattern[str]") -> list[str]:
    """Remove the temporaries a killed export left in ``directory`` for files whose names match
    ``names``: ``.<name>.<8 random characters>.tmp``, as :func:`atomic_write` and the writers make
    them; nothing else is touched. Returns what was removed."""
    removed = []
    for f in sorted(os.listdir(directory)):
        found = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", f)
        if found and names.fullmatch(found.group(1)) and os.path.isfile(os.path.join(directory, f)):
            _remove_quietly(os.path.join(directory, f))
            removed.append(f)
    return removed


def _fresh_names(directory: str, n: int) -> list[str]:
    """``model.safetensors`` for one shard; else the standard shard names, or with one random suffix
    where a file of that name exists already (a previous export, still named by its index)."""
    if n == 1:
        return ["model.safetensors"]
    present = set(os.listdir(directory))
    suffix = ""
    while True:
        names = [f"model-{i + 1:05d}-of-{n:05d}{suffix}.safetensors" for i in range(n)]
        if present.isdisjoint(names):
            return names
        suffix = "-" + secrets.token_hex(4)


def open_writer(path: str, specs: list[Spec],
                max_shard_size: Union[int, str, None]) -> Union[SafetensorsWriter, ShardedSafetensorsWriter]:
    """One file at ``path``, or the sharded layout in the directory ``path`` when ``max_shard_size`` is set."""
    if max_shard_size is None:
        return SafetensorsWriter(path, specs)
    return ShardedSafetensorsWriter(path, specs, parse_size(max_shard_size))
