"""AdamWScheduleFree(inner_momentum=...) against our explicit oracle on every kernel path, and its
state dicts both ways with schedulefree 1.4.1 (which has the option only as 0: no ``exp_avg``).

schedulefree 1.4.1 lacks inner_momentum, so for mu > 0 the oracle is sf_dist.reference's explicit
x/y/z class (Adam's bias-corrected first moment in place of the gradient, written from the math).
"""

import itertools

import pytest
import schedulefree
import torch

import sf_dist
from dist import run_distributed
from sf_dist import kernels
from sf_dist.reference import ReferenceScheduleFree
from test_parity import _assert_close as _close, _run

SHAPES = [(7, 3), (5,), (4, 2, 3), (1,), (0, 3)]
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "cpu": dict(fused=True)}
STEPS = 20


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _grid():
    for mu, wd, decay_at, warmup, r in itertools.product([0.5, 0.9], [0.0, 0.05], ["y", "z", "all"], [0, 5],
                                                         [0.0, 0.5]):
        if wd == 0 and decay_at != "y":
            continue
        yield dict(lr=0.01, inner_momentum=mu, weight_decay=wd, decay_at=decay_at, warmup_steps=warmup, r=r)


@pytest.mark.parametrize("path", ["single", "foreach", "cpu", "compiled"])
def test_inner_momentum_matches_oracle(path, monkeypatch):
    """y in train mode, x in eval mode, y after eval->train and after 5 more steps, exp_avg equal
    to the oracle's first moment; every path, decay mode and warmup/r setting."""
    if path == "compiled":
        monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: False)
    impl = PATHS.get(path, dict(fused=True))
    grid = list(_grid()) if path != "compiled" else list(_grid())[:3]  # compile time: a few settings
    for hp in grid:
        init = _params()
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        ours = sf_dist.AdamWScheduleFree(ps[0], **hp, **impl)
        oracle = ReferenceScheduleFree(ps[1], kind="adamw", **hp)
        ours.train(), oracle.train()
        _run([ours, oracle], ps, STEPS)
        what = f"{path} {hp}"
        _close(ps[0], ps[1], f"train y, {what}")
        _close([ours.state[p]["exp_avg"] for p in ps[0]], [oracle.state[q]["m"] for q in ps[1]], f"exp_avg, {what}")
        ours.eval(), oracle.eval()
        _close(ps[0], ps[1], f"eval x, {what}")
        ours.train(), oracle.train()
        _run([ours, oracle], ps, 5, start=STEPS)
        _close(ps[0], ps[1], f"y after eval->train->5 steps, {what}")


def test_exp_avg_only_when_inner_momentum_is_on():
    """inner_momentum=0 keeps the 1.4.1 state layout (z, exp_avg_sq) and equals 1.4.1 bitwise-close;
    a group with mu > 0 beside one with mu = 0 gets exp_avg only in its own params."""
    init = _params()
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours = sf_dist.AdamWScheduleFree([{"params": ps[0][:2], "inner_momentum": 0.9}, {"params": ps[0][2:]}], lr=0.01)
    ours.train()
    _run([ours], ps[:1], 3)
    assert set(ours.state[ps[0][1]]) == {"z", "exp_avg_sq", "exp_avg"}
    assert set(ours.state[ps[0][2]]) == {"z", "exp_avg_sq"}
    plain, theirs = sf_dist.AdamWScheduleFree(ps[1], lr=0.01), None
    refs = [t.clone().requires_grad_() for t in init]
    theirs = schedulefree.AdamWScheduleFree(refs, lr=0.01)
    plain.train(), theirs.train()
    _run([plain, theirs], [ps[1], refs], STEPS)
    _close(ps[1], refs, "inner_momentum=0 vs schedulefree 1.4.1")
    assert all(set(plain.state[p]) == {"z", "exp_avg_sq"} for p in ps[1])


def test_invalid_inner_momentum_is_refused():
    p = [torch.zeros(3, requires_grad=True)]
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="inner_momentum"):
            sf_dist.AdamWScheduleFree(p, inner_momentum=bad)


@pytest.mark.parametrize("path", ["single", "foreach", "cpu"])
def test_state_dicts_both_ways(path):
    """Save in eval mode at step 12, load into a fresh optimizer, continue: equals the uninterrupted
    run. mu > 0: ours -> ours (exp_avg travels). mu = 0: ours <-> schedulefree 1.4.1 both ways."""
    impl = PATHS[path]
    init = _params(5)
    hp = dict(lr=0.01, weight_decay=0.05, warmup_steps=3)
    for mu, make_saver, make_loader in [
        (0.9, lambda ps: sf_dist.AdamWScheduleFree(ps, inner_momentum=0.9, **hp, **impl),
         lambda ps: sf_dist.AdamWScheduleFree(ps, inner_momentum=0.9, **hp, **impl)),
        (0.0, lambda ps: schedulefree.AdamWScheduleFree(ps, **hp),
         lambda ps: sf_dist.AdamWScheduleFree(ps, **hp, **impl)),
        (0.0, lambda ps: sf_dist.AdamWScheduleFree(ps, **hp, **impl),
         lambda ps: schedulefree.AdamWScheduleFree(ps, **hp)),
    ]:
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(3)]
        whole = ReferenceScheduleFree(ps[0], kind="adamw", inner_momentum=mu, **hp)
        saver = make_saver(ps[1])
        whole.train(), saver.train()
        _run([whole, saver], ps[:2], 12)
        saver.eval()
        sd = saver.state_dict()
        with torch.no_grad():
            for p, q in zip(ps[2], ps[1]):
                p.copy_(q)  # the model's saved weights: x
        loader = make_loader(ps[2])
        loader.load_state_dict(sd)
        assert loader.param_groups[0]["k"] == 12
        whole.eval()
        _close(ps[2], ps[0], f"x after load, mu={mu} {type(saver).__module__}->{type(loader).__module__}")
        whole.train(), loader.train()
        _run([whole, loader], [ps[0], ps[2]], 8, start=12)
        _close(ps[2], ps[0], f"y 8 steps after load, mu={mu} {type(saver).__module__}->{type(loader).__module__}")


# ---- sharded: one spawn per world size --------------------------------------------------------
def _model():
    from torch import nn
    torch.manual_seed(0)  # 17 rows: uneven shards at W=2 (9/8) and W=3 (6/6/5)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).double()


HP = dict(lr=0.02, weight_decay=0.01, warmup_steps=3, inner_momentum=0.9)


def _sharded_worker(rank, world, outdir):
    import os

    import mlp_case
    from test_wrapper import _check, _fsdp2

    import sf_dist.checkpoint
    data = mlp_case.batches(7) + mlp_case.batches(8) + mlp_case.batches(9)[:4]  # 20 steps
    ref = _model()
    ref_opt = ReferenceScheduleFree(ref.parameters(), kind="adamw", **HP)
    mlp_case.run(ref, ref_opt, data[:12])
    y12 = {k: v.clone() for k, v in ref.state_dict().items()}
    mlp_case.run(ref, ref_opt, data[12:])
    y_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt.eval()
    x_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    for path in ("single", "foreach", "cpu"):
        what = f"W={world} FSDP2 {path}"
        model = _fsdp2(_model(), world)
        opt = sf_dist.AdamWScheduleFree(model.parameters(), **HP, **PATHS[path])
        mlp_case.run(model, opt, data[:12], rank, world)
        _check(model.state_dict(), y12, f"{what} y at 12")
        ckpt = os.path.join(outdir, f"fsdp2_{path}")
        sf_dist.checkpoint.save(ckpt, model, opt)
        mlp_case.run(model, opt, data[12:], rank, world)
        _check(model.state_dict(), y_ref, f"{what} y at 20")
        opt.eval()
        _check(model.state_dict(), x_ref, f"{what} x")
        resumed = _fsdp2(_model(), world)
        resumed_opt = sf_dist.AdamWScheduleFree(resumed.parameters(), **HP, **PATHS[path])
        sf_dist.checkpoint.load(ckpt, resumed, resumed_opt)
        assert all("exp_avg" in resumed_opt.state[p] for p in resumed.parameters()), what
        mlp_case.run(resumed, resumed_opt, data[12:], rank, world)
        _check(resumed.state_dict(), y_ref, f"{what} y at 20 after a checkpoint at 12")
    model = _model()
    opt = sf_dist.ZeroScheduleFree(model.parameters(), sf_dist.AdamWScheduleFree, stage=2, bucket_cap_mb=1e-4,
                                   **HP)
    mlp_case.run(model, opt, data[:12], rank, world)
    _check(model.state_dict(), y12, f"W={world} ZeRO-2 y at 12")
    opt.eval()
    full = opt.consolidated_state_dict()  # a plain single-process state dict, exp_avg included
    x12 = {k: v.clone() for k, v in model.state_dict().items()}
    opt.train()
    mlp_case.run(model, opt, data[12:], rank, world)
    _check(model.state_dict(), y_ref, f"W={world} ZeRO-2 y at 20")
    if rank == 0:  # the consolidated state continues on one process like the uninterrupted run
        assert full["state"] and all(set(s) == {"z", "exp_avg_sq", "exp_avg"} for s in full["state"].values())
        single = _model()
        single.load_state_dict(x12)
        single_opt = sf_dist.AdamWScheduleFree(single.parameters(), nonfinite="ignore", **HP)  # rank 0 only
        single_opt.load_state_dict(full)
        mlp_case.run(single, single_opt, data[12:])
        _check(single.state_dict(), y_ref, f"W={world} ZeRO-2 consolidated at 12 -> one process, y at 20")
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(world, tmp_path):
    """FSDP2 (uneven shards, every kernel path, a DCP checkpoint at step 12 resumed) and ZeRO-2 (small
    buckets, its consolidated state dict continued on one process) equal the oracle on one process."""
    assert run_distributed(_sharded_worker, world, str(tmp_path)) == [True] * world
