"""Optimizer step time: sf_dist's kernel paths against torch's fused AdamW and schedulefree.

sf_dist rows use the default nonfinite="skip" (a finiteness check of the gradients) except
the "no check" row, which shows what that check costs.

    python -m sf_dist.bench step [--tensors 64 --rows 512 --cols 512 --reps 30 --dtype float32 --threads N]

Every optimizer gets its own copy of the same tensors; steps are interleaved round-robin and
each optimizer's median is reported, with ratios against torch.optim.AdamW(fused=True).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import sf_dist


def _candidates(with_reference: bool) -> dict[str, Callable]:
    c: dict[str, Callable] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "sf_dist AdamW fused": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, fused=True),
        "sf_dist AdamW fused, no check": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, fused=True,
                                                                              nonfinite="ignore"),
        "sf_dist AdamW foreach": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, foreach=True),
        "sf_dist AdamW single": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, foreach=False),
    }
    if with_reference:
        import schedulefree

        c["schedulefree AdamW foreach"] = lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-3, foreach=True)
    return c


def run(tensors: int, rows: int, cols: int, reps: int, dtype: torch.dtype, with_reference: bool = True) -> dict[str, float]:
    """Median step time in seconds of each candidate, measured interleaved in one process."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(rows, cols, generator=gen, dtype=dtype) for _ in range(tensors)]
    grads = [torch.randn(rows, cols, generator=gen, dtype=dtype) * 1e-3 for _ in range(tensors)]
    opts, params = {}, {}
    for name, make in _candidates(with_reference).items():
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        opts[name], params[name] = make(ps), ps
        if hasattr(opts[name], "train"):
            opts[name].train()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for rep in range(reps + 3):  # the first 3 rounds warm up (and compile the fused path)
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()  # the reference normalises grads in place: give each a fresh one
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if rep >= 3:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-reference", action="store_true", help="skip the schedulefree package")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    medians = run(args.tensors, args.rows, args.cols, args.reps, dtype, not args.no_reference)
    numel = args.tensors * args.rows * args.cols
    anchor = medians["torch AdamW fused"]
    print(f"{numel / 1e6:.1f}M {args.dtype} params in {args.tensors} tensors, "
          f"{torch.get_num_threads()} threads, median of {args.reps} interleaved steps")
    for name, t in medians.items():
        print(f"  {name:28s} {t * 1e3:8.2f} ms   {t / anchor:5.2f}x torch fused AdamW")
    ours = medians["sf_dist AdamW fused"]
    check = ours - medians["sf_dist AdamW fused, no check"]
    print(f"  the non-finite check (nonfinite='skip', the default) costs {check * 1e3:.2f} ms "
          f"({check / ours:+.0%} of the fused step)")
    if "schedulefree AdamW foreach" in medians:
        print(f"  sf_dist fused is {medians['schedulefree AdamW foreach'] / ours:.2f}x faster than schedulefree foreach")


if __name__ == "__main__":
    main()
