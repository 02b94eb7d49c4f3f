"""Peak memory of ``python -m sf_dist.export`` on an sf_dist checkpoint, against its largest tensor.

    python -m sf_dist.bench offline_export_memory [--big-mb 64 --small 200 --small-kb 64]

Saves a plain-module AdamW checkpoint (one large weight, many small ones) in this process, then runs
the offline export in a fresh process and reports its peak resident-set growth over the level after
imports (Linux /proc/self/statm, sampled every millisecond), as a ratio to the largest tensor and to the whole model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import torch
from torch import nn

import sf_dist
from sf_dist import checkpoint

_CHILD = """
import os, sys, threading, time
from sf_dist.checkpoint.offline import export_checkpoint
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
before = rss()
thread = threading.Thread(target=sample)
thread.start()
export_checkpoint(sys.argv[1], sys.argv[2])
done[0] = True
thread.join()
print(peak[0] - before)
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sf_dist.bench offline_export_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mb", type=float, default=64.0)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--small-kb", type=float, default=64.0)
    args = parser.parse_args()
    big = int(args.big_mb * 2**20 / 4)
    small = int(args.small_kb * 1024 / 4)
    model = nn.ParameterList([nn.Parameter(torch.randn(big))] + [nn.Parameter(torch.randn(small)) for _ in range(args.small)])
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.init_state()
    total = sum(p.numel() * 4 for p in model.parameters())
    with tempfile.TemporaryDirectory() as root:
        checkpoint.save(f"{root}/ckpt", model, opt)
        done = subprocess.run([sys.executable, "-c", _CHILD, f"{root}/ckpt", f"{root}/x.safetensors"],
                              capture_output=True, text=True, check=True)
        peak = int(done.stdout.strip().splitlines()[-1])
    print(f"model {total / 2**20:.0f} MiB (largest tensor {big * 4 / 2**20:.0f} MiB, {args.small} small ones); "
          f"export peak RSS growth {peak / 2**20:.0f} MiB = {peak / (big * 4):.2f}x the largest tensor, "
          f"{peak / total:.2f}x the model")


if __name__ == "__main__":
    main()
