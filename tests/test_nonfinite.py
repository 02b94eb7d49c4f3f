"""Non-finite gradients and mode agreement: every rank skips, raises or proceeds together."""

import copy

import pytest
import torch
import torch.distributed as dist

import sf_dist
from dist import run_distributed


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def _grads(model, step, poison=False):
    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if poison and i == 2:
            p.grad.view(-1)[1] = float("nan")


def _everything(model, opt):
    """Params, per-param state and group scalars, deep-copied for bitwise comparison."""
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _assert_bitwise(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1]["param_groups"] == b[1]["param_groups"]
    for key, state in a[1]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b[1]["state"][key][name]), (key, name)


@pytest.mark.parametrize("cls", [sf_dist.AdamWScheduleFree, sf_dist.SGDScheduleFree, sf_dist.RAdamScheduleFree])
def test_skip_leaves_state_bitwise_unchanged_and_continues_like_a_clean_run(cls):
    model, clean = _model(), _model()
    opt, clean_opt = cls(model.parameters(), lr=0.01), cls(clean.parameters(), lr=0.01)
    opt.train(), clean_opt.train()
    for k in range(8):
        if k == 4:
            _grads(model, 100, poison=True)
            before = _everything(model, opt)
            opt.step()
            _assert_bitwise(before, _everything(model, opt))
            assert opt.skipped_steps == 1
        _grads(model, k), _grads(clean, k)
        opt.step(), clean_opt.step()
    _assert_bitwise(_everything(clean, clean_opt), _everything(model, opt))
    assert clean_opt.skipped_steps == 0


def test_skip_before_any_state_exists_creates_none():
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters())
    opt.train()
    _grads(model, 0, poison=True)
    opt.step()
    assert len(opt.state) == 0 and opt.param_groups[0]["k"] == 0 and opt.skipped_steps == 1


def test_error_names_step_and_parameter_and_changes_nothing():
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), nonfinite="error")
    opt.train()
    for k in range(3):
        _grads(model, k)
        opt.step()
    _grads(model, 9, poison=True)
    before = _everything(model, opt)
    with pytest.raises(RuntimeError, match=r"non-finite gradient at step 3 in param_groups\[0\]\['params'\]\[2\] \(shape \(3, 4\)\)"):
        opt.step()
    _assert_bitwise(before, _everything(model, opt))


def test_ignore_propagates_like_the_reference():
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), nonfinite="ignore")
    opt.train()
    _grads(model, 0, poison=True)
    opt.step()
    assert torch.isnan(list(model.parameters())[2]).any()


def test_invalid_nonfinite_is_refused():
    with pytest.raises(ValueError, match="Invalid nonfinite: 'drop'"):
        sf_dist.AdamWScheduleFree(_model().parameters(), nonfinite="drop")


def _ranks_agree(rank, world_size):
    """Rank 1 alone sees a NaN, then rank 1 alone is in eval mode: every rank must react the same."""
    out = {}
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    _grads(model, 0)
    opt.step()
    _grads(model, 1, poison=rank == 1)
    before = _everything(model, opt)
    opt.step()
    out["skipped"] = opt.skipped_steps
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before[0], _everything(model, opt)[0]))
    out["k"] = opt.param_groups[0]["k"]

    opt.nonfinite = "error"
    _grads(model, 2, poison=rank == 1)
    try:
        opt.step()
    except RuntimeError as e:
        out["error"] = str(e)

    opt.nonfinite = "skip"
    opt.zero_grad()  # a backward each rank finds finite, then summed by hand into an Inf: the step must see it
    (model[2].bias * 1e308).sum().backward()
    dist.all_reduce(model[2].bias.grad)
    opt.step()
    out["overflow_skipped"] = opt.skipped_steps - out["skipped"]
    if rank == 1:
        opt.eval()
    _grads(model, 3)
    try:
        opt.step()
    except RuntimeError as e:
        out["mode"] = str(e)
    dist.barrier()
    return out


def test_ranks_skip_raise_and_refuse_together():
    r0, r1 = run_distributed(_ranks_agree, 2)
    assert r0["skipped"] == r1["skipped"] == 1 and r0["unchanged"] and r1["unchanged"]
    assert r0["k"] == r1["k"] == 1
    assert r0["overflow_skipped"] == r1["overflow_skipped"] == 1
    assert "on another rank" in r0["error"] and "param_groups[0]['params'][2]" in r1["error"]
    assert "another rank is in eval mode" in r0["mode"]
    assert "Call optimizer.train()" in r1["mode"]


def _fsdp2_skip(rank, world_size):
    """FSDP2: a NaN in one rank's local gradient shard makes every rank skip, state bitwise kept."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
    before = [p.to_local().clone() for p in model.parameters()]
    state_before = {i: {k: v.to_local().clone() for k, v in opt.state[p].items()}
                    for i, p in enumerate(model.parameters())}
    opt.step()
    unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    unchanged &= all(torch.equal(v, opt.state[p][k].to_local())
                     for i, p in enumerate(model.parameters()) for k, v in state_before[i].items())
    return dict(unchanged=unchanged, skipped=opt.skipped_steps, k=opt.param_groups[0]["k"],
                weight_sum=opt.param_groups[0]["weight_sum"])


def test_fsdp2_ranks_skip_together():
    results = run_distributed(_fsdp2_skip, 2)
    for r in results:
        assert r["unchanged"] and r["skipped"] == 1 and r["k"] == 1
    assert results[0]["weight_sum"] == results[1]["weight_sum"]


def _deepspeed_skip(rank, world_size):
    """DeepSpeed ZeRO-2 (fp32): a NaN batch on rank 1 is skipped by both ranks (DeepSpeed's own
    overflow check sees it first here; ours would otherwise) and the Schedule-Free scalars stay put."""
    import torch.nn.functional as F
    from test_deepspeed import Net, _config, _groups

    from sf_dist import deepspeed as sfds

    model = Net()
    engine, opt, _, _ = sfds.initialize(model=model, config=_config(2), model_parameters=_groups(model))
    opt.train()
    base = opt.optimizer

    def step(poison):
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        if poison:
            x[0, 0] = float("nan")
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()

    step(False)
    weights = [p.detach().clone() for p in engine.module.parameters()]
    counters = [(g["k"], g["weight_sum"], g["lr_max"]) for g in base.param_groups]
    step(rank == 1)
    return dict(unchanged=all(torch.equal(a, p) for a, p in zip(weights, engine.module.parameters())),
                counters=counters == [(g["k"], g["weight_sum"], g["lr_max"]) for g in base.param_groups],
                skipped=base.skipped_steps + engine.skipped_steps)


def test_deepspeed_ranks_skip_together():
    pytest.importorskip("deepspeed")
    for r in run_distributed(_deepspeed_skip, 2):
        assert r == dict(unchanged=True, counters=True, skipped=1)


@pytest.mark.parametrize("kernel", ["cpu", "foreach_norm"])
def test_first_nonfinite_finds_every_position_and_dtype(kernel, monkeypatch):
    """The C++ check (four streams of sixteen-lane blocks plus a tail, chunked over threads) and the fallback."""
    from sf_dist import guard, kernels

    if kernel == "foreach_norm":
        monkeypatch.setattr(kernels, "cpu_kernel_error", lambda: "forced off by the test")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        sizes = [0, 1, 17, 70001]
        tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        assert guard.first_nonfinite(tensors) is None
        for i, n in enumerate(sizes):
            for pos in {0, n // 4, n // 2, 3 * n // 4, n - 1} if n else set():  # each stream and the tail
                for bad in (float("nan"), float("inf"), -float("inf")):
                    poisoned = [t.clone() for t in tensors]
                    poisoned[i][pos] = bad
                    assert guard.first_nonfinite(poisoned) == i, (dtype, n, pos, bad)
        big = [torch.full((8,), 6e4, dtype=torch.float16)]  # large but finite: no false alarm
        assert guard.first_nonfinite(big) is None
    # several bad tensors, their blocks spread over the threads: the first one in list order wins
    ts = [torch.zeros(300_000), torch.zeros(5), torch.zeros(300_000), torch.zeros(7)]
    for bad, want in (({0: -1, 3: 0}, 0), ({2: 0, 1: 4, 3: 6}, 1), ({3: 6, 2: 299_999}, 2)):
        poisoned = [t.clone() for t in ts]
        for i, pos in bad.items():
            poisoned[i][pos] = float("nan")
        assert guard.first_nonfinite(poisoned) == want, bad
