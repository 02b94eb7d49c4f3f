"""sf_dist's own files in a checkpoint directory, all plain JSON: the manifest (``sf_dist.json``:
step, optimizer class, param-group structure, the size and CRC-32 of every file) and one
``extra_<rank>.json`` per rank. Nothing here is ever unpickled."""

from __future__ import annotations

import base64
import json
import os
import zlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["MANIFEST", "FORMAT", "encode", "decode", "crc32_file", "verify_file", "read_manifest",
           "extra_name", "dumps"]

MANIFEST = "sf_dist.json"
FORMAT = "sf_dist.checkpoint/1"
_CHUNK = 16 << 20


def extra_name(rank: int) -> str:
    return f"extra_{rank}.json"


def encode(value: Any, where: str = "extra") -> Any:
    """``value`` as JSON data: None, bool, int, float, str, list, tuple, dict with str keys, Tensor.

    >>> encode({"step": 3, "rng": torch.get_rng_state()})  # doctest: +SKIP
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "data": base64.b64encode(data).decode()}}
    if isinstance(value, (list, tuple)):
        items = [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint {where}: key {bad[0]!r} is a {type(bad[0]).__name__}; extra is stored as "
                            "JSON, whose keys are strings: use str keys")
        return {"__dict__": {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise TypeError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}; extra holds only None, "
                    "bool, int, float, str, list, tuple, dict (str keys) and torch tensors, so that loading it runs "
                    "no code. Convert it first (e.g. numpy arrays with torch.from_numpy, objects to dicts)")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v) for k, v in value["__dict__"].items()}
    spec = value["__tensor__"]
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"extra holds a tensor of unknown dtype {spec['dtype']!r}")
    raw = bytearray(base64.b64decode(spec["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(spec["shape"]).clone()


def crc32_file(path: str) -> dict[str, int]:
    """{"size", "crc32"} of a file, read in 16 MiB pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def verify_file(root: str, name: str, checksums: dict[str, dict[str, int]]) -> None:
    """Raise RuntimeError unless ``root/name`` has the size and CRC-32 the manifest recorded."""
    want = checksums.get(name)
    if want is None:
        raise RuntimeError(f"checkpoint {root!r}: {name} is not listed in its {MANIFEST}: a file added after the save")
    got = crc32_file(os.path.join(root, name))
    if got != want:
        raise RuntimeError(f"checkpoint {root!r} is corrupt: {name} has {got['size']} bytes with CRC-32 "
                           f"{got['crc32']:08x}, saved as {want['size']} bytes with {want['crc32']:08x} "
                           "(damaged copy or disk); load an earlier checkpoint")


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is present with its recorded size."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no sf_dist checkpoint at {path!r} (missing {file})")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeError(f"checkpoint {path!r} is corrupt: {file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RuntimeError(f"checkpoint {path!r}: {file} is not an {FORMAT} manifest")
    for name, want in sorted(manifest["files"].items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: shard file {file} is missing")
        if os.path.getsize(file) != want["size"]:
            raise RuntimeError(f"checkpoint {path!r} is corrupt: shard file {file} has {os.path.getsize(file)} "
                               f"bytes, its manifest says {want['size']} (truncated copy?)")
    return manifest


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (floats round-trip exactly; NaN and inf allowed)."""
    return json.dumps(value, separators=(",", ":")).encode()
