"""ScheduleFreeWrapper against schedulefree 1.4.1's ScheduleFreeWrapper and ScheduleFreeWrapperReference
(1.4.1's wrapper files are the same as the reference repository's newest), in float64.

1.4.1 keeps z in the base's state, where torch's Adam/AdamW/RMSprop then raise KeyError; its oracle
runs here with the base state filled in advance, as the reference's own test avoids stateful bases.
Sharded runs (FSDP2 W=2,3 uneven, FSDP1, DDP, ZeroScheduleFree) equal one process on the full batch.
"""

import copy
import logging
import os

import pytest
import safetensors.torch
import schedulefree
import torch
import torch.distributed as dist
from torch import nn

import mlp_case
from dist import run_distributed

import sf_dist
from sf_dist.weights import eval_state_dict
from sf_dist.wrapper import UNSTEPPED

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7, 3), (5,), (4, 2, 3), (1,), (0, 3)]
STEPS = 20
BASES = {
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.005)),
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.5)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05)),
}


def _prefill(base):
    """The state torch's Adam, AdamW and RMSprop create lazily, created in advance: 1.4.1's wrapper
    puts z into the base's state first, so the base would skip its own setup and raise KeyError."""
    keys = {torch.optim.Adam: ("exp_avg", "exp_avg_sq"), torch.optim.AdamW: ("exp_avg", "exp_avg_sq"),
            torch.optim.RMSprop: ("square_avg",)}.get(type(base), ())
    for group in base.param_groups:
        for p in group["params"]:
            if keys:
                base.state[p].update({"step": torch.tensor(0.0)}, **{k: torch.zeros_like(p) for k in keys})
    return base


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _run(optimizers, tensors, steps, start=0, skip_some=True, after_step=None):
    """Same gradients for all; with ``skip_some`` tensor 0 gets none every third step."""
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + k)
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in tensors[0]]
        for opt, ps in zip(optimizers, tensors):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (skip_some and i == 0 and k % 3 == 2) else g.clone()
            opt.step()
        if after_step is not None:
            after_step()


def _close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, tensor {i}: {m}")


def _pair(name, wd, momentum, ref_class, seed=0):
    cls, kw = BASES[name]
    init = _params(seed)
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours = sf_dist.ScheduleFreeWrapper(cls(ps[0], **kw), weight_decay_at_y=wd, momentum=momentum, r=0.5)
    theirs = ref_class(_prefill(cls(ps[1], **kw)), momentum=momentum, weight_decay_at_y=wd, r=0.5)
    return ps, ours, theirs


@pytest.mark.parametrize("name", BASES)
def test_matches_schedulefree_wrapper(name):
    """Train y, eval x, y after eval->train and 5 more steps, against both 1.4.1 wrapper classes
    (ScheduleFreeWrapperReference moves params without a gradient too: every param gets one there)."""
    for ref_class in (schedulefree.ScheduleFreeWrapper, schedulefree.ScheduleFreeWrapperReference):
        skip_some = ref_class is schedulefree.ScheduleFreeWrapper
        for wd, momentum in ((0.0, 0.9), (0.1, 0.8)):
            ps, ours, theirs = _pair(name, wd, momentum, ref_class)
            ours.train(), theirs.train()
            what = f"{name} wd={wd} m={momentum} vs {ref_class.__name__}"
            _run([ours, theirs], ps, STEPS, skip_some=skip_some)
            _close(ps[0], ps[1], f"train y, {what}")
            ours.eval(), theirs.eval()
            _close(ps[0], ps[1], f"eval x, {what}")
            ours.train(), theirs.train()
            _close(ps[0], ps[1], f"y after eval->train, {what}")
            _run([ours, theirs], ps, 5, start=STEPS, skip_some=skip_some)
            _close(ps[0], ps[1], f"y after 5 more steps, {what}")
            assert all(set(ours.state[p]) == {"z"} for p in ps[0]), what  # one extra buffer per param
            assert all("z" not in ours.base.state[p] for p in ps[0]), what
            assert ours.param_groups[0]["k"] == STEPS + 5


def test_equals_sgd_schedulefree():
    """Around SGD without momentum it is SGDScheduleFree (decay at y): the reference suite's own check."""
    init = _params(1)
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours = sf_dist.ScheduleFreeWrapper(torch.optim.SGD(ps[0], lr=0.3), weight_decay_at_y=0.1, momentum=0.9)
    builtin = sf_dist.SGDScheduleFree(ps[1], lr=0.3, weight_decay=0.1, momentum=0.9, foreach=False)
    ours.train(), builtin.train()
    _run([ours, builtin], ps, STEPS)
    _close(ps[0], ps[1], "train y")
    ours.eval(), builtin.eval()
    _close(ps[0], ps[1], "eval x")


def test_lr_scheduler_on_the_base_is_honoured():
    """A LambdaLR warmup attached to the base: the same trajectory as 1.4.1's wrapper under it, and
    not the trajectory without it (so the scheduled lr really reached the step)."""
    runs = []
    for scheduled in (True, False):
        ps, ours, theirs = _pair("adam", 0.05, 0.9, schedulefree.ScheduleFreeWrapper, seed=2)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o.base, lambda k: min(1.0, (k + 1) / 5)) for o in (ours, theirs)]
        ours.train(), theirs.train()
        _run([ours, theirs], ps, STEPS, after_step=(lambda: [s.step() for s in scheds]) if scheduled else None)
        _close(ps[0], ps[1], f"scheduled={scheduled}")
        runs.append([p.detach().clone() for p in ps[0]])
        if scheduled:
            assert ours.param_groups[0]["scheduled_lr"] == pytest.approx(0.01)
    assert not torch.allclose(runs[0][0], runs[1][0], rtol=RTOL, atol=ATOL)


def test_state_dict_round_trip():
    """Saved in eval mode at step 12, loaded into a fresh wrapper around a fresh base, 8 more steps:
    equal to the uninterrupted 1.4.1 run; the base's own state travels beside z, under "base." keys."""
    ps, ours, theirs = _pair("adamw", 0.1, 0.9, schedulefree.ScheduleFreeWrapper, seed=3)
    ours.train(), theirs.train()
    _run([ours, theirs], ps, 12)
    ours.eval()
    sd = ours.state_dict()
    assert set(sd["state"][1]) == {"z", "base.step", "base.exp_avg", "base.exp_avg_sq"}
    assert sd["param_groups"][0]["base.lr"] == BASES["adamw"][1]["lr"]
    fresh = [p.detach().clone().requires_grad_() for p in ps[0]]
    loaded = sf_dist.ScheduleFreeWrapper(torch.optim.AdamW(fresh, **BASES["adamw"][1]), weight_decay_at_y=0.1, r=0.5)
    loaded.load_state_dict(sd)
    assert loaded.param_groups[0]["k"] == 12 and not loaded.train_mode
    theirs.eval()
    _close(fresh, ps[1], "x after load")
    loaded.train(), theirs.train()
    _run([loaded, theirs], [fresh, ps[1]], 8, start=12)
    _close(fresh, ps[1], "y 8 steps after load")
    with pytest.raises(ValueError, match="no 'base.' entries"):
        loaded.load_state_dict(theirs.state_dict())


def test_eval_api_serves_the_wrapper(tmp_path):
    """eval_weights, eval_state_dict and save_eval_weights give x; y is untouched afterwards."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    ref.load_state_dict(model.state_dict())
    opt = sf_dist.ScheduleFreeWrapper(torch.optim.Adam(model.parameters(), lr=0.01), weight_decay_at_y=0.01)
    ref_opt = schedulefree.ScheduleFreeWrapper(_prefill(torch.optim.Adam(ref.parameters(), lr=0.01)),
                                               weight_decay_at_y=0.01)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.train()
        for k in range(STEPS):
            g = torch.Generator().manual_seed(k)
            x, t = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
            o.zero_grad()
            nn.functional.mse_loss(m(x), t).backward()
            o.step()
    ref_opt.eval()
    x_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    y = {k: v.clone() for k, v in model.state_dict().items()}
    with sf_dist.eval_weights(model, opt):
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    exported = eval_state_dict(model, opt)
    sf_dist.save_eval_weights(model, opt, tmp_path / "x.safetensors")
    saved = load_file(tmp_path / "x.safetensors")
    for k in x_ref:
        for what, got in (("eval_weights", inside), ("eval_state_dict", exported), ("save_eval_weights", saved)):
            torch.testing.assert_close(got[k], x_ref[k], rtol=RTOL, atol=ATOL, msg=f"{what}: {k}")
        assert torch.equal(model.state_dict()[k], y[k]), f"y changed: {k}"
    assert opt.train_mode


def test_bad_bases_are_refused():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sf_dist.ScheduleFreeWrapper(object())
    with pytest.raises(TypeError, match="already Schedule-Free"):
        sf_dist.ScheduleFreeWrapper(sf_dist.AdamWScheduleFree(p))
    with pytest.raises(ValueError, match="momentum"):
        sf_dist.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.1), momentum=1.0)
    with pytest.raises(TypeError, match="sharded params"):  # told it is sharded: Adafactor is not elementwise
        sf_dist.ScheduleFreeWrapper(torch.optim.Adafactor(p), sharded=True)


# ---- sharded: one spawn per world size --------------------------------------------------------
def _model():
    torch.manual_seed(0)  # 17 rows: uneven shards at W=2 (9/8) and W=3 (6/6/5)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).double()


def _data():
    return mlp_case.batches(7) + mlp_case.batches(8) + mlp_case.batches(9)[:4]  # 20 steps


# ZeroScheduleFree's bases (the FSDP/DDP cases use the first) and bucket caps: one bucket whose params
# straddle the ranks, and one bucket per param (bucket_cap_mb 1e-4 is 13 float64 elements)
ZERO_BASES = {"Adam": (torch.optim.Adam, dict(lr=0.02), 25.0),
              "SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.5), 1e-4)}


def _reference(base="Adam", steps=20):
    """(y, x) of 1.4.1's wrapper around a prefilled base, one process, full batches."""
    cls, kw, _ = ZERO_BASES[base]
    model = _model()
    opt = schedulefree.ScheduleFreeWrapper(_prefill(cls(model.parameters(), **kw)), weight_decay_at_y=0.01,
                                           momentum=0.9)
    mlp_case.run(model, opt, _data()[:steps])
    y = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    return y, {k: v.clone() for k, v in model.state_dict().items()}


def _fsdp2(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))


def _check(got, want, what):
    for k in want:
        v = got[k].full_tensor() if hasattr(got[k], "full_tensor") else got[k]
        torch.testing.assert_close(v, want[k], rtol=RTOL, atol=ATOL, msg=f"{what}: {k}")


class _Elementwise(torch.optim.SGD):
    """An optimizer the wrapper does not know: refused on shards until registered."""


def _sharded_worker(rank, world, workdir):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP
    y_ref, x_ref = _reference()
    adam = dict(lr=0.02)
    cases = {
        "FSDP2": lambda: _fsdp2(_model(), world),
        "DDP": lambda: DDP(_model()),
        "FSDP1": lambda: _fsdp1(_model()),
    }
    from sf_dist import checkpoint
    path = os.path.join(workdir, "fsdp2")
    for name, build in cases.items():
        model = build()
        opt = sf_dist.ScheduleFreeWrapper(torch.optim.Adam(model.parameters(), **adam), weight_decay_at_y=0.01)
        mlp_case.run(model, opt, _data()[:12], rank, world)
        if name == "FSDP2" and world == 2:  # a checkpoint at step 12, in eval mode, resumed below
            opt.eval()
            checkpoint.save(path, model, opt)
        mlp_case.run(model, opt, _data()[12:], rank, world)
        what = f"W={world} {name}"
        if name == "FSDP1":
            with FSDP.summon_full_params(model):
                _check({k: v.clone() for k, v in model.module.state_dict().items()}, y_ref, f"{what} train y")
        else:
            sd = model.module.state_dict() if name == "DDP" else model.state_dict()
            _check(sd, y_ref, f"{what} train y")
        exported = eval_state_dict(model, opt)  # x, every backend, without changing y
        if rank == 0:
            _check({k.removeprefix("module."): v for k, v in exported.items()}, x_ref, f"{what} eval_state_dict x")
        assert opt.train_mode, what
    _zero_cases(rank, world, workdir)
    if world == 3:
        _empty_shards(rank, world, workdir)
    else:
        _zero_scheduler(rank, world)
    if world == 2:  # the FSDP2 checkpoint, resumed in a fresh model and wrapper (the base without state)
        model = _fsdp2(_model(), world)
        opt = sf_dist.ScheduleFreeWrapper(torch.optim.Adam(model.parameters(), **adam), weight_decay_at_y=0.01)
        checkpoint.load(path, model, opt)
        mlp_case.run(model, opt, _data()[12:], rank, world)
        _check(model.state_dict(), y_ref, f"W={world} FSDP2 resumed from sf_dist.checkpoint, train y")
    # refusals on shards: a base that is not elementwise (Adafactor), one that is unknown
    refused = []
    for name, build in (("FSDP2", lambda: _fsdp2(_model(), world)), ("FSDP1", lambda: _fsdp1(_model()))):
        model = build()
        for base in (torch.optim.Adafactor(model.parameters()), _Elementwise(model.parameters(), lr=0.1)):
            try:
                sf_dist.ScheduleFreeWrapper(base)
            except TypeError as e:
                assert type(base).__name__ in str(e) and "register_elementwise" in str(e), str(e)
                refused.append((name, type(base).__name__))
        sf_dist.register_elementwise(_Elementwise)
        sf_dist.ScheduleFreeWrapper(_Elementwise(model.parameters(), lr=0.1))  # now taken
        sf_dist.wrapper.ELEMENTWISE_BASES.discard(_Elementwise)
    model = DDP(_model())  # replicated params: any base is fine
    sf_dist.ScheduleFreeWrapper(torch.optim.Adafactor(model.parameters()))
    return refused


def _zero(base, weights=None, **base_options):
    cls, kw, cap = ZERO_BASES[base]
    model = _model()
    if weights is not None:
        model.load_state_dict(weights)
    wrapper = sf_dist.ScheduleFreeWrapper.around(cls, **kw, **base_options)
    return model, sf_dist.ZeroScheduleFree(model.parameters(), wrapper, bucket_cap_mb=cap, momentum=0.9,
                                           weight_decay=0.01)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _zero_cases(rank, world, workdir):
    """ZeroScheduleFree around the wrapper (Adam in one bucket, SGD in one per param) equals 1.4.1's
    wrapper on one process over 20 steps; its sf_dist.checkpoint at step 12 (Adam's in eval mode,
    SGD's in train mode) resumes at this W (bitwise from train mode) and, at W=3, from W=2's, in train
    and eval mode; the offline export of the checkpoint is x; its own state dicts (per rank, and
    consolidated into one process or sliced by every rank) resume; mismatched loads are refused."""
    from sf_dist import checkpoint
    from sf_dist.checkpoint.offline import export_checkpoint
    consolidated = {}
    for base in ZERO_BASES:
        (y12, x12), (y_ref, x_ref), train = _reference(base, 12), _reference(base), base == "SGD"
        what, path = f"W={world} ZeroScheduleFree({base} wrapper)", os.path.join(workdir, f"zero_{base}_w{world}")
        model, opt = _zero(base)
        mlp_case.run(model, opt, _data()[:12], rank, world)
        if not train:
            opt.eval()
        checkpoint.save(path, model, opt, extra={"k": 12})
        per_rank, weights, full = copy.deepcopy(opt.state_dict()), _snapshot(model), [opt.consolidated_state_dict()]
        mlp_case.run(model, opt, _data()[12:], rank, world)
        _check(model.state_dict(), y_ref, f"{what} train y")
        y_run = _snapshot(model)
        opt.eval()
        _check(model.state_dict(), x_ref, f"{what} eval x")
        if rank == 0:
            checkpoint.verify(path)
            export_checkpoint(path, os.path.join(workdir, f"x_{base}_w{world}.safetensors"))
            _check(safetensors.torch.load_file(os.path.join(workdir, f"x_{base}_w{world}.safetensors")), x12,
                   f"{what} offline export of the step-12 checkpoint")
        for source in [path] + ([os.path.join(workdir, f"zero_{base}_w2")] if world == 3 else []):
            how = f"{what} resumed from {os.path.basename(source)}"
            model, opt = _zero(base)
            assert checkpoint.load(source, model, opt) == {"k": 12}, how
            assert opt.train_mode == train and opt.param_groups[0]["k"] == 12, how
            _check(model.state_dict(), y12 if train else x12, f"{how}, {'y' if train else 'x'} right after load")
            mlp_case.run(model, opt, _data()[12:], rank, world)
            _check(model.state_dict(), y_ref, f"{how}, train y")
            if train and source == path:
                assert all(torch.equal(model.state_dict()[k], v) for k, v in y_run.items()), f"{how}: not bitwise"
            exported = eval_state_dict(model, opt)
            if rank == 0:
                _check(exported, x_ref, f"{how}, eval_state_dict x")
            opt.eval()
            _check(model.state_dict(), x_ref, f"{how}, eval x")
        # ZeroScheduleFree's own state dicts at step 12: this rank's, and the consolidated one
        dist.broadcast_object_list(full, src=0)
        consolidated[base] = full[0]
        for name, sd in (("its per-rank state_dict", per_rank), ("the consolidated state dict", full[0])):
            model, opt = _zero(base, weights)
            opt.load_state_dict(copy.deepcopy(sd))
            assert opt.train_mode == train and opt.param_groups[0]["k"] == 12, name
            mlp_case.run(model, opt, _data()[12:], rank, world)
            _check(model.state_dict(), y_ref, f"{what} resumed from {name}, train y")
            opt.eval()
            _check(model.state_dict(), x_ref, f"{what} resumed from {name}, eval x")
        if rank == 0:  # the consolidated dict in one process: "ignore" keeps its step from an all-reduce
            model = _model()
            model.load_state_dict(weights)
            cls, kw, _ = ZERO_BASES[base]
            one = sf_dist.ScheduleFreeWrapper(cls(model.parameters(), **kw), nonfinite="ignore")
            one.load_state_dict(copy.deepcopy(full[0]))
            assert one.base.param_groups[0]["lr"] == kw["lr"] and one.param_groups[0]["momentum"] == 0.9
            mlp_case.run(model, one, _data()[12:])
            _check(model.state_dict(), y_ref, f"{what} consolidated into one process, train y")
            one.eval()
            _check(model.state_dict(), x_ref, f"{what} consolidated into one process, eval x")
    if world == 2:
        _mismatches(workdir, consolidated["Adam"])


def _zero_scheduler(rank, world):
    """A LambdaLR on ZeroScheduleFree around the wrapper sets the base's lr: equal to one process
    with the same LambdaLR on the base."""
    decay = lambda k: 1.0 / (1 + k)
    model, opt = _zero("Adam")
    ref = _model()
    cls, kw, _ = ZERO_BASES["Adam"]
    one = sf_dist.ScheduleFreeWrapper(cls(ref.parameters(), **kw), momentum=0.9, weight_decay_at_y=0.01,
                                      nonfinite="ignore")
    per = mlp_case.BATCH // world
    for net, o, sched, rows in ((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, decay), slice(rank * per, (rank + 1) * per)),
                                (ref, one, torch.optim.lr_scheduler.LambdaLR(one.base, decay), slice(None))):
        o.train()
        for x, t in _data()[:6]:
            o.zero_grad()
            nn.functional.mse_loss(net(x[rows]), t[rows]).backward()
            o.step()
            sched.step()
    assert opt.inner.base.param_groups[0]["lr"] == pytest.approx(kw["lr"] * decay(5))  # the last step's
    _check(model.state_dict(), ref.state_dict(), f"W={world} ZeroScheduleFree(Adam wrapper) with a LambdaLR, train y")


class _Narrow(nn.Module):
    """A 6-element weight and a 1-element bias, broadcast to the 3 targets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 1).double()

    def forward(self, x):
        return self.lin(x).expand(-1, 3)


def _empty_shards(rank, world, workdir):
    """At W=3 the bias's bucket (its own param group) lies on rank 0 alone: the other ranks still
    agree on the base's state keys and save empty shards, and the resume equals 1.4.1's wrapper; so
    does the run that saved at step 0 (the base's placeholder state) and a resume from that save."""
    from sf_dist import checkpoint
    data, path = mlp_case.batches(5), os.path.join(workdir, "narrow")

    def build():
        model = _Narrow()
        Adam = sf_dist.ScheduleFreeWrapper.around(torch.optim.Adam, lr=0.05)
        groups = [{"params": [model.lin.weight]}, {"params": [model.lin.bias]}]
        return model, sf_dist.ZeroScheduleFree(groups, Adam, bucket_cap_mb=1e-6, momentum=0.9)

    ref = _Narrow()
    ref_opt = schedulefree.ScheduleFreeWrapper(_prefill(torch.optim.Adam(ref.parameters(), lr=0.05)), momentum=0.9)
    mlp_case.run(ref, ref_opt, data)
    model, opt = build()
    assert [len(b.pieces) for b in opt.all_buckets()] == [1, int(rank == 0)]
    checkpoint.save(path + "_step0", model, opt)  # the base has no state yet: placeholders, dropped at step 1
    mlp_case.run(model, opt, data[:4], rank, world)
    checkpoint.save(path, model, opt)
    model, opt = build()
    checkpoint.load(path, model, opt)
    mlp_case.run(model, opt, data[4:], rank, world)
    _check(model.state_dict(), ref.state_dict(), "W=3 resumed with empty shards, train y")
    from_step0 = build()
    checkpoint.load(path + "_step0", *from_step0)
    mlp_case.run(*from_step0, data, rank, world)
    _check(from_step0[0].state_dict(), ref.state_dict(), "W=3 resumed from a step-0 checkpoint, train y")
    opt.eval()
    ref_opt.eval()
    _check(model.state_dict(), ref.state_dict(), "W=3 resumed with empty shards, eval x")


def _mismatches(workdir, adam_full):
    """Wrapper checkpoints into a built-in class, an SGD or amsgrad base, and back, are refused by name."""
    from sf_dist import checkpoint
    adam, sgd = (os.path.join(workdir, f"zero_{b}_w2") for b in ("Adam", "SGD"))
    model = _model()
    builtin = sf_dist.ZeroScheduleFree(model.parameters(), lr=0.02)
    checkpoint.save(os.path.join(workdir, "builtin"), model, builtin)
    saved_by = r"saved by ZeroScheduleFree\({}\), this optimizer is ZeroScheduleFree\({}\)"
    cases = [(adam, lambda: (model, builtin), saved_by.format("ScheduleFreeWrapper_Adam", "AdamWScheduleFree")),
             (os.path.join(workdir, "builtin"), lambda: _zero("Adam"),
              saved_by.format("AdamWScheduleFree", "ScheduleFreeWrapper_Adam")),
             (sgd, lambda: _zero("Adam"), saved_by.format("ScheduleFreeWrapper_SGD", "ScheduleFreeWrapper_Adam")),
             (adam, lambda: _zero("Adam", amsgrad=True),
              r"missing \['optim\.buckets\.group0_bucket0\.base\.max_exp_avg_sq'\], unexpected \[\]")]
    for source, build, match in cases:  # refused before the weights or counters change
        model, opt = build()
        before = (_snapshot(model), str(opt.param_groups))
        with pytest.raises(RuntimeError, match=match):
            checkpoint.load(source, model, opt)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before[0].items()), source
        assert str(opt.param_groups) == before[1], source
    with pytest.raises(ValueError, match="holds a base optimizer's state"):
        builtin.load_state_dict(copy.deepcopy(adam_full))
    builtin_full = [builtin.consolidated_state_dict()]
    dist.broadcast_object_list(builtin_full, src=0)
    with pytest.raises(ValueError, match="lacks a base optimizer's state"):
        _zero("Adam")[1].load_state_dict(builtin_full[0])
    with pytest.raises(ValueError, match="base optimizer has the group keys"):
        _zero("SGD")[1].load_state_dict(copy.deepcopy(adam_full))


def test_sharded_equals_one_process(tmp_path):
    """At W=2 then W=3 (uneven shards): FSDP2, DDP, FSDP1 and ZeroScheduleFree around Adam (and SGD)
    equal 1.4.1's wrapper on one process over 20 full batches (y, and x through the eval API); FSDP2
    at W=2 also when resumed from an sf_dist.checkpoint at step 12; ZeroScheduleFree's checkpoints
    resume at W=2, W=3 and from W=2 to W=3 (see _zero_cases); shards refuse Adafactor and an
    unregistered optimizer, naming it and the fix."""
    want = [(b, o) for b in ("FSDP2", "FSDP1") for o in ("Adafactor", "_Elementwise")]
    for world in (2, 3):  # W=3 loads W=2's checkpoints
        results = run_distributed(_sharded_worker, world, str(tmp_path))
        for rank, refused in enumerate(results):
            assert refused == want, (world, rank, refused)


def _wrapped_linear(seed=0, lr=0.02):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, sf_dist.ScheduleFreeWrapper(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1),
                                              weight_decay_at_y=0.01)


def test_dcp_checkpoint_resumes_the_wrapper_bitwise_and_exports_x(tmp_path, caplog):
    """sf_dist.checkpoint.save in eval mode at step 12, load into a fresh model and wrapper (the base
    has no state yet): x in the params, the base's state and lr back, 8 more steps bitwise equal to
    the uninterrupted run; the offline export gives x."""
    from sf_dist import checkpoint
    from sf_dist.checkpoint.offline import export_checkpoint

    data = mlp_case.batches(11) + mlp_case.batches(12) + mlp_case.batches(13)[:4]  # 12 steps, then 8 more
    model, opt = _wrapped_linear()
    mlp_case.run(model, opt, data[:12])
    opt.eval()
    checkpoint.save(tmp_path / "ckpt", model, opt, extra={"step": 12})
    x = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, loaded = _wrapped_linear(seed=1, lr=0.05)  # the base's lr comes back from the checkpoint
    with caplog.at_level(logging.WARNING, logger="sf_dist"):
        assert checkpoint.load(tmp_path / "ckpt", fresh, loaded) == {"step": 12}
    assert "continuing with" not in caplog.text  # nothing claims the constructor's lr is kept
    assert not loaded.train_mode and loaded.param_groups[0]["k"] == 12
    assert [g["lr"] for g in loaded.param_groups] == [g["lr"] for g in loaded.base.param_groups] == [0.02]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in x.items())
    p, q = model[0].weight, fresh[0].weight
    assert set(loaded.base.state[q]) == {"step", "exp_avg", "exp_avg_sq", UNSTEPPED}  # no z; marked real
    assert all(torch.equal(loaded.base.state[q][k], opt.base.state[p][k]) for k in opt.base.state[p])
    mlp_case.run(model, opt, data[12:])
    mlp_case.run(fresh, loaded, data[12:])
    assert set(loaded.base.state[q]) == {"step", "exp_avg", "exp_avg_sq"}  # the marker goes at the next step
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "x.safetensors"))
    exported = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert exported.keys() == x.keys() and all(torch.equal(exported[k], v) for k, v in x.items())


@pytest.mark.parametrize("base", [
    lambda ps: torch.optim.Adam(ps, lr=0.01),  # a step count the placeholder would advance
    lambda ps: torch.optim.Rprop(ps, lr=0.01),  # a step size it would start from lr 0
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, dampening=0.5),  # a buffer it would start at 0
], ids=["Adam", "Rprop", "SGD"])
def test_a_save_before_the_base_has_state_changes_nothing(base, tmp_path):
    """Checkpoints at step 0 and at step 2, while one param has had no gradient yet (its base state
    is init_state's placeholder): the run that saved, and a fresh one loaded from step 2, are bitwise
    the run that never saved."""
    from sf_dist import checkpoint

    def build():
        torch.manual_seed(0)
        model = nn.ParameterDict({"p": nn.Parameter(torch.randn(5, dtype=torch.float64)),
                                  "q": nn.Parameter(torch.randn(3, dtype=torch.float64))})
        return model, sf_dist.ScheduleFreeWrapper(base(list(model.values())), momentum=0.9)

    def train(model, opt, steps, save_at=()):
        opt.train()
        for k in steps:
            if k in save_at:
                checkpoint.save(tmp_path / f"step{k}", model, opt)
            g = torch.Generator().manual_seed(k)
            model["p"].grad = torch.randn(5, generator=g, dtype=torch.float64)
            model["q"].grad = torch.randn(3, generator=g, dtype=torch.float64) if k >= 3 else None
            opt.step()
        return torch.cat([t.detach() for t in model.values()])

    want = train(*build(), range(6))
    assert torch.equal(train(*build(), range(6), save_at=(0, 2)), want)
    model, opt = build()
    checkpoint.load(tmp_path / "step2", model, opt)
    assert torch.equal(train(model, opt, range(2, 6)), want)
