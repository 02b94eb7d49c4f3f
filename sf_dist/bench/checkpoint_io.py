"""The price of the CRC-32 checks: checkpoint.save / load / verify against the same DCP I/O unchecked.

    python -m sf_dist.bench checkpoint_io [--mb 128 --tensors 32 --repeats 5 --dir DIR]

One process, a plain module of ``--tensors`` fp32 weights totalling ``--mb`` MB, AdamW (so the
checkpoint holds y, z and exp_avg_sq: 3x the model). Each repeat runs, interleaved: sf_dist's load
(which checks every file it reads), DCP's load of the same state through the same restricted planner
without the check, and ``checkpoint.verify`` (every file, CRC only); then sf_dist's save and its
CRC pass alone. Files sit in the page cache, so this is the CPU cost of the check, not the disk's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import sf_dist
from sf_dist import checkpoint
from sf_dist.checkpoint.manifest import crc32_file
from sf_dist.checkpoint.safe_dcp import SafePlanner


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sf_dist.bench checkpoint_io", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=128.0)
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    side = int((args.mb * 2**20 / 4 / args.tensors) ** 0.5)
    model = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(args.tensors)])
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.init_state()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        path = f"{root}/ckpt"
        checkpoint.save(path, model, opt)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        rows: dict[str, list[float]] = {"sf_dist load (checked)": [], "DCP load, same planner (unchecked)": [],
                                        "checkpoint.verify (CRC only)": [], "sf_dist save": [], "CRC pass of save": []}
        for _ in range(args.repeats):
            rows["sf_dist load (checked)"].append(_timed(lambda: checkpoint.load(path, model, opt)))

            def unchecked() -> None:
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                dcp.load(state, storage_reader=FileSystemReader(path), planner=SafePlanner(path))
            rows["DCP load, same planner (unchecked)"].append(_timed(unchecked))
            rows["checkpoint.verify (CRC only)"].append(_timed(lambda: checkpoint.verify(path)))
            rows["sf_dist save"].append(_timed(lambda: checkpoint.save(path, model, opt)))
            rows["CRC pass of save"].append(_timed(lambda: [crc32_file(os.path.join(path, f)) for f in os.listdir(path)]))
    print(f"checkpoint of {size / 2**20:.0f} MiB ({args.tensors} tensors x 3), {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    for name, times in rows.items():
        print(f"  {name:38s} median {statistics.median(times) * 1e3:8.1f} ms   min {min(times) * 1e3:8.1f} ms")
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"  checked / unchecked load: {med['sf_dist load (checked)'] / med['DCP load, same planner (unchecked)']:.2f}x;"
          f" CRC at {size / med['checkpoint.verify (CRC only)'] / 1e9:.2f} GB/s;"
          f" CRC pass / save: {med['CRC pass of save'] / med['sf_dist save']:.2f}")


if __name__ == "__main__":
    main()
