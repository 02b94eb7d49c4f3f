"""ZeRO data parallel: ZeroScheduleFree against DDP + torch AdamW and ZeroRedundancyOptimizer(AdamW).

    python -m sf_dist.bench zero [--worlds 1,2,4 --width 1024 --layers 4 --batch 16 --steps 8]

Spawns each world size on CPU/gloo (one thread a rank), trains the same MLP with every
candidate (steps interleaved round-robin), and prints per-rank median iteration time (forward + backward + step) and the
memory each rank's optimizer holds (state, fp32 masters, gradients kept after step), with
ratios against DDP + AdamW. ZeRO-2 also runs with overlap=False, which measures how much of
the gradient reduction the backward hooks hide.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MB = 2**20
ANCHOR = "DDP + AdamW"


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def _tensor_bytes(objs: Any) -> int:
    if isinstance(objs, torch.Tensor):
        return objs.numel() * objs.element_size()
    if isinstance(objs, dict):
        return sum(_tensor_bytes(v) for v in objs.values())
    return 0


def _candidates(model: nn.Module) -> dict[str, Callable[[], tuple[nn.Module, Any, Callable[[], dict]]]]:
    """name -> builder of (module to run, optimizer, per-rank memory in bytes)."""
    import copy

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sf_dist
    from sf_dist import ZeroScheduleFree

    def ddp_adamw():
        ddp = DDP(copy.deepcopy(model))
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        grads = lambda: sum(_tensor_bytes(p.grad) for p in ddp.parameters() if p.grad is not None)
        return ddp, opt, lambda: {"state": sum(_tensor_bytes(s) for s in opt.state.values()), "master": 0,
                                  "grads": grads()}

    def zero_ro():
        ddp = DDP(copy.deepcopy(model))
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
        grads = lambda: sum(_tensor_bytes(p.grad) for p in ddp.parameters() if p.grad is not None)
        return ddp, opt, lambda: {"state": sum(_tensor_bytes(s) for s in opt.optim.state.values()), "master": 0,
                                  "grads": grads()}

    def zero_sf(stage: int, overlap: bool, **optimizer_kwargs: Any):
        def build():
            net = copy.deepcopy(model)
            opt = ZeroScheduleFree(net.parameters(), sf_dist.AdamWScheduleFree, stage=stage, overlap=overlap,
                                   lr=1e-3, **optimizer_kwargs)
            opt.train()

            def memory():
                held = opt.held_numel()
                size = next(net.parameters()).element_size()
                state = sum(_tensor_bytes(s) for s in opt.inner.state.values())  # its own dtype (bf16 state)
                return {"state": state, "master": held["master"] * 4, "grads": held["grad"] * size}
            return net, opt, memory
        return build

    return {ANCHOR: ddp_adamw, "ZeroRedundancyOptimizer(AdamW)": zero_ro,
            "ZeroScheduleFree stage 1": zero_sf(1, True), "ZeroScheduleFree stage 2": zero_sf(2, True),
            "ZeroScheduleFree stage 2, overlap=False": zero_sf(2, False),
            "ZeroScheduleFree stage 2, bf16 state": zero_sf(2, True, state_dtype=torch.bfloat16)}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(args.width, args.layers)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    built = {name: build() for name, build in _candidates(model).items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    waits: dict[str, list[float]] = {name: [] for name in built}
    held: dict[str, dict] = {}
    for i in range(args.steps + 2):  # two warm-up rounds: DDP builds its buckets on the first
        for name, (net, opt, memory) in built.items():  # interleaved, so load spikes hit all alike
            dist.barrier()
            start = time.perf_counter()
            nn.functional.cross_entropy(net(x), y).backward()
            if hasattr(opt, "sync_grads"):  # ZeroScheduleFree: the reduction still to wait for
                after_backward = time.perf_counter()
                opt.sync_grads()
                waits[name].append(time.perf_counter() - after_backward)
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= 2:
                times[name].append(elapsed)
            held[name] = memory()
            opt.zero_grad()
    results = {}
    for name in built:
        every: list[Any] = [None] * world
        wait = statistics.median(waits[name][2:]) if waits[name] else 0.0
        dist.all_gather_object(every, (statistics.median(times[name]), held[name], wait))
        results[name] = {"time": max(t for t, _, _ in every), "wait": max(w for _, _, w in every),
                         "memory": max((h for _, h, _ in every), key=lambda h: sum(h.values()))}
    if rank == 0:
        out.put((world, sum(p.numel() for p in model.parameters()), results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> list[tuple[int, int, dict]]:
    """Spawn every world size in turn; return (world, params, {candidate: time and memory})."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    rows = []
    for world in args.worlds:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        rows.append(out.get())
        for p in procs:
            p.join()
    return rows


def _print(rows: list[tuple[int, int, dict]]) -> None:
    for world, numel, results in rows:
        base = results[ANCHOR]
        print(f"\nW={world}  ({numel / 1e6:.2f}M fp32 params, median of the slowest rank)")
        print(f"{'candidate':40s} {'step ms':>8s} {'vs DDP':>7s} {'state MB':>9s} {'master MB':>9s} "
              f"{'grads MB':>9s} {'total vs DDP':>12s}")
        for name, r in results.items():
            mem, total = r["memory"], sum(r["memory"].values())
            print(f"{name:40s} {r['time'] * 1e3:8.1f} {r['time'] / base['time']:6.2f}x {mem['state'] / MB:9.1f} "
                  f"{mem['master'] / MB:9.1f} {mem['grads'] / MB:9.1f} {total / sum(base['memory'].values()):11.2f}x")
        on, off = results["ZeroScheduleFree stage 2"], results["ZeroScheduleFree stage 2, overlap=False"]
        print(f"overlap (stage 2): gradient reduction still pending when backward returns: "
              f"{on['wait'] * 1e3:.1f} ms with hooks vs {off['wait'] * 1e3:.1f} ms without "
              f"({1 - on['wait'] / off['wait']:.0%} hidden); step time {on['time'] * 1e3:.1f} vs "
              f"{off['time'] * 1e3:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``python -m sf_dist.bench zero [options]``."""
    parser = argparse.ArgumentParser(prog="python -m sf_dist.bench zero", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=lambda s: [int(w) for w in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    _print(run(args))


if __name__ == "__main__":
    main()
