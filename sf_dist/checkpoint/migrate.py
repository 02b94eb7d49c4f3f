"""``python -m sf_dist.checkpoint.migrate OLD NEW --trust-pickle``: a checkpoint of an older sf_dist
(which pickled ``extra`` and the optimizer class into DCP) rewritten in today's data-only format.

Reading OLD unpickles it, which runs whatever code the file names: only for files you trust, so the
flag is required. One process, no process group; the whole checkpoint passes through memory once.
NEW loads with :func:`sf_dist.checkpoint.load` at any world size (every rank gets the old ``extra``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ..safetensors_stream import atomic_write, fsync_dir
from .manifest import FORMAT, MANIFEST, crc32_file, dumps, encode, extra_name
from .safe_dcp import METADATA

__all__ = ["migrate", "main"]

_CLASSES = {"AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"}


def migrate(old: str, new: str, trust_pickle: bool = False, optimizer_class: Optional[str] = None) -> None:
    """Rewrite the old-format checkpoint ``old`` as ``new``; unpickles ``old``, so ``trust_pickle`` must be True.

    >>> migrate("ckpt/step_1000", "ckpt_v1/step_1000", trust_pickle=True)  # doctest: +SKIP
    """
    if not trust_pickle:
        raise PermissionError(f"{old}: an old sf_dist checkpoint holds pickles, and unpickling runs any code they "
                              "name. Pass --trust-pickle (trust_pickle=True) only for a file you or a trusted job "
                              "wrote; nothing was read")
    old, new = os.path.normpath(old), os.path.normpath(new)
    if os.path.exists(os.path.join(old, MANIFEST)):
        raise ValueError(f"{old} is already an {FORMAT} checkpoint: load it as it is")
    if not os.path.isfile(os.path.join(old, METADATA)):
        raise FileNotFoundError(f"{old} is not a DCP checkpoint (no {METADATA})")
    if os.path.exists(new):
        raise FileExistsError(f"{new} exists: choose a new path, nothing is overwritten")
    state = _read_trusted(old)
    extra = pickle.loads(state.pop("extra")) if "extra" in state else None
    saved_class = state.pop("optimizer_class", None)
    name = pickle.loads(saved_class) if saved_class is not None else optimizer_class
    if name is None:
        raise ValueError(f"{old} does not record its optimizer class (the oldest sf_dist saved none): pass "
                         "--optimizer-class, e.g. AdamWScheduleFree")
    if name not in _CLASSES:
        raise ValueError(f"{old} was saved by {name}: only checkpoints of {sorted(_CLASSES)} migrate (a "
                         "ZeroScheduleFree checkpoint keeps its state in buckets this tool does not rewrite)")
    if set(state) != {"model", "optim"} or not isinstance(state["optim"].get("param_groups"), list):
        raise ValueError(f"{old} holds {sorted(state)}, not an sf_dist checkpoint's model, optim and extra")
    groups = state["optim"]["param_groups"]
    manifest = {"format": FORMAT, "step": max((int(g.get("k", 0)) for g in groups), default=0),
                "saved_at": time.time(), "world_size": 1, "optimizer_class": name,
                "param_groups": [len(g["params"]) for g in groups], "x": _x_recipe(name, state)}
    tmp = new + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        dcp.save(state, checkpoint_id=tmp, no_dist=True)
        with open(os.path.join(tmp, extra_name(0)), "wb") as f:
            f.write(dumps(encode(extra)))
        manifest["files"] = {f: crc32_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        atomic_write(os.path.join(tmp, MANIFEST), lambda f: f.write(dumps(manifest)))
        os.rename(tmp, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(new)))


def _read_trusted(old: str) -> dict[str, Any]:
    """The whole old checkpoint as one nested dict, through DCP's own (pickling) reader."""
    with tempfile.TemporaryDirectory(prefix="sf_dist_migrate_") as scratch:
        whole = os.path.join(scratch, "state.pt")
        dcp_to_torch_save(old, whole)
        return torch.load(whole, weights_only=False)  # trusted by the caller: the old format needs pickle


def _x_recipe(name: str, state: dict[str, Any]) -> dict[str, Any]:
    """How the offline export derives x, as checkpoint.save records it for sf_dist's own optimizers."""
    groups = state["optim"]["param_groups"]
    entries = []
    for group in groups:
        b1 = group["momentum"] if name == "SGDScheduleFree" else group["betas"][0]
        for fqn in group["params"]:
            entries.append({"name": fqn, "z": f"optim.state.{fqn}.z", "offset": 0, "weight": 1 - 1 / b1,
                            "foreach": bool(group.get("foreach"))})
    return {"train_mode": all(g.get("train_mode", True) for g in groups), "params": entries}


def main(argv: Optional[list[str]] = None) -> None:
    """Command line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m sf_dist.checkpoint.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="a checkpoint directory written by an older sf_dist")
    parser.add_argument("new", help="where the migrated checkpoint goes (must not exist)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="you trust OLD: reading it unpickles it, which can run code")
    parser.add_argument("--optimizer-class", default=None, help="for checkpoints that recorded none")
    args = parser.parse_args(argv)
    try:
        migrate(args.old, args.new, args.trust_pickle, args.optimizer_class)
    except (PermissionError, ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"migrated {args.old} to {args.new}")


if __name__ == "__main__":
    main()
