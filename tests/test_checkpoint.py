"""sf_dist.checkpoint: exact resume, resharding across world sizes, atomic saves, clear errors."""

import os

import pytest
import schedulefree
import torch
from torch import nn

import mlp_case
from dist import run_distributed
from mlp_case import run

import sf_dist
from sf_dist import checkpoint
from sf_dist.weights import register_eval_state_dict_hook

RTOL, ATOL = 1e-5, 1e-6
SPLIT = 4
HP = dict(lr=0.02, weight_decay=0.01, warmup_steps=2)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).double()


def batches():
    return mlp_case.batches(7)


def reference_y():
    model = make_model()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), **HP)
    run(model, opt, batches())
    return {k: v.clone() for k, v in model.state_dict().items()}


def fsdp(world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model, mesh = make_model(), init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, sf_dist.AdamWScheduleFree(model.parameters(), **HP)


def fresh():
    model = make_model()
    return model, sf_dist.AdamWScheduleFree(model.parameters(), **HP)


def snapshot(model, opt):
    """Full y, z, exp_avg_sq by name and the group scalars (gathers DTensors: a collective)."""
    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    out = {}
    for name, p in model.named_parameters():
        out[name] = whole(p.detach())
        out[name + ".z"] = whole(opt.state[p]["z"])
        out[name + ".v"] = whole(opt.state[p]["exp_avg_sq"])
    g = opt.param_groups[0]
    return out, {k: g[k] for k in ("k", "weight_sum", "lr_max", "train_mode", "scheduled_lr")}


def assert_same(got, want, exact):
    assert got[1] == want[1]
    for k, v in want[0].items():
        if exact:
            assert torch.equal(got[0][k], v), k
        else:
            torch.testing.assert_close(got[0][k], v, rtol=RTOL, atol=ATOL, msg=k)


# ---- one process, plain model --------------------------------------------------------------------
def test_plain_resume_is_bitwise_and_errors_name_the_problem(tmp_path):
    data, path = batches(), str(tmp_path / "ckpt")
    model = make_model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **HP)
    run(model, opt, data[:SPLIT])
    hook = register_eval_state_dict_hook(model, opt)  # must not leak x into the checkpoint
    checkpoint.save(path, model, opt, extra={"step": SPLIT})
    hook.remove()
    saved = snapshot(model, opt)
    run(model, opt, data[SPLIT:])
    final = snapshot(model, opt)

    model2 = make_model()
    opt2 = sf_dist.AdamWScheduleFree(model2.parameters(), **HP)
    assert checkpoint.load(path, model2, opt2) == {"step": SPLIT}
    assert_same(snapshot(model2, opt2), saved, exact=True)  # no step burned: k and weight_sum as saved
    run(model2, opt2, data[SPLIT:])
    assert_same(snapshot(model2, opt2), final, exact=True)
    ref = reference_y()
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=RTOL, atol=ATOL)

    # an eval-mode checkpoint comes back in eval mode with x in the params
    opt2.eval()
    x = {k: v.clone() for k, v in model2.state_dict().items()}
    checkpoint.save(path + "/", model2, opt2)  # replaces the previous one (trailing slash: same dir)
    model3 = make_model()
    opt3 = sf_dist.AdamWScheduleFree(model3.parameters(), **HP)
    opt3.train()
    assert checkpoint.load(path, model3, opt3) is None
    assert not opt3.train_mode
    for k, v in model3.state_dict().items():
        assert torch.equal(v, x[k]), k
    opt3.train()
    opt2.train()
    assert_same(snapshot(model3, opt3), snapshot(model2, opt2), exact=True)

    # a save killed midway leaves a partial <path>.tmp; the previous checkpoint still loads
    os.makedirs(path + ".tmp")
    with open(os.path.join(path + ".tmp", "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    assert checkpoint.load(path, *fresh()) is None
    checkpoint.save(path, model2, opt2, extra=[1, None])  # and the next save replaces the leftover
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path + ".old")
    assert checkpoint.load(path, *fresh()) == [1, None]

    # wrong model, wrong optimizer, missing or truncated shard file
    wide = nn.Sequential(nn.Linear(6, 18), nn.Tanh(), nn.Linear(18, 3)).double()
    with pytest.raises(RuntimeError, match=r"different model.*shape differs \['0.bias', '0.weight'"):
        checkpoint.load(path, wide, sf_dist.AdamWScheduleFree(wide.parameters()))
    sgd_model = make_model()
    with pytest.raises(RuntimeError, match=r"saved by AdamWScheduleFree, this optimizer is SGDScheduleFree"):
        checkpoint.load(path, sgd_model, sf_dist.SGDScheduleFree(sgd_model.parameters()))
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(RuntimeError, match=r"shard file .*__0_0\.distcp has \d+ bytes"):
        checkpoint.load(path, *fresh())
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=r"shard file .*__0_0\.distcp is missing"):
        checkpoint.load(path, *fresh())
    with pytest.raises(FileNotFoundError, match="no sf_dist checkpoint"):
        checkpoint.load(str(tmp_path / "nowhere"), *fresh())


# ---- FSDP2 across world sizes --------------------------------------------------------------------
def save_worker(rank, world_size, path):
    """Train SPLIT steps, save, return the full state at the save."""
    model, opt = fsdp(world_size)
    run(model, opt, batches()[:SPLIT], rank, world_size)
    checkpoint.save(path, model, opt, extra={"saved_at": world_size})
    return snapshot(model, opt)


def resume_worker(rank, world_size, path, foreign_path):
    """Same world size: save, finish, then resume from the save in fresh objects: bitwise equal.
    Then load a checkpoint written at another world size and finish within the tolerance.
    Returns (state at the save, load_and_finish of the foreign checkpoint)."""
    data = batches()
    model, opt = fsdp(world_size)
    run(model, opt, data[:SPLIT], rank, world_size)
    checkpoint.save(path, model, opt, extra={"saved_at": world_size})
    saved = snapshot(model, opt)
    run(model, opt, data[SPLIT:], rank, world_size)
    final = snapshot(model, opt)
    model, opt = fsdp(world_size)
    checkpoint.load(path, model, opt)
    run(model, opt, data[SPLIT:], rank, world_size)
    assert_same(snapshot(model, opt), final, exact=True)
    return saved, load_and_finish(rank, world_size, foreign_path)


def load_and_finish(rank, world_size, path):
    """(state right after loading, y after finishing the run)."""
    model, opt = fsdp(world_size)
    extra = checkpoint.load(path, model, opt)
    loaded = snapshot(model, opt)
    run(model, opt, batches()[SPLIT:], rank, world_size)
    return extra, loaded, snapshot(model, opt)[0]


def check_resharded(result, saved_state, saved_at):
    extra, loaded, final = result
    assert extra == {"saved_at": saved_at}
    assert_same(loaded, saved_state, exact=True)  # resharding moves values, it does not change them
    for k, v in reference_y().items():
        torch.testing.assert_close(final[k], v, rtol=RTOL, atol=ATOL, msg=k)


def test_fsdp2_resume_bitwise_and_reshard(tmp_path):
    at2, at4 = str(tmp_path / "w2"), str(tmp_path / "w4")
    saved4 = run_distributed(save_worker, 4, at4)[0]
    saved2, from4 = run_distributed(resume_worker, 2, at2, at4)[0]  # W=2 bitwise resume, then 4 -> 2
    check_resharded(from4, saved4, 4)
    check_resharded(run_distributed(load_and_finish, 3, at2)[0], saved2, 2)  # 2 -> 3
    check_resharded(plain_finish(at2), saved2, 2)  # 2 -> 1


def plain_finish(path):
    """load_and_finish into a plain model in this process, with no process group."""
    model, opt = fresh()
    extra = checkpoint.load(path, model, opt)
    loaded = snapshot(model, opt)
    run(model, opt, batches()[SPLIT:])
    return extra, loaded, snapshot(model, opt)[0]


# ---- ZeroScheduleFree: the optimizer's own sharded_state_dict protocol -------------------------
def zero_worker(rank, world_size, path):
    data = batches()

    def build():
        model = make_model()
        return model, sf_dist.ZeroScheduleFree(model.parameters(), stage=2, **HP)

    model, opt = build()
    run(model, opt, data[:SPLIT], rank, world_size)
    checkpoint.save(path, model, opt, extra="zero")
    run(model, opt, data[SPLIT:], rank, world_size)
    model2, opt2 = build()
    assert checkpoint.load(path, model2, opt2) == "zero"
    assert opt2.param_groups[0]["k"] == SPLIT
    run(model2, opt2, data[SPLIT:], rank, world_size)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    return {k: v.clone() for k, v in model2.state_dict().items()}


def test_zero_resume_is_bitwise(tmp_path):
    final = run_distributed(zero_worker, 2, str(tmp_path / "zero"))[0]
    for k, v in reference_y().items():
        torch.testing.assert_close(final[k], v, rtol=RTOL, atol=ATOL, msg=k)
