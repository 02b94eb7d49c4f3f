"""Reading a torch.distributed.checkpoint directory without running code from it.

DCP pickles its ``.metadata`` and loads every non-tensor value with ``torch.load(weights_only=False)``.
Here the metadata goes through an unpickler that knows DCP's metadata classes only, non-tensor
values through ``torch.load(weights_only=True)``, and each file is checked against its CRC-32 before
it is read. A file that needs anything else is refused with the global it asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .manifest import verify_file

__all__ = ["UnsafeCheckpointError", "read_metadata", "SafeReader", "SafePlanner", "METADATA"]

METADATA = ".metadata"
# Everything a FileSystemWriter .metadata holds (torch 2.4-2.13): DCP's dataclasses, torch.Size,
# dtypes and layouts by name, the checkpoint id as a path.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asked to import something a data-only checkpoint never needs."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._path}: refused to load global {module}.{name}: DCP metadata holds only DCP's own metadata "
            "classes. The file was crafted or written by something else; do not load it")


def read_metadata(path: str) -> Metadata:
    """``path/.metadata`` through the restricted unpickler; a damaged file raises RuntimeError."""
    file = os.path.join(path, METADATA)
    with open(file, "rb") as f:
        data = f.read()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), file).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated, empty, garbage: EOFError, UnpicklingError, ValueError...
        raise RuntimeError(f"checkpoint {path!r} is corrupt: {file} ({len(data)} bytes) does not parse "
                           f"({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise RuntimeError(f"checkpoint {path!r} is corrupt: {file} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader with the restricted metadata unpickler and CRC-32 checks of every file read."""

    def __init__(self, path: str, checksums: dict[str, dict[str, int]]) -> None:
        super().__init__(path)
        self._root, self._checksums = path, checksums
        self._verified: set[str] = set()
        self._metadata: Optional[Metadata] = None

    def _verify(self, name: str) -> None:
        if name not in self._verified:
            verify_file(self._root, name, self._checksums)
            self._verified.add(name)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:  # parsed once: the offline export reads one tensor per dcp.load
            self._verify(METADATA)
            self._metadata = read_metadata(self._root)
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            self._verify(name)
        return super().read_data(plan, planner)


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values load with ``torch.load(weights_only=True)``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            global_line = next((line for line in str(e).splitlines() if "global" in line.lower()), first)
            raise UnsafeCheckpointError(f"checkpoint {self._path!r}: refused to load {read_item.dest_index.fqn}: "
                                        f"{global_line.strip()}") from None
        clean = io.BytesIO()
        torch.save(obj, clean)  # only plain data survived weights_only: hand DCP that
        clean.seek(0)
        super().load_bytes(read_item, clean)
