"""FSDP2 (fully_shard): sf_dist steps DTensor shards and exports x, against schedulefree 1.4.1.

Each world size runs in one spawn: AdamW (with global grad-norm clipping), SGD and RAdam on
uneven shards (17 and 3 rows; at W=4 one rank holds an empty shard), train and eval mode,
every export path, y bitwise unchanged, no collective in train()/eval(), and mode agreement.
"""

import os

import pytest
import schedulefree
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import mlp_case
from dist import run_distributed
from mlp_case import run

import sf_dist
from sf_dist.weights import eval_state_dict, register_eval_state_dict_hook, save_eval_weights

RTOL, ATOL = 1e-5, 1e-6
CLIP = 0.05
OPTS = {
    "adamw": (sf_dist.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=0.02, weight_decay=0.01, warmup_steps=2)),
    "sgd": (sf_dist.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.3, weight_decay=0.01, warmup_steps=2)),
    "radam": (sf_dist.RAdamScheduleFree, schedulefree.RAdamScheduleFree, dict(lr=0.02, weight_decay=0.01)),
}


def make_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).to(dtype)


def batches(dtype=torch.float64):
    return mlp_case.batches(123, dtype)


def shard(model, world_size, **kwargs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def reference(kind, clip=None):
    """(y, x) of the single-process reference on the full batch."""
    model = make_model()
    opt = OPTS[kind][1](model.parameters(), **OPTS[kind][2])
    run(model, opt, batches(), clip=clip)
    y = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    return y, {k: v.clone() for k, v in model.state_dict().items()}


def full(sd):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def assert_close(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=f"{what}: {k}")


def check_exports(rank, model, opt, x_ref, outdir):
    """Every export path gives x; the local shards of y stay bitwise the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    y = [p.to_local().clone() for p in model.parameters()]
    versions = [p.to_local()._version for p in model.parameters()]

    def y_intact(what):
        assert opt.train_mode, what
        for p, saved in zip(model.parameters(), y):
            assert torch.equal(p.to_local(), saved), what

    got = eval_state_dict(model, opt)
    if rank == 0:
        assert_close(got, x_ref, "eval_state_dict full")
    else:
        assert got == {}
    y_intact("eval_state_dict full")
    sharded = eval_state_dict(model, opt, full=False)
    assert all(type(v).__name__ == "DTensor" for v in sharded.values())
    assert_close(full(sharded), x_ref, "eval_state_dict sharded")
    y_intact("eval_state_dict sharded")

    path = os.path.join(outdir, "x.safetensors")
    save_eval_weights(model, opt, path)
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(load_file(path), strict=True)
        assert_close(plain.state_dict(), x_ref, "save_eval_weights")
    y_intact("save_eval_weights")
    assert [p.to_local()._version for p in model.parameters()] == versions  # params never written

    handle = register_eval_state_dict_hook(model, opt)
    assert_close(full(model.state_dict()), x_ref, "hooked state_dict")
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert_close(got, x_ref, "hooked get_model_state_dict")
    dcp.save({"model": model}, checkpoint_id=os.path.join(outdir, "dcp_x"))  # DCP calls state_dict()
    y_intact("hook")
    handle.remove()
    fresh = shard(make_model(), dist.get_world_size())
    target = {"model": get_model_state_dict(fresh)}
    dcp.load(target, checkpoint_id=os.path.join(outdir, "dcp_x"))
    assert_close(full(target["model"]), x_ref, "DCP save of the hooked model")

    opt.eval()  # the exported file holds exactly the x that eval() puts in the params
    x_eval = full(model.state_dict())
    if rank == 0:
        exported = load_file(path)
        assert all(torch.equal(exported[k], x_eval[k]) for k in x_eval)
    opt.train()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), y):
            p.to_local().copy_(saved)
    assert torch.equal(model.state_dict()["0.weight"].to_local(), y[0])


def check_no_collectives(model, opt):
    """train()/eval() are purely local; the counter itself is shown to see collectives."""
    from torch.distributed.tensor.debug import CommDebugMode
    with CommDebugMode() as swaps:
        opt.eval()
        opt.train()
    assert swaps.get_total_counts() == 0, swaps.get_comm_counts()
    with CommDebugMode() as control:
        next(model.parameters()).full_tensor()
        dist.all_reduce(torch.ones(1))
    assert control.get_total_counts() == 2, control.get_comm_counts()


def check_modes_must_agree(rank, model, opt):
    if rank == 0:
        opt.eval()
    with pytest.raises(RuntimeError, match="ranks disagree on the optimizer mode"):
        eval_state_dict(model, opt)
    opt.train()


def check_mixed_precision(rank, world_size):
    """bf16 compute, fp32 sharded params: the optimizer steps the fp32 shards with the fp32
    reduced gradients, exactly as the reference steps a full fp32 model with those gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    model = shard(make_model(torch.float32), world_size,
                  mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **OPTS["adamw"][2])
    ref = make_model(torch.float32)
    ref_opt = schedulefree.AdamWScheduleFree(ref.parameters(), **OPTS["adamw"][2])
    opt.train()
    ref_opt.train()
    per = mlp_case.BATCH // world_size
    for x, t in batches(torch.float32):
        opt.zero_grad()
        with torch.autocast("cpu", enabled=False):
            out = model(x[rank * per:(rank + 1) * per])
        assert out.dtype == torch.bfloat16
        nn.functional.mse_loss(out.float(), t[rank * per:(rank + 1) * per]).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            q.grad = p.grad.full_tensor()
        opt.step()
        ref_opt.step()
    for p in model.parameters():
        assert opt.state[p]["z"].dtype == torch.float32 and type(opt.state[p]["z"]).__name__ == "DTensor"
    assert_close(full(model.state_dict()), ref.state_dict(), "mixed precision")


def check_forward_at_x_then_y(rank, world_size):
    """The root unit owns weights here, which FSDP2 keeps gathered after a no-grad forward: a
    forward inside eval_weights must see x and the next one after it y again."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    ref = make_model()
    ref_opt = schedulefree.AdamWScheduleFree(ref.parameters(), **OPTS["adamw"][2])
    run(ref, ref_opt, batches())
    model = make_model()
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # model[2] and model[4] stay in the root unit
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **OPTS["adamw"][2])
    run(model, opt, batches(), rank, world_size)
    probe = batches()[0][0]
    with torch.no_grad():
        at_y = ref(probe)
        ref_opt.eval()
        at_x = ref(probe)
        for _ in range(2):
            with sf_dist.eval_weights(model, opt):
                torch.testing.assert_close(model(probe), at_x, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(model(probe), at_y, rtol=RTOL, atol=ATOL)


def check_hsdp(rank, world_size, outdir):
    """HSDP, a 2-D (replicate, shard) mesh: placements (Replicate(), Shard(0)) take the generic
    full_tensor() gather; train mode, eval mode and the exports still match the reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    y_ref, x_ref = reference("adamw")
    model = make_model()
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **OPTS["adamw"][2])
    run(model, opt, batches(), rank, world_size)
    assert_close(full(model.state_dict()), y_ref, "hsdp train mode")
    got = eval_state_dict(model, opt)
    if rank == 0:
        assert_close(got, x_ref, "hsdp eval_state_dict")
    path = os.path.join(outdir, "hsdp.safetensors")
    save_eval_weights(model, opt, path)
    if rank == 0:
        assert_close(load_file(path), x_ref, "hsdp save_eval_weights")
    assert_close(full(model.state_dict()), y_ref, "hsdp y after exports")


def fsdp2_worker(rank, world_size, outdir, extras):
    for kind in OPTS:
        clip = CLIP if kind == "adamw" else None
        y_ref, x_ref = reference(kind, clip)
        model = shard(make_model(), world_size)
        opt = OPTS[kind][0](model.parameters(), **OPTS[kind][2])
        run(model, opt, batches(), rank, world_size, clip)
        assert_close(full(model.state_dict()), y_ref, f"{kind} train mode")
        opt.eval()
        assert_close(full(model.state_dict()), x_ref, f"{kind} eval mode")
        opt.train()
        check_exports(rank, model, opt, x_ref, os.path.join(outdir, kind))
        if extras and kind == "adamw":
            check_no_collectives(model, opt)
            check_modes_must_agree(rank, model, opt)
    if world_size == 4:
        assert model[4].weight.to_local().shape[0] == (0 if rank == 3 else 1)  # an empty shard was stepped
        check_hsdp(rank, world_size, outdir)
    if extras:
        check_mixed_precision(rank, world_size)
        check_forward_at_x_then_y(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp2_matches_reference_and_exports_x(world_size, tmp_path):
    for kind in OPTS:
        (tmp_path / kind).mkdir()
    run_distributed(fsdp2_worker, world_size, str(tmp_path), world_size == 2)
