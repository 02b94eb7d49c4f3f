"""Exports on 2-D meshes (HSDP, FSDP + tensor parallel) at W=4 stream blocks to rank 0: no
all-gather onto every rank (full_tensor is made to raise), and x equal bitwise to the gathered one."""

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from dist import run_distributed

import sf_dist
from sf_dist.weights import eval_state_dict, eval_weights, save_eval_weights


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _hsdp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, mesh["replicate"].get_local_rank() * 2 + mesh["shard"].get_local_rank()


def _fsdp_tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh["dp"].get_local_rank()


def _check(rank, world, tmp):
    from torch.distributed.tensor import DTensor
    layouts = {}
    for name, build in (("hsdp", _hsdp), ("fsdp_tp", _fsdp_tp)):
        model, data_rank = build()
        opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.02, warmup_steps=1)
        opt.train()
        for k in range(2):
            x = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)[data_rank]
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        layouts[name] = sorted({str(p.placements) for p in model.parameters()})
        full_tensor = DTensor.full_tensor
        DTensor.full_tensor = lambda self: (_ for _ in ()).throw(AssertionError(f"export all-gathered {self.placements}"))
        try:
            sd = eval_state_dict(model, opt)
            save_eval_weights(model, opt, f"{tmp}/{name}.safetensors")
        finally:
            DTensor.full_tensor = full_tensor
        with eval_weights(model, opt):
            want = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            saved = load_file(f"{tmp}/{name}.safetensors")
            assert set(sd) == set(want) == set(saved), name
            for n, w in want.items():
                assert torch.equal(sd[n], w) and torch.equal(saved[n], w), (name, n)
        else:
            assert sd == {}, name
        dist.barrier()
    return layouts


def test_2d_mesh_exports_stream_to_rank0_and_match(tmp_path):
    layouts = run_distributed(_check, 4, str(tmp_path), timeout=240)[0]
    assert "(Replicate(), Shard(dim=0))" in layouts["hsdp"], layouts
    assert any("Shard(dim=1)" in p for p in layouts["fsdp_tp"]), layouts
