"""Optimizer step time on two parameter lists: sf_dist against torch's fused AdamW and schedulefree.

"sf_dist AdamW (default)" is what a user gets: the fused kernel and the default nonfinite="skip"
check of the gradients; the "no check" row shows what that check costs.

    python -m sf_dist.bench step [--lists square gpt2] [--grads set backward] [--reps 20] [--threads N]

Lists: "square" is 64 tensors of 512x512 (16.8M params); "gpt2" is GPT-2 small's 148 tensors
(124M params, the tied embedding counted once). Every optimizer gets its own copy of the same
tensors and gradient buffers; steps are interleaved round-robin and each optimizer's median and
minimum are reported, with ratios against torch.optim.AdamW(fused=True) from the same rounds.
Gradients either are copied into ``.grad`` before each step ("set") or come from a real backward of
``sum((p * w).sum())``, which writes each gradient once ("backward"); that mode prints the step
alone and backward + step, so any cost moved into backward shows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import sf_dist


def square_shapes() -> list[tuple[int, ...]]:
    """64 tensors of 512x512."""
    return [(512, 512)] * 64


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (HF GPT2LMHeadModel, lm_head tied to wte): 148 tensors, 124.4M."""
    block = [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
             (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return [(vocab, width), (context, width)] + block * layers + [(width,), (width,)]


LISTS = {"square": square_shapes, "gpt2": gpt2_shapes}


def candidates(full: bool, with_reference: bool) -> dict[str, Callable]:
    """Optimizer factories by row name; ``full`` adds the slow foreach and per-tensor paths."""
    c: dict[str, Callable] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "sf_dist AdamW (default)": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3),
        "sf_dist AdamW, no check": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, nonfinite="ignore"),
    }
    if full:
        c["torch AdamW foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        c["sf_dist AdamW foreach"] = lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, foreach=True)
        c["sf_dist AdamW per-tensor"] = lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, foreach=False)
    if with_reference:
        import schedulefree

        c["schedulefree AdamW foreach"] = lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-3, foreach=True)
    return c


def _setup(shapes: list[tuple[int, ...]], dtype: torch.dtype, makers: dict[str, Callable]):
    """Each candidate's optimizer over its own copy of the same tensors, and the gradients to use."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=dtype) * 1e-3 for s in shapes]
    opts, params = {}, {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        opts[name], params[name] = make(ps), ps
        if hasattr(opts[name], "train"):
            opts[name].train()
    return opts, params, grads


def run(shapes: list[tuple[int, ...]], reps: int, dtype: torch.dtype, makers: dict[str, Callable]) -> dict[str, list[float]]:
    """Step times in seconds of each candidate, grads copied in by hand, measured interleaved in one process."""
    opts, params, grads = _setup(shapes, dtype, makers)
    for ps in params.values():
        for p in ps:
            p.grad = torch.empty_like(p)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for rep in range(reps + 3):  # the first 3 rounds warm up (and build the CPU kernel)
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad.copy_(g)  # the reference normalises grads in place: refresh each one
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if rep >= 3:
                times[name].append(elapsed)
    return times


def run_backward(shapes: list[tuple[int, ...]], reps: int, dtype: torch.dtype,
                 makers: dict[str, Callable]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(step, backward + step) times in seconds of each candidate, the grads from a real backward of
    ``sum((p * w).sum())`` (grad = w, written once per tensor; the forward is not timed), interleaved."""
    opts, params, grads = _setup(shapes, dtype, makers)
    steps: dict[str, list[float]] = {name: [] for name in opts}
    both: dict[str, list[float]] = {name: [] for name in opts}
    for rep in range(reps + 3):
        for name, opt in opts.items():
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = torch.stack([(p * w).sum() for p, w in zip(params[name], grads)]).sum()
            start = time.perf_counter()
            loss.backward()
            middle = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if rep >= 3:
                steps[name].append(end - middle)
                both[name].append(end - start)
    return steps, both


def report(label: str, times: dict[str, list[float]], check_line: bool = True) -> None:
    """Print median and min per candidate and the ratios to torch fused AdamW."""
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    anchor, anchor_low = med["torch AdamW fused"], low["torch AdamW fused"]
    print(label)
    print(f"  {'candidate':28s} {'median':>9s} {'ratio':>6s} {'min':>9s} {'ratio':>6s}")
    for name in times:
        print(f"  {name:28s} {med[name] * 1e3:7.2f}ms {med[name] / anchor:5.2f}x "
              f"{low[name] * 1e3:7.2f}ms {low[name] / anchor_low:5.2f}x")
    ours, bare = med["sf_dist AdamW (default)"], med["sf_dist AdamW, no check"]
    if check_line:
        print(f"  the default non-finite check costs {(ours - bare) * 1e3:.2f} ms ({(ours - bare) / ours:+.0%}); "
              f"target: default <= 1.05x torch fused AdamW, measured {ours / anchor:.2f}x (median)")
    if "schedulefree AdamW foreach" in med:
        print(f"  sf_dist default is {med['schedulefree AdamW foreach'] / ours:.2f}x faster than schedulefree foreach")


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sf_dist.bench step``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", nargs="+", default=list(LISTS), choices=list(LISTS))
    parser.add_argument("--grads", nargs="+", default=["set", "backward"], choices=["set", "backward"],
                        help="set: copied into .grad before each step; backward: from a real backward")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--full", action="store_true", help="also the foreach and per-tensor paths (slow)")
    parser.add_argument("--no-reference", action="store_true", help="skip the schedulefree package")
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    makers = candidates(args.full, not args.no_reference)
    for name in args.lists:
        shapes = LISTS[name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        what = f"{name}: {numel / 1e6:.1f}M {args.dtype} params in {len(shapes)} tensors, " \
               f"{torch.get_num_threads()} threads, {args.reps} interleaved rounds"
        if "set" in args.grads:
            report(f"{what}; grads set by hand, step()", run(shapes, args.reps, dtype, makers))
        if "backward" in args.grads:
            steps, both = run_backward(shapes, args.reps, dtype, makers)
            report(f"{what}; grads from backward, step() alone", steps, check_line=False)
            report(f"{what}; grads from backward, backward + step()", both)

if __name__ == "__main__":
    main()
