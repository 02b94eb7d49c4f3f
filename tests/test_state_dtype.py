"""state_dtype=torch.bfloat16: z and the moments stored in bf16 with stochastic rounding.

No oracle holds bf16 state, so the checks are: the rounding is unbiased (and round-to-nearest on
the same values is not), the state is bf16 and half the bytes, the run stays close to fp32 state,
state dicts keep the dtype, and ZeroScheduleFree shards it (half the per-rank state bytes).
"""

import pytest
import torch
from torch import nn

import mlp_case
from dist import run_distributed
from rounding_case import EXACT, SPECIAL, assert_unbiased, values

import sf_dist
from sf_dist import kernels
from sf_dist.kernels.rounding import stochastic_round_

PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]


def test_rounding_is_unbiased():
    """stochastic_round_ (the per-tensor, foreach and accelerator paths) on 1000 values x 4096 rounds."""
    x, reps = values()
    src = x.repeat(reps, 1)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_([dst], [src], torch.Generator().manual_seed(1))
    assert_unbiased(dst.float(), x)
    out = torch.empty_like(SPECIAL, dtype=torch.bfloat16)
    stochastic_round_([out], [SPECIAL])
    assert torch.equal(out.float()[:2], SPECIAL[:2]) and out[2].isnan() and (out[3:] == 0).all()


def _kernel_step(g, seed, threads=None):
    """One fused CPU step on bf16 z, v, m under fp32 params, with scalars that make the step write
    z = -g/2, v = g*g and m = g/2 (rounding_case.EXACT) before rounding them into bf16."""
    z, v, m = (torch.zeros_like(g, dtype=torch.bfloat16) for _ in range(3))
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        kernels.step_([torch.zeros_like(g)], [g], [z], [v], EXACT, impl="fused", exp_avgs=[m],
                      generator=torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(before)
    return z, v, m


def test_fused_kernel_rounds_in_its_pass_unbiased_and_deterministic():
    """The C++ CPU kernel rounds bf16 z, v and m in its one pass: each unbiased (1000 values x 4096
    rounds), NaN/Inf kept; the same seed gives the same bits at 1 and 2 threads, another seed others."""
    if kernels.cpu_kernel_error() is not None:
        pytest.skip(f"the C++ CPU kernel does not build here: {kernels.cpu_kernel_error()}")
    x, reps = values()
    g = x.repeat(reps)
    z, v, m = _kernel_step(g, seed=1)
    for got, want in ((z, -x / 2), (v, x * x), (m, x / 2)):
        assert_unbiased(got.float().view(reps, -1), want)
    part = g[: 4 * 65536]  # several of parallel_for's chunks
    one, two = (_kernel_step(part, seed=1, threads=n) for n in (1, 2))
    assert all(torch.equal(a, b) and torch.equal(a, c[: part.numel()]) for a, b, c in zip(one, two, (z, v, m)))
    assert not torch.equal(one[0], _kernel_step(part, seed=2)[0])
    z, v, m = _kernel_step(SPECIAL.clone(), seed=1)
    for got, want in ((z, -SPECIAL / 2), (v, SPECIAL * SPECIAL), (m, SPECIAL / 2)):
        assert torch.equal(got.float()[[0, 1, 3, 4]], want[[0, 1, 3, 4]]) and got[2].isnan()


@pytest.mark.parametrize("impl", PATHS, ids=["single", "foreach", "fused"])
def test_bf16_state_is_half_the_bytes_and_stays_close(impl):
    """An MLP regression, 60 steps, AdamW (with inner momentum too) and RAdam: state is bf16 (4 or
    6 bytes per param instead of 8 or 12) and the final loss at x is within 1% of fp32 state's."""
    for cls, kw in ((sf_dist.AdamWScheduleFree, dict(lr=0.01, warmup_steps=5, weight_decay=0.01)),
                    (sf_dist.AdamWScheduleFree, dict(lr=0.01, warmup_steps=5, inner_momentum=0.9)),
                    (sf_dist.RAdamScheduleFree, dict(lr=0.01))):
        losses, nbytes = {}, {}
        for state_dtype in (None, torch.bfloat16):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
            opt = cls(model.parameters(), state_dtype=state_dtype, **kw, **impl)
            data = mlp_case.batches(3, torch.float32) * 8
            mlp_case.run(model, opt, data[:60])
            opt.eval()
            x, t = mlp_case.batches(4, torch.float32)[0]
            losses[state_dtype] = nn.functional.mse_loss(model(x), t).item()
            nbytes[state_dtype] = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
            assert all(v.dtype == (state_dtype or torch.float32) for s in opt.state.values() for v in s.values())
        assert nbytes[torch.bfloat16] * 2 == nbytes[None], (cls.__name__, kw)
        assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.01), (cls.__name__, kw, losses)


def test_state_dict_keeps_bf16_and_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01, state_dtype=torch.bfloat16)
    mlp_case.run(model, opt, mlp_case.batches(5, torch.float32))
    opt.eval()
    sd, x = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fresh.load_state_dict(model.state_dict())
    loaded = sf_dist.AdamWScheduleFree(fresh.parameters(), lr=0.01, state_dtype=torch.bfloat16)
    loaded.load_state_dict(sd)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("z", "exp_avg_sq"):
            assert loaded.state[q][key].dtype == torch.bfloat16 and torch.equal(loaded.state[q][key], opt.state[p][key])
    opt.train(), loaded.train()
    opt.eval(), loaded.eval()
    for p, q, want in zip(model.parameters(), fresh.parameters(), x):
        assert torch.equal(p, q) and torch.equal(p, want)
    with pytest.raises(ValueError, match="state_dtype"):
        sf_dist.AdamWScheduleFree(model.parameters(), state_dtype=torch.float16)


@pytest.mark.parametrize("impl", PATHS, ids=["per-tensor", "foreach", "fused"])
def test_bf16_state_resumes_bitwise(impl):
    """A state dict at step 3 loaded into a fresh optimizer: 3 more steps bitwise the uninterrupted
    run's (each step's rounding stream comes from the step count, which the state dict keeps)."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3))
        return model, sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01, state_dtype=torch.bfloat16, **impl)

    data = mlp_case.batches(5, torch.float32)[:6]
    model, opt = build()
    mlp_case.run(model, opt, data)
    want = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    mlp_case.run(model, opt, data[:3])
    resumed, resumed_opt = build()
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(opt.state_dict())
    mlp_case.run(resumed, resumed_opt, data[3:])
    assert all(torch.equal(p, w) for p, w in zip(resumed.parameters(), want))


def _ddp_replicas_agree(rank, world):
    """Plain DDP with bf16 state: both replicas' params and state bitwise equal after training."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01, state_dtype=torch.bfloat16)
    mlp_case.run(model, opt, mlp_case.batches(3, torch.float32), rank, world)
    mine = [t.float() for p in model.parameters() for t in (p.detach(), opt.state[p]["z"], opt.state[p]["exp_avg_sq"])]
    theirs = [t.clone() for t in mine]
    for t in theirs:
        torch.distributed.broadcast(t, src=0)
    return all(torch.equal(a, b) for a, b in zip(mine, theirs))


def _zero_worker(rank, world):
    out = {"ddp replicas agree": _ddp_replicas_agree(rank, world)}
    for state_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3))
        opt = sf_dist.ZeroScheduleFree(model.parameters(), sf_dist.AdamWScheduleFree, stage=2, lr=0.01,
                                       state_dtype=state_dtype)
        mlp_case.run(model, opt, mlp_case.batches(3, torch.float32) * 4, rank, world)
        opt.eval()
        x, t = mlp_case.batches(4, torch.float32)[0]
        out[str(state_dtype)] = (nn.functional.mse_loss(model(x), t).item(),
                                 sum(v.numel() * v.element_size() for s in opt.inner.state.values() for v in s.values()),
                                 {v.dtype for s in opt.inner.state.values() for v in s.values()})
        full = opt.consolidated_state_dict()
        if state_dtype is not None:
            opt.load_state_dict(full if rank == 0 else opt.state_dict())
            assert {v.dtype for s in opt.inner.state.values() for v in s.values()} == {torch.bfloat16}
    return out


def test_zero_shards_bf16_state():
    """ZeroScheduleFree at W=2: each rank's state is bf16 and half the bytes of fp32 state; the
    loss at x stays within 1%; a reload keeps the dtype. And plain DDP replicas round alike."""
    for out in run_distributed(_zero_worker, 2):
        assert out["ddp replicas agree"]
        (l32, b32, d32), (l16, b16, d16) = out["None"], out["torch.bfloat16"]
        assert d32 == {torch.float32} and d16 == {torch.bfloat16}
        assert b16 * 2 == b32
        assert l16 == pytest.approx(l32, rel=0.01)
