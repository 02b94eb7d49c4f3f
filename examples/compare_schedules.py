"""Schedule-Free AdamW and ScheduleFree+ against AdamW with warmup + cosine, warmup-stable-decay, constant lr.

Each method's lr is picked from the same grid by the mean final validation loss over the seeds
(or over ``--tune-seeds`` alone; the other seeds then run at the picked lr only).
Reported: final validation loss (mean, spread), validation loss at 25/50/75% of the budget from
the full-budget run (the "anytime" view), cosine restarted with each shorter budget (what cosine
needs for the same number), wall time, and a plot. Single-process runs, ``--jobs`` in parallel.

    python examples/compare_schedules.py --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_data import load_corpus, train_batch, val_batches  # noqa: E402
from lm_optim import build_optimizer  # noqa: E402
from tiny_gpt import GPTConfig, TinyGPT  # noqa: E402

METHODS = {"sf_adamw": "Schedule-Free AdamW, constant lr", "sf_adamw_bf16": "Schedule-Free AdamW, bf16 state",
           "sf_plus": "ScheduleFree+ (AdamC, Polyak step)",
           "adamw_cosine": "AdamW, warmup + cosine to 0",
           "adamw_wsd": "AdamW, warmup-stable-decay (linear to 0 over the last 20%)",
           "adamw_constant": "AdamW, warmup + constant lr"}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_DATA: dict = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="the full budget")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3], help="the lr grid, the same for every method but sf_plus")
    p.add_argument("--plus-lrs", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                   help="ScheduleFree+'s grid: its lr multiplies the Polyak step size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (initialisation and data order)")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=None,
                   help="seeds the lr grid runs on (default: all); the rest run at each method's picked lr")
    p.add_argument("--no-restart", action="store_true", help="skip cosine restarted with 25/50/75%% of the budget")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to compare")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam's second-moment decay, for every method")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="linear warmup, as a fraction of each run's budget")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--block-size", type=int, default=64, help="context length in bytes")
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=64, help="model width")
    p.add_argument("--eval-points", type=int, default=20, help="validation passes along each run")
    p.add_argument("--eval-seqs", type=int, default=256, help="validation windows (a fixed set)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    return p.parse_args(argv)


def _init_worker() -> None:
    torch.set_num_threads(1)
    _DATA["train"], val = load_corpus()
    _DATA["val"] = val


@torch.no_grad()
def _val_loss(model: TinyGPT, windows: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    loss = sum(F.cross_entropy(model(w).flatten(0, 1), t.flatten(), reduction="sum").item()
               for w, t in zip(windows.split(64), targets.split(64)))
    model.train()
    return loss / targets.numel()


def run_one(job: dict) -> dict:
    """Train one (method, lr, seed, budget); validation loss at x for Schedule-Free at each eval step."""
    cfg = GPTConfig(block_size=job["block_size"], n_layer=job["n_layer"], n_head=job["n_head"], n_embd=job["n_embd"])
    windows, targets = (torch.cat(t) for t in zip(*val_batches(_DATA["val"], job["eval_seqs"], 1, cfg.block_size)))
    torch.manual_seed(job["seed"])
    model = TinyGPT(cfg)
    steps = job["steps"]
    opt, sched = build_optimizer(job["method"], model.parameters(), job["lr"], job["warmup"], steps, beta2=job["beta2"])
    schedule_free = sched is None
    if schedule_free:
        opt.train()
    curve, curve_y = {}, {}  # validation at x (the eval weights) and, for Schedule-Free, at y
    start, eval_s = time.perf_counter(), 0.0  # wall time reported without the validation passes
    for step in range(steps):
        idx, tgt = train_batch(_DATA["train"], job["batch_size"], cfg.block_size, job["seed"], step, 0, 1)
        loss = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss.detach()) if getattr(opt, "takes_loss", False) else opt.step()
        if sched is not None:
            sched.step()
        if step + 1 in job["eval_at"]:
            began = time.perf_counter()
            if schedule_free:
                curve_y[step + 1] = _val_loss(model, windows, targets)
                opt.eval()
            curve[step + 1] = _val_loss(model, windows, targets)
            if schedule_free:
                opt.train()
            eval_s += time.perf_counter() - began
    return {**job, "curve": curve, "curve_y": curve_y, "wall_s": time.perf_counter() - start - eval_s}


def _run_all(pool, jobs: list[dict], label: str) -> list[dict]:
    """Run ``jobs`` on the pool with a progress bar; results in job order."""
    from tqdm import tqdm

    return list(tqdm(pool.imap(run_one, jobs, chunksize=1), total=len(jobs), desc=label, unit="run"))


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = dict(batch_size=args.batch_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd, eval_seqs=args.eval_seqs, beta2=args.beta2)
    marks = sorted({round(args.steps * f) for f in FRACTIONS} | {round(args.steps * (i + 1) / args.eval_points) for i in range(args.eval_points)})

    def job(method: str, lr: float, seed: int, steps: int, eval_at: list[int]) -> dict:
        return {**base, "method": method, "lr": lr, "seed": seed, "steps": steps,
                "warmup": max(round(args.warmup_frac * steps), 1), "eval_at": eval_at}

    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker) as pool:
        tune = args.tune_seeds or args.seeds
        grid = _run_all(pool, [job(m, lr, s, args.steps, marks) for m in args.methods for lr in _lrs(args, m)
                               for s in tune], "lr grid")
        final = {(r["method"], r["lr"]): [] for r in grid}
        for r in grid:
            final[(r["method"], r["lr"])].append(r["curve"][args.steps])
        best_lr = {m: min(_lrs(args, m), key=lambda lr: statistics.fmean(final[(m, lr)])) for m in args.methods}
        grid += _run_all(pool, [job(m, best_lr[m], s, args.steps, marks) for m in args.methods
                                for s in args.seeds if s not in tune], "other seeds at the picked lr")
        short = [round(args.steps * f) for f in FRACTIONS[:-1]] if "adamw_cosine" in args.methods and not args.no_restart else []
        restarted = _run_all(pool, [job("adamw_cosine", best_lr["adamw_cosine"], s, b, [b]) for b in short for s in args.seeds],
                             "cosine restarted per budget")
    total_s = time.perf_counter() - started

    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "total_seconds": total_s, "best_lr": best_lr, "methods": {}}
    for m in args.methods:
        runs = [r for r in grid if r["method"] == m and r["lr"] == best_lr[m]]
        results["methods"][m] = {
            "lr": best_lr[m],
            "grid_final": {str(lr): _stats(final[(m, lr)]) for lr in _lrs(args, m)},
            "at": {str(round(args.steps * f)): _stats([r["curve"][round(args.steps * f)] for r in runs]) for f in FRACTIONS},
            "curve": {str(s): _stats([r["curve"][s] for r in runs]) for s in marks},
            "wall_s": _stats([r["wall_s"] for r in runs]),
        }
        if runs[0]["curve_y"]:
            results["methods"][m]["at_y"] = {str(round(args.steps * f)): _stats([r["curve_y"][round(args.steps * f)] for r in runs])
                                             for f in FRACTIONS}
    results["cosine_restarted"] = {str(b): _stats([r["curve"][b] for r in restarted if r["steps"] == b]) for b in short}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = report(results, args)
    (args.out / "results.md").write_text(table)
    plot(results, args, args.out / "compare.png")
    print(table)
    print(f"wrote {args.out}/results.json, results.md, compare.png ({total_s:.0f} s)")
    return results


def _lrs(args: argparse.Namespace, method: str) -> list[float]:
    """The lr grid of ``method``: ScheduleFree+'s lr is a multiplier of its own step size."""
    return args.plus_lrs if method == "sf_plus" else args.lrs


def _fmt(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def report(results: dict, args: argparse.Namespace) -> str:
    """Markdown tables: tuned lr, loss at each fraction of the budget, grid, restarted cosine."""
    fr = [str(round(args.steps * f)) for f in FRACTIONS]
    lines = [f"Validation loss (nats/byte; Schedule-Free at x), mean ± std [min, max] over seeds {args.seeds}; "
             f"{args.steps} steps, lr grid {args.lrs}, warmup {args.warmup_frac:.0%}, betas (0.9, {args.beta2})"
             + (f"; lr picked on seeds {args.tune_seeds}." if args.tune_seeds else "."), "",
             "| method | lr | " + " | ".join(f"step {s} ({f:.0%})" for s, f in zip(fr, FRACTIONS)) + " | train s/run |",
             "|---|---|" + "---|" * len(fr) + "---|"]
    for m, r in results["methods"].items():
        lines.append(f"| {METHODS[m]} | {r['lr']:g} | " + " | ".join(_fmt(r["at"][s]) for s in fr) + f" | {r['wall_s']['mean']:.1f} |")
    if results["cosine_restarted"]:
        lines.append("| AdamW cosine, restarted with this budget | {:g} | ".format(results["best_lr"]["adamw_cosine"])
                     + " | ".join(_fmt(results["cosine_restarted"][s]) for s in fr[:-1]) + " | (full run above) | |")
    for m, r in results["methods"].items():
        if "at_y" in r:
            lines.append(f"| {METHODS[m]}, evaluated at y (train weights) | {r['lr']:g} | "
                         + " | ".join(_fmt(r["at_y"][s]) for s in fr) + " | |")
    width = max(len(_lrs(args, m)) for m in results["methods"])
    lines += ["", f"Final validation loss over the lr grid (mean ± std over seeds {args.tune_seeds or args.seeds}; "
              "ScheduleFree+ on --plus-lrs):", "",
              "| method | " + " | ".join(f"grid lr {i + 1}" for i in range(width)) + " |", "|---|" + "---|" * width]
    for m, r in results["methods"].items():
        lines.append(f"| {METHODS[m]} | " + " | ".join(f"lr {lr:g}: {r['grid_final'][str(lr)]['mean']:.4f} ± "
                                                       f"{r['grid_final'][str(lr)]['std']:.4f}" for lr in _lrs(args, m)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Mean validation curve per method at its tuned lr (band: min-max over seeds), restarted cosine as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m, r in results["methods"].items():
        steps = sorted(int(s) for s in r["curve"])
        mean = [r["curve"][str(s)]["mean"] for s in steps]
        line, = ax.plot(steps, mean, label=f"{METHODS[m]} (lr {r['lr']:g})")
        ax.fill_between(steps, [r["curve"][str(s)]["min"] for s in steps], [r["curve"][str(s)]["max"] for s in steps],
                        color=line.get_color(), alpha=0.2)
    restarted = results["cosine_restarted"]
    if restarted:
        ax.errorbar([int(b) for b in restarted], [v["mean"] for v in restarted.values()],
                    yerr=[v["std"] for v in restarted.values()], fmt="k^", capsize=3,
                    label="AdamW cosine restarted per budget (end point)")
    ax.set(xlabel="step", ylabel="validation loss (nats / byte)",
           title=f"Schedule-Free vs cosine AdamW, {len(args.seeds)} seeds, tuned lr")
    first = min(r["curve"][str(min(int(s) for s in r["curve"]))]["mean"] for r in results["methods"].values())
    ax.set_ylim(top=first + 0.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
