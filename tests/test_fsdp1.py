"""FSDP1 (use_orig_params=True): sf_dist steps 1-D flat-parameter views (some empty) and exports x.

One W=2 spawn: AdamW, SGD and RAdam against schedulefree 1.4.1 in train and eval mode, every
export path with y bitwise unchanged, and a checkpoint that resumes bitwise.
"""

import os

import schedulefree
import torch
from safetensors.torch import load_file
from torch import nn

import mlp_case
from dist import run_distributed
from mlp_case import run

import sf_dist
from sf_dist import checkpoint
from sf_dist.weights import eval_state_dict, register_eval_state_dict_hook, save_eval_weights

RTOL, ATOL = 1e-5, 1e-6
OPTS = {
    "adamw": (sf_dist.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=0.02, weight_decay=0.01, warmup_steps=2)),
    "sgd": (sf_dist.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.3, weight_decay=0.01, warmup_steps=2)),
    "radam": (sf_dist.RAdamScheduleFree, schedulefree.RAdamScheduleFree, dict(lr=0.02, weight_decay=0.01)),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).double()


def batches():
    return mlp_case.batches(5)


def wrap(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))


def reference(kind):
    model = make_model()
    opt = OPTS[kind][1](model.parameters(), **OPTS[kind][2])
    run(model, opt, batches())
    y = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    return y, {k: v.clone() for k, v in model.state_dict().items()}


def assert_close(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=f"{what}: {k}")


def gathered(sharded):
    """ShardedTensor values -> full tensors on every rank (all-gather through rank 0's copy)."""
    import torch.distributed as dist
    out = {}
    for k, v in sharded.items():
        whole = torch.empty(v.shape, dtype=v.dtype) if dist.get_rank() == 0 else None
        v.gather(dst=0, out=whole)
        holder = [whole]
        dist.broadcast_object_list(holder, src=0)
        out[k] = holder[0]
    return out


def check_forward_at_x_then_y(rank, world_size):
    """One unit, so the root owns every weight and FSDP1 keeps it gathered after a no-grad
    forward: a forward inside eval_weights must still see x, and the next one after it y."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    ref = make_model()
    ref_opt = schedulefree.AdamWScheduleFree(ref.parameters(), **OPTS["adamw"][2])
    run(ref, ref_opt, batches())
    model = FSDP(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **OPTS["adamw"][2])
    run(model, opt, batches(), rank, world_size)
    probe = batches()[0][0]
    with torch.no_grad():
        at_y = ref(probe)
        ref_opt.eval()
        at_x = ref(probe)
        torch.testing.assert_close(model(probe), at_y, rtol=RTOL, atol=ATOL)  # leaves the root gathered
        for _ in range(2):
            with sf_dist.eval_weights(model, opt):
                torch.testing.assert_close(model(probe), at_x, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(model(probe), at_y, rtol=RTOL, atol=ATOL)


def fsdp1_worker(rank, world_size, outdir):
    data = batches()
    for kind in OPTS:
        y_ref, x_ref = reference(kind)
        model = wrap(make_model())
        opt = OPTS[kind][0](model.parameters(), **OPTS[kind][2])
        run(model, opt, data, rank, world_size)
        empty = torch.tensor([sum(p.numel() == 0 for p in model.parameters())])
        torch.distributed.all_reduce(empty)
        assert empty.item() > 0, "expected an empty view on some rank"
        assert_close(model.state_dict(), y_ref, f"{kind} train mode")
        opt.eval()
        assert_close(model.state_dict(), x_ref, f"{kind} eval mode")
        opt.train()

        y = [p.detach().clone() for p in model.parameters()]

        def y_intact(what):
            assert opt.train_mode, what
            for p, saved in zip(model.parameters(), y):
                assert torch.equal(p, saved), what

        got = eval_state_dict(model, opt)
        if rank == 0:
            assert_close(got, x_ref, "eval_state_dict")
        else:
            assert got == {}
        y_intact("eval_state_dict full")
        assert_close(gathered(eval_state_dict(model, opt, full=False)), x_ref, "eval_state_dict sharded")
        y_intact("eval_state_dict sharded")
        path = os.path.join(outdir, f"{kind}.safetensors")
        save_eval_weights(model, opt, path)
        if rank == 0:
            plain = make_model()
            plain.load_state_dict(load_file(path), strict=True)
            assert_close(plain.state_dict(), x_ref, "save_eval_weights")
        y_intact("save_eval_weights")
        handle = register_eval_state_dict_hook(model, opt)
        assert_close(model.state_dict(), x_ref, "hooked state_dict")
        y_intact("hook")
        handle.remove()
        assert_close(model.state_dict(), y_ref, "after remove()")

    check_forward_at_x_then_y(rank, world_size)

    # resume from a checkpoint: bitwise on the uninterrupted trajectory
    ckpt = os.path.join(outdir, "ckpt")
    model = wrap(make_model())
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **OPTS["adamw"][2])
    run(model, opt, data[:4], rank, world_size)
    checkpoint.save(ckpt, model, opt)
    run(model, opt, data[4:], rank, world_size)
    model2 = wrap(make_model())
    opt2 = sf_dist.AdamWScheduleFree(model2.parameters(), **OPTS["adamw"][2])
    checkpoint.load(ckpt, model2, opt2)
    assert opt2.param_groups[0]["k"] == 4
    run(model2, opt2, data[4:], rank, world_size)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        if p.numel() == 0:
            continue  # FSDP1's optimizer-state loader leaves empty views without state: nothing lost
        assert torch.equal(opt.state[p]["z"], opt2.state[q]["z"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_fsdp1_matches_reference_exports_x_and_resumes(tmp_path):
    run_distributed(fsdp1_worker, 2, str(tmp_path))
