"""A safetensors file written one tensor at a time, so no rank holds the whole model to save it."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from torch import Tensor

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsWriter"]

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}

class SafetensorsWriter:
    """Streams tensors into the safetensors layout: 8-byte header size, JSON header, raw bytes.

    The header is written first from shapes and dtypes alone, so no tensor needs to be held
    while the others are gathered.
    """

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            if dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"save_eval_weights: tensor {name!r} has dtype {dtype}, which safetensors "
                                f"cannot store; supported: {sorted(map(str, SAFETENSORS_DTYPES))}")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}  # what transformers' from_pretrained checks for
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: Tensor) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors stream out of order: got {name!r}, expected {expected!r}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise RuntimeError(f"tensor {name!r} has {data.numel()} bytes, its header says {nbytes}")
        self._file.write(memoryview(data.numpy()))  # the tensor's own buffer: no second copy
        self._next += 1

    def close(self) -> None:
        self._file.close()

