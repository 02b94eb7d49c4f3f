"""A small training job for the fault tests, run under ``torchrun --max-restarts 1``.

It checkpoints every ``--every`` steps with sf_dist.checkpoint, resumes from the newest complete
checkpoint it finds, and writes the final eval weights (x) to ``OUT/x.pt``. Test-only faults,
injected on the first attempt only (TORCHELASTIC_RESTART_COUNT=0):
  SF_DIST_TEST_KILL="step:K:R"  rank R SIGKILLs itself before training step K
  SF_DIST_TEST_KILL="save:K:R"  rank R SIGKILLs itself in the middle of the save after step K
"""

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sf_dist


def _fault() -> tuple[str, int, int] | None:
    spec = os.environ.get("SF_DIST_TEST_KILL")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    kind, step, rank = spec.split(":")
    return kind, int(step), int(rank)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_inside_save(rank_to_kill: int) -> None:
    """Make the next DCP write kill ``rank_to_kill`` after the other ranks started writing."""
    import torch.distributed.checkpoint as dcp

    original = dcp.save

    def save_then_die(*args, **kwargs):
        if dist.get_rank() == rank_to_kill:
            _die()
        return original(*args, **kwargs)

    dcp.save = save_then_die


def _init_process_group() -> None:
    """gloo under torchrun restarts: namespace the store by attempt.

    torchrun reuses one TCPStore across restarts, and a restarted rank could read the address a
    dead rank of the previous attempt published under the same key (seen here: 2 of 3 restarts
    failed in connectFullMesh with "Connection refused"). A per-attempt prefix avoids it.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_store and rank == 0)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world)


def _model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).double()
    if backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["fsdp2", "zero"], required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(args.backend)
    hp = dict(lr=0.02, weight_decay=0.01, warmup_steps=3)
    if args.backend == "zero":
        opt = sf_dist.ZeroScheduleFree(model.parameters(), sf_dist.AdamWScheduleFree, stage=2, **hp)
    else:
        opt = sf_dist.AdamWScheduleFree(model.parameters(), **hp)
    opt.train()
    fault = _fault()
    start = 0
    latest = sf_dist.checkpoint.latest(args.out)
    if latest is not None:
        start = sf_dist.checkpoint.load(latest, model, opt)["step"]
    for step in range(start, args.steps):
        if fault == ("step", step, rank):
            _die()
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8 * world, 6, generator=gen, dtype=torch.float64), torch.randn(8 * world, 3, generator=gen, dtype=torch.float64)
        mine = slice(rank * 8, (rank + 1) * 8)
        F.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            if fault is not None and fault[:2] == ("save", step + 1):
                _kill_inside_save(fault[2])
            sf_dist.checkpoint.save(os.path.join(args.out, f"step_{step + 1:05d}"), model, opt, extra={"step": step + 1})
    state = sf_dist.eval_state_dict(model, opt, full=True)
    if rank == 0:
        torch.save({"x": state, "resumed_from": start}, os.path.join(args.out, "x.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
