"""Train a small GPT on the Python standard library's sources with a Schedule-Free optimizer.

    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --backend fsdp2 --steps 500

On rank 0: a progress bar, a CSV of losses (validation at x, the eval weights, and at y, the
train weights), then a PNG plot, an export of x in safetensors and a short text sample. gloo on
CPU, NCCL when CUDA is present. Runs as a single process too (no torchrun needed).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sf_dist  # noqa: E402
from lm_data import load_corpus, train_batch, val_batches  # noqa: E402
from lm_optim import OPTIMIZERS, SCHEDULE_FREE, build_optimizer, sf_defaults  # noqa: E402
from tiny_gpt import GPTConfig, TinyGPT  # noqa: E402

BACKENDS = ("ddp", "zero1", "zero2", "fsdp2", "fsdp1", "deepspeed")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="ddp", help="how the model is distributed")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sf_adamw",
                   help="a Schedule-Free optimizer, or torch AdamW with warmup + cosine decay (or constant lr)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr (constant after warmup for Schedule-Free)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam's second-moment decay (0.95 did better in docs/convergence.md)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (sequences per step, over all ranks)")
    p.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="model width")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (float64 for oracle tests)")
    p.add_argument("--eval-every", type=int, default=50, help="validation (at x and at y) every this many steps")
    p.add_argument("--eval-seqs", type=int, default=128, help="validation windows (fixed set) per evaluation")
    p.add_argument("--max-bytes", type=int, default=None, help="cap the training text (tiny runs)")
    p.add_argument("--sample-bytes", type=int, default=300, help="bytes of text generated from the exported x")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--out", type=Path, default=Path("runs/train_lm"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CSV only)")
    args = p.parse_args(argv)
    if args.optimizer not in SCHEDULE_FREE and args.backend in ("zero1", "zero2", "deepspeed"):
        p.error(f"--backend {args.backend} shards a Schedule-Free optimizer: pick one of {tuple(SCHEDULE_FREE)}")
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or start) the process group torchrun describes; gloo on CPU, NCCL on CUDA."""
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():  # plain `python train_lm.py`: a group of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def build_model(cfg: GPTConfig, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> TinyGPT:
    """The same initial weights on every rank and in every oracle."""
    torch.manual_seed(seed)
    return TinyGPT(cfg).to(device=device, dtype=dtype)


def wrap(model: TinyGPT, args: argparse.Namespace, device: torch.device):
    """(model to call, optimizer, lr scheduler or None) for the chosen backend."""
    if args.backend == "deepspeed":
        cls = SCHEDULE_FREE[args.optimizer]
        opt = cls(model.parameters(), **sf_defaults(args.optimizer, args.lr, args.warmup, args.weight_decay, args.beta2))
        # DeepSpeed clips gradients at norm 1.0 unless told otherwise; the other backends do not clip.
        config = {"train_batch_size": args.batch_size, "zero_optimization": {"stage": 2},
                  "gradient_clipping": 0.0}
        engine, opt, _, _ = sf_dist.deepspeed.initialize(model=model, optimizer=opt, config=config)
        return engine, opt, None
    if args.backend in ("zero1", "zero2"):  # no DDP: ZeroScheduleFree averages the gradients itself
        opt = sf_dist.ZeroScheduleFree(model.parameters(), optimizer_class=SCHEDULE_FREE[args.optimizer],
                                       stage=int(args.backend[-1]),
                                       **sf_defaults(args.optimizer, args.lr, args.warmup, args.weight_decay, args.beta2))
        return model, opt, None
    if args.backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # Every weight lives in a child unit: FSDP keeps the root unit's weights gathered after a
        # no-grad forward, where an in-place eval()/train() would not reach them (FSDP1 alike).
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for unit in (*model.blocks, model.tok_emb, model.pos_emb, model.ln_f, model.head):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif args.backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        # Every weight in a child unit, as for fsdp2 above.
        units = {*model.blocks, model.tok_emb, model.pos_emb, model.ln_f, model.head}
        model = FSDP(model, device_id=device, use_orig_params=True,
                     auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in units))
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, sched = build_optimizer(args.optimizer, model.parameters(), args.lr, args.warmup, args.steps, args.weight_decay,
                                 args.beta2)
    return model, opt, sched


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, targets: torch.Tensor, rank: int, world: int, device: torch.device) -> float:
    """Mean next-byte cross-entropy over the fixed validation windows, split evenly over ranks."""
    n = windows.shape[0] - windows.shape[0] % world
    per = n // world
    idx, tgt = windows[rank * per:(rank + 1) * per].to(device), targets[rank * per:(rank + 1) * per].to(device)
    was_training = model.training
    model.eval()
    logits = model(idx)
    model.train(was_training)
    total = torch.stack([F.cross_entropy(logits.flatten(0, 1).double(), tgt.flatten(), reduction="sum"),
                         torch.tensor(float(tgt.numel()), dtype=torch.float64, device=device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(argv: list[str] | None = None) -> dict:
    """Train, log, export; returns the run summary (also written to OUT/summary.json on rank 0)."""
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks: use a multiple of {world}")
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    train_tokens, val_tokens = load_corpus(max_bytes=args.max_bytes)
    val_x, val_y = (torch.cat(t) for t in zip(*val_batches(val_tokens, args.eval_seqs, 1, cfg.block_size)))
    model, opt, sched = wrap(build_model(cfg, args.seed, DTYPES[args.dtype], device), args, device)
    is_sf = sched is None
    if is_sf:
        opt.train()

    out = args.out
    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model": asdict(cfg), "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
        log_file = open(out / "metrics.csv", "w", newline="")
        writer = csv.writer(log_file)
        writer.writerow(["step", "tokens", "lr", "train_loss", "val_loss_x", "val_loss_y", "elapsed_s"])

    eval_seconds = [0.0]  # kept out of tokens/s

    def validate(step: int, lr: float, train_loss: float | str) -> tuple[float, float]:
        began = time.perf_counter()
        loss_y = evaluate(model, val_x, val_y, rank, world, device)
        if is_sf:  # the AdamW baselines have one set of weights: x and y are the same
            with sf_dist.eval_weights(model, opt):
                loss_x = evaluate(model, val_x, val_y, rank, world, device)
        else:
            loss_x = loss_y
        if writer:
            writer.writerow([step, step * args.batch_size * cfg.block_size, lr, train_loss, f"{loss_x:.8f}", f"{loss_y:.8f}", f"{time.perf_counter() - start:.2f}"])
            log_file.flush()
        eval_seconds[0] += time.perf_counter() - began
        return loss_x, loss_y

    start = time.perf_counter()
    history = [validate(0, 0.0, "")]
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc=f"{args.backend}/{args.optimizer}", unit="step", dynamic_ncols=True)
    tokens_per_step = args.batch_size * cfg.block_size
    train_start, eval_seconds[0] = time.perf_counter(), 0.0
    first_loss = last_loss = float("nan")
    for step in range(args.steps):
        idx, tgt = train_batch(train_tokens, args.batch_size, cfg.block_size, args.seed, step, rank, world)
        loss = F.cross_entropy(model(idx.to(device)).flatten(0, 1), tgt.to(device).flatten())
        if args.backend == "deepspeed":
            model.backward(loss)
            model.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lr = opt.param_groups[0]["scheduled_lr"] if is_sf else opt.param_groups[0]["lr"]
        if sched is not None:
            sched.step()
        mean_loss = loss.detach().double()
        dist.all_reduce(mean_loss)
        last_loss = mean_loss.item() / world
        first_loss = last_loss if step == 0 else first_loss
        done = step + 1
        if bar is not None:
            bar.update(1)
            tok_s = done * tokens_per_step / (time.perf_counter() - train_start - eval_seconds[0])
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % args.eval_every == 0 or done == args.steps:
            history.append(validate(done, lr, f"{last_loss:.6f}"))
            if bar is not None:
                bar.write(f"step {done}: train {last_loss:.4f}  val at x {history[-1][0]:.4f}  val at y {history[-1][1]:.4f}")
        elif writer:
            writer.writerow([done, done * tokens_per_step, lr, f"{last_loss:.6f}", "", "", f"{time.perf_counter() - start:.2f}"])
    train_time = time.perf_counter() - train_start - eval_seconds[0]
    if bar is not None:
        bar.close()

    export = out / "model_x.safetensors"
    if is_sf:
        sf_dist.save_eval_weights(model, opt, export)
    else:
        _save_full(model, export)
    summary = dict(backend=args.backend, optimizer=args.optimizer, world_size=world, steps=args.steps,
                   first_train_loss=first_loss, final_train_loss=last_loss, initial_val_loss=history[0][0],
                   final_val_loss_x=history[-1][0], final_val_loss_y=history[-1][1],
                   train_seconds=train_time, tokens_per_second=args.steps * tokens_per_step / train_time,
                   export=str(export))
    if rank == 0:
        log_file.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot(out / "metrics.csv", out / "loss.png", f"{args.backend} / {args.optimizer}, {world} ranks")
        summary["sample"] = sample(export, cfg, args.sample_bytes, args.seed)
        (out / "sample.txt").write_text(summary["sample"])
        print(f"\nval loss at x {history[-1][0]:.4f} (at y {history[-1][1]:.4f}); {summary['tokens_per_second']:,.0f} tokens/s")
        print(f"wrote {out}/metrics.csv, loss.png, model_x.safetensors, sample.txt\n--- sample ---\n{summary['sample']}")
    dist.barrier()
    return summary


def _save_full(model, path: Path) -> None:
    """Baseline export: the plain (unsharded, unwrapped) state dict, written by rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=dist.get_world_size() > 1))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def load_exported(path: Path, cfg: GPTConfig) -> TinyGPT:
    """A plain TinyGPT holding the exported weights (strict: every name must match)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    model = TinyGPT(cfg).to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model.eval()


def sample(path: Path, cfg: GPTConfig, n_bytes: int, seed: int, prompt: str = "def ") -> str:
    """Text generated from the exported x weights, loaded into a fresh model."""
    model = load_exported(path, cfg)
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long)
    out = model.generate(idx, n_bytes, generator=torch.Generator().manual_seed(seed))
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def plot(csv_path: Path, png_path: Path, title: str) -> None:
    """Train loss (and its moving average), validation at x and at y, and their gap, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    val = [(int(r["step"]), float(r["val_loss_x"]), float(r["val_loss_y"])) for r in rows if r["val_loss_x"]]
    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="0.75", lw=0.8, label="train (per step)")
        w = max(len(losses) // 30, 1)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="0.35", lw=1.2, label=f"train ({w}-step mean)")
    steps, vx, vy = zip(*val)
    ax.plot(steps, vx, "o-", color="tab:blue", label="validation at x (eval weights)")
    ax.plot(steps, vy, "s--", color="tab:orange", label="validation at y (train weights)")
    ax.set(ylabel="cross-entropy (nats / byte)", title=title)
    ax.set_ylim(top=min(max(vx[0], vy[0]) + 0.2, 6.0))
    ax.grid(alpha=0.3)
    ax.legend()
    gap.axhline(0.0, color="0.5", lw=0.8)
    gap.plot(steps, [y - x for x, y in zip(vx, vy)], "o-", color="tab:green")
    gap.set(xlabel="step", ylabel="y - x (>0: x better)")
    gap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _clean_exit() -> None:
    """Tear down the process group the way that never aborts after success (see NOTES.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _clean_exit()
