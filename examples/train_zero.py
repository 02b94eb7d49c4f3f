"""Data-parallel training with sf_dist.ZeroScheduleFree (ZeRO-1/2 Schedule-Free, no DDP wrapper).

    torchrun --standalone --nproc-per-node 2 examples/train_zero.py --steps 300
    torchrun --standalone --nproc-per-node 2 examples/train_zero.py --steps 600 --resume   # continue

An MLP learns to tell apart three interleaved spirals (a synthetic set that needs a non-linear
model). Each rank reads its own slice of every batch; the optimizer averages the gradients,
keeps 1/W of the AdamW state (and, at stage 2, of the gradients) per rank, and clips by the
global norm. Validation runs at x, the Schedule-Free eval weights; checkpoints go through
sf_dist.checkpoint (resumable at another world size); x is exported to safetensors at the end.
gloo on CPU, NCCL when CUDA is present; also runs as one plain process.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sf_dist

OPTIMIZERS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split evenly over ranks")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip (0: off)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/train_zero"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    return p.parse_args()


def init_distributed() -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, else gloo), or make a one-rank group."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of three noisy interleaved spirals in 2-D, with their arm as the label."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (n,), generator=gen)
    radius = torch.rand(n, generator=gen)
    angle = 10.0 * radius + label * (2 * math.pi / 3) + 0.3 * torch.randn(n, generator=gen)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, label


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.LayerNorm(width), nn.GELU(),
                                 nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (1-D params) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> float:
    """Validation accuracy, each rank scoring its slice and one all-reduce summing the hits."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * len(points) // world, (rank + 1) * len(points) // world)
    hits = (model(points[mine]).argmax(1) == labels[mine]).sum().float().reshape(1)
    dist.all_reduce(hits)
    return hits.item() / len(points)


def main() -> None:
    args = parse_args()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    torch.manual_seed(0)  # the optimizer broadcasts rank 0's weights anyway
    model = MLP(args.width).to(device)
    opt = sf_dist.ZeroScheduleFree(param_groups(model, args.weight_decay), OPTIMIZERS[args.optimizer],
                                   stage=args.stage, lr=args.lr, **({} if args.optimizer == "radam"
                                                                    else {"warmup_steps": args.warmup}))
    opt.train()
    ckpt = args.out / "checkpoint"
    start = sf_dist.checkpoint.load(ckpt, model, opt)["step"] if args.resume else 0
    val_x, val_y = (t.to(device) for t in spirals(2048, seed=12345))
    per_rank = args.batch_size // world
    for step in range(start, args.steps):
        x, y = (t.to(device) for t in spirals(args.batch_size, seed=step))
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()  # the optimizer's hooks start averaging gradients while backward runs
        norm = opt.clip_grad_norm_(args.clip) if args.clip > 0 else None
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with sf_dist.eval_weights(model, opt):  # x inside, y (bitwise) after
                acc = accuracy(model, val_x, val_y)
            if rank == 0:
                grad = f" grad norm {norm.item():.3f}" if norm is not None else ""
                print(f"step {step + 1:5d}  loss {loss.item():.4f}{grad}  val accuracy at x {acc:.3f}", flush=True)
            sf_dist.checkpoint.save(ckpt, model, opt, extra={"step": step + 1})
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    sf_dist.save_eval_weights(model, opt, args.out / "x.safetensors")
    held = opt.held_numel()
    if rank == 0:
        total = sum(p.numel() for p in model.parameters())
        print(f"rank 0 holds {held['state']} optimizer state elements for {total} params "
              f"({held['state'] / total:.2f} per param at W={world}); x saved to {args.out / 'x.safetensors'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
