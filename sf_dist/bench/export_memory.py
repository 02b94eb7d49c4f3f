"""Peak memory of exporting x: sf_dist.save_eval_weights against a whole-state-dict export.

    python -m sf_dist.bench export_memory [--big-mb 64 --small 400 --small-kb 256 --world 2]

The model has one large tensor and many small ones. Each variant runs in fresh processes
(FSDP2 and, where DeepSpeed is installed, a DeepSpeed ZeRO-3 engine over gloo at --world ranks,
and a plain module in one process); a thread samples the
resident set size (Linux /proc) every millisecond, and the peak growth over the pre-export
level is reported per rank, with its ratio to the model size. Linux with glibc only: large
allocations are forced onto their own mmap so freed memory cannot be silently reused.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sf_dist
from sf_dist.weights import save_eval_weights

MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tight_malloc() -> ctypes.CDLL:
    """glibc: serve every allocation of 64 KiB or more by its own mmap, so that freed memory
    leaves the resident set at once and a later allocation cannot hide in it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also turns off glibc's dynamic threshold)
    return libc


def _peak_growth(fn: Callable[[], None]) -> int:
    """Bytes of resident memory added at the peak of ``fn()`` over the level before it."""
    gc.collect()
    _tight_malloc().malloc_trim(0)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss()) - base


class _Leaf(nn.Module):
    """One tensor in a module of its own, so ZeRO-3 gathers it when its forward runs."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return scale * self.weight.square().mean()


class _Params(nn.Module):
    """One large tensor and many small ones; the forward touches them all (for an engine's step)."""

    def __init__(self, big_mb: int, small: int, small_kb: int) -> None:
        super().__init__()
        self.big = _Leaf(big_mb * MB // 4 // 1024, 1024)
        self.small = nn.ModuleList(_Leaf(small_kb * 1024 // 4 // 64, 64) for _ in range(small))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return self.big(scale) + sum(leaf(scale) for leaf in self.small)


def _model(big_mb: int, small: int, small_kb: int) -> nn.Module:
    return _Params(big_mb, small, small_kb)


def _naive(model: nn.Module, opt: sf_dist.AdamWScheduleFree, path: str, sharded: bool) -> None:
    """What users write today: eval(), the whole state dict on rank 0, save_file, train()."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opt.eval()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if sharded else model.state_dict()
    if not sharded or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    del sd
    opt.train()


def _measure(variant: str, sharded: bool, args: argparse.Namespace, out: str) -> dict[str, int]:
    torch.set_num_threads(1)
    _tight_malloc()
    model = _model(args.big_mb, args.small, args.small_kb)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    path = os.path.join(out, f"{variant}.safetensors")
    if variant == "sf_dist":
        growth = _peak_growth(lambda: save_eval_weights(model, opt, path))
    else:
        growth = _peak_growth(lambda: _naive(model, opt, path, sharded))
    return {"growth": growth}


def _naive_engine(engine: nn.Module, opt: object, path: str) -> None:
    """The engine's export before streaming: every tensor of x in one dict on rank 0, then save_file."""
    from safetensors.torch import save_file
    sd = sf_dist.eval_state_dict(engine, opt)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    del sd


def _measure_deepspeed(variant: str, args: argparse.Namespace, out: str) -> dict[str, int]:
    """A DeepSpeed ZeRO-3 engine (fp32 masters, one step taken, in train mode) exporting x."""
    import sf_dist.deepspeed as sfds
    torch.set_num_threads(1)
    _tight_malloc()
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamWScheduleFree", "params": {"lr": 1e-3}}}
    engine, opt, _, _ = sfds.initialize(model=_model(args.big_mb, args.small, args.small_kb), config=config)
    opt.train()
    engine.backward(engine(torch.ones(())))
    engine.step()
    path = os.path.join(out, f"ds_{variant}.safetensors")
    if variant == "sf_dist":
        return {"growth": _peak_growth(lambda: save_eval_weights(engine, opt, path))}
    return {"growth": _peak_growth(lambda: _naive_engine(engine, opt, path))}


def _rank_main(rank: int, world: int, store: str, variant: str, args: argparse.Namespace, out: str,
               engine: str = "fsdp2") -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if engine == "deepspeed":  # DeepSpeed reads the rank layout from the environment
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
        result = _measure_deepspeed(variant, args, out)
        variant = f"ds_{variant}"
    else:
        result = _measure(variant, True, args, out)
    torch.save(result, os.path.join(out, f"{variant}.rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=64, help="size of the one large fp32 tensor")
    parser.add_argument("--small", type=int, default=400, help="number of small tensors")
    parser.add_argument("--small-kb", type=int, default=256, help="size of each small tensor")
    parser.add_argument("--world", type=int, default=2, help="FSDP2 ranks (gloo, CPU)")
    args = parser.parse_args()
    total_mb = args.big_mb + args.small * args.small_kb / 1024
    print(f"model: one {args.big_mb} MB tensor + {args.small} x {args.small_kb} KB = {total_mb:.0f} MB fp32")
    with tempfile.TemporaryDirectory() as out:
        print(f"\nFSDP2, {args.world} ranks (peak RSS growth during the export, MB; ratio to model size)")
        for variant in ("naive", "sf_dist"):
            store = os.path.join(out, f"store_{variant}")
            mp.spawn(_rank_main, args=(args.world, store, variant, args, out), nprocs=args.world)
            rows = [torch.load(os.path.join(out, f"{variant}.rank{r}.pt")) for r in range(args.world)]
            cells = "  ".join(f"rank{r} {row['growth'] / MB:7.1f} ({row['growth'] / MB / total_mb:.2f}x)"
                              for r, row in enumerate(rows))
            print(f"  {_label(variant):44s} {cells}")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("\nDeepSpeed ZeRO-3: skipped (deepspeed is not installed)")
        else:
            print(f"\nDeepSpeed ZeRO-3 engine, {args.world} ranks (peak RSS growth during the export, MB; "
                  "ratio to model size)")
            for variant in ("naive", "sf_dist"):
                store = os.path.join(out, f"store_ds_{variant}")
                mp.spawn(_rank_main, args=(args.world, store, variant, args, out, "deepspeed"), nprocs=args.world)
                rows = [torch.load(os.path.join(out, f"ds_{variant}.rank{r}.pt")) for r in range(args.world)]
                cells = "  ".join(f"rank{r} {row['growth'] / MB:7.1f} ({row['growth'] / MB / total_mb:.2f}x)"
                                  for r, row in enumerate(rows))
                label = "sf_dist.save_eval_weights (streamed)" if variant == "sf_dist" else \
                    "eval_state_dict + save_file (before)"
                print(f"  {label:44s} {cells}")
        print("\nplain module, one process")
        for variant in ("naive", "sf_dist"):
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=_plain_main, args=(variant, args, out))
            p.start()
            p.join()
            growth = torch.load(os.path.join(out, f"{variant}.plain.pt"))["growth"]
            print(f"  {_label(variant):44s} {growth / MB:7.1f} ({growth / MB / total_mb:.2f}x)")


def _plain_main(variant: str, args: argparse.Namespace, out: str) -> None:
    torch.save(_measure(variant, False, args, out), os.path.join(out, f"{variant}.plain.pt"))


def _label(variant: str) -> str:
    return "sf_dist.save_eval_weights" if variant == "sf_dist" else "eval() + full state dict + save_file"
