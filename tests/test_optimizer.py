"""Optimizer behaviour beyond the numerics: validation, modes, lazy state, state dicts both ways."""

import copy
import os

import pytest
import schedulefree
import torch

import sf_dist
from dist import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randn(16, 2, generator=gen, dtype=torch.float64)


def _train(model, opt, steps, start=0):
    for k in range(start, start + steps):
        x, y = _batch(k)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _snapshot(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name in sa["state"][key]:
            assert torch.equal(sa["state"][key][name], sb["state"][key][name])


@pytest.mark.parametrize("cls,kwargs,message", [
    (sf_dist.AdamWScheduleFree, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (sf_dist.AdamWScheduleFree, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (sf_dist.AdamWScheduleFree, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (sf_dist.AdamWScheduleFree, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (sf_dist.AdamWScheduleFree, dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (sf_dist.AdamWScheduleFree, dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (sf_dist.RAdamScheduleFree, dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
    (sf_dist.SGDScheduleFree, dict(momentum=1.0), "Invalid momentum value: 1.0"),
    (sf_dist.SGDScheduleFree, dict(momentum=-0.2), "Invalid momentum value: -0.2"),
    (sf_dist.SGDScheduleFree, dict(warmup_steps=-1), "Invalid warmup_steps: -1"),
    (sf_dist.AdamWScheduleFree, dict(warmup_steps=-3), "Invalid warmup_steps: -3"),
    (sf_dist.AdamWScheduleFree, dict(decay_at="x"), "Invalid decay_at: 'x'"),
    (sf_dist.AdamWScheduleFree, dict(foreach=True, fused=True), "foreach=True and fused=True are exclusive"),
    (sf_dist.AdamWScheduleFree, dict(lr=float("inf")), "Invalid learning rate: inf"),
    (sf_dist.AdamWScheduleFree, dict(lr=float("nan")), "Invalid learning rate: nan"),
    (sf_dist.AdamWScheduleFree, dict(weight_decay=float("inf")), "Invalid weight_decay value: inf"),
    (sf_dist.AdamWScheduleFree, dict(eps=float("nan")), "Invalid epsilon value: nan"),
    (sf_dist.AdamWScheduleFree, dict(r=float("nan")), "Invalid r: nan"),
    (sf_dist.SGDScheduleFree, dict(r=float("inf")), "Invalid r: inf"),
    (sf_dist.RAdamScheduleFree, dict(weight_lr_power=float("nan")), "Invalid weight_lr_power: nan"),
    (sf_dist.AdamWScheduleFree, dict(weight_lr_power=float("-inf")), "Invalid weight_lr_power: -inf"),
    (sf_dist.AdamWScheduleFree, dict(warmup_steps=float("inf")), "Invalid warmup_steps: inf"),
    (sf_dist.AdamWScheduleFree, dict(warmup_steps=2.5), "Invalid warmup_steps: 2.5"),
    (sf_dist.AdamWScheduleFree, dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1: nan"),
    (sf_dist.SGDScheduleFree, dict(momentum=float("nan")), "Invalid momentum value: nan"),
])
def test_invalid_hyperparameters_name_the_value(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(_model().parameters(), **kwargs)


def test_invalid_value_in_a_param_group_is_caught():
    model = _model()
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        sf_dist.AdamWScheduleFree([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": -0.5}])


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", -1.0),
                                       ("r", float("nan")), ("warmup_steps", 1.5), ("betas", (0.9, float("inf")))])
def test_invalid_value_written_into_param_groups_is_refused_at_step_and_changes_nothing(key, value):
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.05)
    opt.train()
    _train(model, opt, 2)
    opt.param_groups[0][key] = value
    x, y = _batch(9)
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"in param_groups\[0\]") as err:
        opt.step()
    assert repr(value if key != "betas" else value[1]) in str(err.value)
    _assert_same(before, _snapshot(model, opt))


def test_complex_params_and_sparse_gradients_get_our_own_message():
    with pytest.raises(ValueError, match=r"do not support complex parameters .*complex64.*view_as_real"):
        sf_dist.AdamWScheduleFree([torch.zeros(2, 3, dtype=torch.complex64, requires_grad=True)])
    real = torch.zeros(3, requires_grad=True)
    opt = sf_dist.AdamWScheduleFree([real])
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex128, requires_grad=True)]})
    assert len(opt.param_groups) == 1  # the refused group was not kept
    for nonfinite in ("skip", "error", "ignore"):
        emb = torch.nn.Embedding(5, 3, sparse=True)
        opt = sf_dist.SGDScheduleFree(emb.parameters(), nonfinite=nonfinite)
        opt.train()
        emb(torch.tensor([1, 2])).sum().backward()
        before = emb.weight.detach().clone()
        with pytest.raises(RuntimeError, match=r"do not support sparse gradients \(a param of shape \(5, 3\) got a "
                                               r"torch.sparse_coo gradient\)"):
            opt.step()
        assert torch.equal(before, emb.weight) and not opt.state


@pytest.mark.parametrize("cls", [sf_dist.AdamWScheduleFree, sf_dist.SGDScheduleFree, sf_dist.RAdamScheduleFree])
def test_step_in_eval_mode_raises_and_changes_nothing(cls):
    model = _model()
    opt = cls(model.parameters())
    with pytest.raises(RuntimeError, match=r"call optimizer.train\(\)|Call optimizer.train\(\)"):
        opt.step()  # constructed in eval mode, like the reference
    opt.train()
    _train(model, opt, 3)
    opt.eval()
    x, y = _batch(99)
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = _snapshot(model, opt)
    calls = []
    with pytest.raises(RuntimeError, match="Call optimizer.train()"):
        opt.step(closure=lambda: calls.append(1))
    assert calls == []  # the closure is not even evaluated
    _assert_same(before, _snapshot(model, opt))


def test_train_and_eval_are_idempotent():
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.05)
    opt.train()
    _train(model, opt, 4)
    y = _snapshot(model, opt)
    opt.train()
    _assert_same(y, _snapshot(model, opt))
    opt.eval()
    x = _snapshot(model, opt)
    opt.eval()
    _assert_same(x, _snapshot(model, opt))
    assert not opt.train_mode
    opt.train()
    assert opt.train_mode
    for a, b in zip(y[0], _snapshot(model, opt)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_params_without_grads_empty_groups_and_late_grads_match_reference():
    """A frozen param, an empty group and a param that first gets a gradient at step 5."""
    torch.manual_seed(0)
    init = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    ours_p = [t.clone().requires_grad_() for t in init]
    ref_p = [t.clone().requires_grad_() for t in init]
    ours = sf_dist.AdamWScheduleFree([{"params": ours_p[:2]}, {"params": []}, {"params": ours_p[2:], "lr": 0.01}])
    ref = schedulefree.AdamWScheduleFree([{"params": ref_p[:2]}, {"params": []}, {"params": ref_p[2:], "lr": 0.01}])
    ours.train(), ref.train()
    for k in range(12):
        gen = torch.Generator().manual_seed(k)
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
            live = i == 0 or (i == 2 and k >= 5)  # param 1 never has a grad
            a.grad = g.clone() if live else None
            b.grad = g.clone() if live else None
        ours.step(), ref.step()
    assert "z" not in ours.state.get(ours_p[1], {})
    for when in ("train", "eval"):
        getattr(ours, when)(), getattr(ref, when)()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert torch.equal(ours_p[1], init[1])


def test_swap_never_inserts_empty_state():
    """train()/eval() must not create state entries (DCP would then skip creating z)."""
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters())
    opt.train(), opt.eval(), opt.train()
    assert len(opt.state) == 0
    opt.init_state()
    assert len(opt.state) == 4 and all("z" in s and "exp_avg_sq" in s for s in opt.state.values())
    assert opt.param_groups[0]["k"] == 0 and opt.param_groups[0]["weight_sum"] == 0.0


@pytest.mark.parametrize("ours_first", [True, False])
def test_state_dict_round_trip_with_schedulefree(ours_first):
    """Save from one implementation mid-run, load into the other, continue: same trajectory."""
    make_ours = lambda m: sf_dist.AdamWScheduleFree(m.parameters(), lr=0.02, weight_decay=0.01, warmup_steps=3)
    make_ref = lambda m: schedulefree.AdamWScheduleFree(m.parameters(), lr=0.02, weight_decay=0.01, warmup_steps=3)
    first, second = (make_ours, make_ref) if ours_first else (make_ref, make_ours)

    straight = _model()
    opt = first(straight)
    opt.train()
    _train(straight, opt, 12)
    opt.eval()

    model_a = _model()
    opt_a = first(model_a)
    opt_a.train()
    _train(model_a, opt_a, 6)
    opt_a.eval()  # the usual way to checkpoint: eval weights in the model
    saved_model, saved_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(opt_a.state_dict())

    model_b = _model(seed=7)
    model_b.load_state_dict(saved_model)
    opt_b = second(model_b)
    opt_b.load_state_dict(saved_opt)
    opt_b.train()
    _train(model_b, opt_b, 6, start=6)
    opt_b.eval()
    for a, b in zip(straight.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert opt_b.param_groups[0]["k"] == 12


def _flat_halves(rank, world_size):
    """Each rank steps its contiguous slice of one flat vector; gather and return the whole."""
    import torch.distributed as dist

    n = 23
    chunk = -(-n // world_size)  # uneven: 12 + 11 at W=2
    full = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lo, hi = rank * chunk, min(n, (rank + 1) * chunk)
    results = {}
    for name, cls, hp in [("adamw", sf_dist.AdamWScheduleFree, dict(lr=0.05, weight_decay=0.1, warmup_steps=3)),
                          ("sgd", sf_dist.SGDScheduleFree, dict(lr=0.5, weight_decay=0.1, decay_at="all")),
                          ("radam", sf_dist.RAdamScheduleFree, dict(lr=0.05, decay_at="z", weight_decay=0.1))]:
        shard = full[lo:hi].clone().requires_grad_()
        opt = cls([shard], **hp)
        opt.train()
        for k in range(15):
            g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            shard.grad = g[lo:hi].clone()
            opt.step()
        out = {}
        for mode in ("train", "eval"):
            getattr(opt, mode)()
            padded = torch.zeros(chunk, dtype=torch.float64)
            padded[: hi - lo] = shard.detach()
            parts = [torch.zeros(chunk, dtype=torch.float64) for _ in range(world_size)]
            dist.all_gather(parts, padded)
            out[mode] = torch.cat(parts)[:n]
        results[name] = out
    return results


def test_two_ranks_stepping_halves_equal_one_rank_stepping_the_whole():
    ranks = run_distributed(_flat_halves, 2)
    single = run_distributed(_flat_halves, 1)[0]
    for name in single:
        for mode in ("train", "eval"):
            for r in range(2):
                assert torch.equal(ranks[r][name][mode], single[name][mode]), (name, mode, r)


def test_default_kernel_path_is_fused_on_cpu_and_explicit_choices_win():
    from sf_dist.optim import _pick_impl

    t = [torch.zeros(3)]
    group = dict(fused=None, foreach=None)
    assert _pick_impl(group, t) == "fused"
    assert _pick_impl(dict(group, foreach=False), t) == "single"
    assert _pick_impl(dict(group, foreach=True), t) == "foreach"
    assert _pick_impl(dict(group, fused=True), t) == "fused"


def _one_rank_without_cpu_kernel(rank, world_size, build_dir):
    """Rank 1 has no working compiler (a fresh extensions dir and CXX pointing nowhere), so it cannot
    build the fused C++ kernel that rank 0 loads: the replicas must still step identically."""
    import warnings

    if rank == 1:
        os.environ["CXX"] = "/nonexistent/c++"
        os.environ["TORCH_EXTENSIONS_DIR"] = build_dir
    from sf_dist import kernels

    out = {"kernel_error": kernels.cpu_kernel_error()}
    torch.manual_seed(0)
    runs = {}
    for name, kwargs in (("default", {}), ("per_tensor", dict(foreach=False))):
        model = _model().float()
        opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.05, weight_decay=0.1, **kwargs)
        opt.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(20):
                x, y = _batch(k)
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x.float()), y.float()).backward()
                opt.step()
        runs[name] = [p.detach().clone() for p in model.parameters()]
        out[f"{name}_warnings"] = [str(w.message) for w in caught]
    out.update(runs)
    if rank == 0:  # the check can fail: in float32 the fused kernel rounds differently from per-tensor
        model = _model().float()
        opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.05, weight_decay=0.1, fused=True,
                                        nonfinite="ignore")  # rank 0 alone: no agreement collective
        opt.train()
        for k in range(20):
            x, y = _batch(k)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.float()), y.float()).backward()
            opt.step()
        out["fused"] = [p.detach().clone() for p in model.parameters()]
    model = _model().float()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), nonfinite="ignore")
    opt.train()
    torch.nn.functional.mse_loss(model(_batch(0)[0].float()), _batch(0)[1].float()).backward()
    try:
        opt.step()
        out["ignore_error"] = None
    except RuntimeError as e:
        out["ignore_error"] = str(e)
    return out


def test_ranks_agree_on_the_kernel_when_one_cannot_build_it(tmp_path):
    r0, r1 = run_distributed(_one_rank_without_cpu_kernel, 2, str(tmp_path / "no_compiler"), timeout=300)
    assert r0["kernel_error"] is None and "needs to build a small C++ kernel and that failed" in r1["kernel_error"]
    assert not all(torch.equal(a, b) for a, b in zip(r0["fused"], r0["per_tensor"]))  # the paths do differ
    for a, b, c in zip(r0["default"], r1["default"], r0["per_tensor"]):
        assert torch.equal(a, b) and torch.equal(a, c)  # both ranks took the per-tensor path
    assert any("another rank cannot build the fused C++ CPU kernel" in w for w in r0["default_warnings"])
    assert any("every rank steps with the per-tensor kernel" in w for w in r1["default_warnings"])
    assert r0["ignore_error"] is None  # no agreement without a collective: the rank that differs raises
    assert "nonfinite='ignore'" in r1["ignore_error"] and "foreach=False on every rank" in r1["ignore_error"]
    assert r1["kernel_error"] in r1["ignore_error"]


def _zero_refusals(rank, world_size):
    model = _model()
    out = {}
    try:
        sf_dist.ZeroScheduleFree([{"params": list(model.parameters())}, {"params": [model[0].weight]}])
    except ValueError as e:
        out["twice"] = str(e)
    emb = torch.nn.Embedding(4, 3, sparse=True).double()
    opt = sf_dist.ZeroScheduleFree(emb.parameters())
    opt.train()
    try:
        emb(torch.tensor([0, 1])).sum().backward()
        opt.step()
    except RuntimeError as e:
        out["sparse"] = str(e)
    return out


def test_zero_names_a_param_listed_twice_and_a_sparse_gradient():
    for r in run_distributed(_zero_refusals, 2):
        assert r["twice"] == ("param 0 of group 1 (shape (5, 6)) is also param 0 of group 0: "
                              "pass each parameter once")
        assert "ZeroScheduleFree does not support sparse gradients (a param of shape (4, 3) got a " \
               "torch.sparse_coo gradient)" in r["sparse"]
