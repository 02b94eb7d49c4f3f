"""The Triton multi-tensor kernel (the CUDA default) under Triton's CPU interpreter, against
schedulefree 1.4.1 and the explicit oracle, on both step paths: host scalars and sync-free."""

import importlib

import pytest
import schedulefree
import torch
from rounding_case import EXACT, SPECIAL, assert_unbiased, values

import sf_dist
from sf_dist import kernels
from sf_dist.optim import ScheduleFreeOptimizer
from sf_dist.reference import ReferenceScheduleFree
from sf_dist.schedule import StepScalars

pytest.importorskip("triton", reason="triton is not installed (pip install triton; Linux x86-64 only)")

SHAPES = [(7, 3), (5,), (4, 2, 3), (1,), (0, 3), (150,)]
OURS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}
THEIRS = {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree,
          "radam": schedulefree.RAdamScheduleFree}
TOL = {torch.float64: dict(rtol=1e-5, atol=1e-6), torch.float32: dict(rtol=1e-5, atol=1e-6)}  # the reference's own


@pytest.fixture
def tk(monkeypatch):
    """sf_dist.kernels.triton re-imported under the interpreter and taken for CPU tensors; the small
    CHUNK/BLOCK keep the interpreter quick and make the 150-element tensor span three programs (one
    block each: the interpreter's cost grows with blocks; the bf16 test below runs two per program)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.reload(importlib.import_module("sf_dist.kernels.triton"))
    monkeypatch.setattr(module, "available", lambda device: True)
    monkeypatch.setattr(module, "CHUNK", 64)
    monkeypatch.setattr(module, "BLOCK", 64)
    monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: False)  # fused=True leaves the C++ kernel
    calls = []
    step = module.step_
    monkeypatch.setattr(module, "step_", lambda *a, **kw: (calls.append(len(a[0])), step(*a, **kw)))
    yield calls
    monkeypatch.undo()
    importlib.reload(module)  # compiled again, as outside the tests


def sync_free(monkeypatch):
    """Take the sync-free path (device counters, device flag, masked stores) on CPU tensors."""
    monkeypatch.setattr(ScheduleFreeOptimizer, "_sync_free_device",
                        lambda self, active: torch.device("cpu") if self.nonfinite == "skip" else None)


def _tensors(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _run(opts, params, steps, start=0, poison_at=None):
    for k in range(start, start + steps):
        grads = _tensors(params[0][0].dtype, 1000 + k)
        for opt, ps in zip(opts, params):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 0 and k % 3 == 2) else g.clone()
            opt.step()


def _close(a, b, what, **tol):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{what}, tensor {i}: {m}")


HPS = {"adamw": [dict(lr=0.01, weight_decay=0.05, warmup_steps=5, r=0.5, weight_lr_power=2.0),
                 dict(lr=0.02, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=0.0)],
       "sgd": [dict(lr=0.5, weight_decay=0.05, warmup_steps=5, r=0.5, weight_lr_power=2.0),
               dict(lr=0.3, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=0.0)],
       "radam": [dict(lr=0.01, weight_decay=0.05, silent_sgd_phase=True, r=0.5, weight_lr_power=2.0),
                 dict(lr=0.02, weight_decay=0.0, silent_sgd_phase=False, r=0.0, weight_lr_power=0.0)]}


@pytest.mark.parametrize("path", ["host scalars", "sync-free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_matches_schedulefree_through_train_and_eval(kind, dtype, path, tk, monkeypatch):
    if path == "sync-free":
        sync_free(monkeypatch)
    for hp in HPS[kind]:
        init = _tensors(dtype)
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        ours = OURS[kind](ps[0], fused=True, nonfinite="skip" if path == "sync-free" else "ignore", **hp)
        theirs = THEIRS[kind](ps[1], **hp)
        ours.train(), theirs.train()
        _run([ours, theirs], ps, 6)
        what = f"{kind} {dtype} {path} {hp}"
        _close(ps[0], ps[1], f"train y, {what}", **TOL[dtype])
        ours.eval(), theirs.eval()
        _close(ps[0], ps[1], f"eval x, {what}", **TOL[dtype])
        ours.train(), theirs.train()
        _run([ours, theirs], ps, 2, start=6)
        _close(ps[0], ps[1], f"y after eval->train, {what}", **TOL[dtype])
        mine, ref = ours.state_dict()["param_groups"][0], theirs.state_dict()["param_groups"][0]
        for key in ("k", "lr_max", "weight_sum", "scheduled_lr"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-12), (key, what)
        assert ours.skipped_steps == 0
    assert tk and set(tk) == {4, 5}, "one Triton call per step took every non-empty tensor with a grad"


@pytest.mark.parametrize("decay_at", ["z", "all"])
@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_every_decay_at_matches_the_oracle(kind, decay_at, tk, monkeypatch):
    sync_free(monkeypatch)
    hp = dict(HPS[kind][0], decay_at=decay_at)
    init = _tensors(torch.float64, 1)
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours, oracle = OURS[kind](ps[0], fused=True, **hp), ReferenceScheduleFree(ps[1], kind=kind, **hp)
    ours.train(), oracle.train()
    _run([ours, oracle], ps, 6)
    _close(ps[0], ps[1], f"train y, {kind} {decay_at}", rtol=1e-5, atol=1e-6)
    ours.eval(), oracle.eval()
    _close(ps[0], ps[1], f"eval x, {kind} {decay_at}", rtol=1e-5, atol=1e-6)
    assert tk


def _snapshot(params, opt):
    sd = opt.state_dict()
    return [p.detach().clone() for p in params], sd["param_groups"], {
        k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_skipped_step_is_bitwise_unchanged_and_continues_like_a_clean_run(kind, tk, monkeypatch):
    sync_free(monkeypatch)
    init = _tensors(torch.float32, 2)
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    opt, clean = OURS[kind](ps[0], **HPS[kind][0]), OURS[kind](ps[1], **HPS[kind][0])
    for o in (opt, clean):
        o.defaults["fused"] = True
        for g in o.param_groups:
            g["fused"] = True
        o.train()
    _run([opt, clean], ps, 4)
    before = _snapshot(ps[0], opt)
    for i, p in enumerate(ps[0]):
        p.grad = torch.ones_like(p)
        if i == 5:
            p.grad[7] = float("inf") if kind == "sgd" else float("nan")
    opt.step()
    after = _snapshot(ps[0], opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1] == after[1]
    assert all(torch.equal(t, after[2][k][n]) for k, v in before[2].items() for n, t in v.items())
    assert opt.skipped_steps == 1 and clean.skipped_steps == 0
    _run([opt, clean], ps, 3, start=4)
    for a, b in zip(ps[0], ps[1]):
        assert torch.equal(a, b)


def test_bf16_params_with_fp32_state_round_once(tk, monkeypatch):
    """bf16 y and g, fp32 z and v: the kernel computes in fp32 from float64 scalars and rounds each
    stored value once, so y is within half a bf16 ulp of the float64 math and z, v within fp32's
    (two blocks per program here, so the in-program loop is covered)."""
    monkeypatch.setattr(importlib.import_module("sf_dist.kernels.triton"), "BLOCK", 32)
    s = StepScalars(lr=0.01, ckp1=0.3, y_coef=0.01 * (0.9 * 0.7 - 1), weight_decay=0.1, decay_at="y",
                    beta2=0.999, bias_correction2=1 - 0.999**3, eps=1e-8, normalize=True)
    gen = torch.Generator().manual_seed(3)
    ys = [torch.randn(n, generator=gen).bfloat16() for n in (100, 33)]
    gs = [torch.randn(n, generator=gen).bfloat16() for n in (100, 33)]
    zs = [torch.randn(n, generator=gen) for n in (100, 33)]
    vs = [torch.rand(n, generator=gen) * 1e-2 for n in (100, 33)]
    want = [[t.double() for t in ts] for ts in (ys, gs, zs, vs)]
    for y, g, z, v in zip(*want):
        kernels.step_([y], [g], [z], [v], s, impl="single")
    kernels.step_(ys, gs, zs, vs, s, impl="fused")
    for got, exp in zip(ys, want[0]):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - exp).abs() <= 2**-8 * exp.abs()).all()  # half a bf16 ulp of the exact value
    for got, exp in zip(zs + vs, want[2] + want[3]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-9)
    assert tk == [2]


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_bf16_params_through_the_optimizer(kind, tk, monkeypatch):
    """bf16 params (and the state the optimizer makes for them) on the sync-free Triton path stay
    within the documented 2e-2 of the same run in float64, through eval."""
    sync_free(monkeypatch)
    hp = HPS[kind][0]
    init = _tensors(torch.float64, 4)
    ps = [[t.to(dtype).requires_grad_() for t in init] for dtype in (torch.bfloat16, torch.float64)]
    opts = [OURS[kind](ps[0], fused=True, **hp), THEIRS[kind](ps[1], **hp)]
    for o in opts:
        o.train()
    for k in range(6):
        grads = _tensors(torch.float64, 2000 + k)
        for o, qs in zip(opts, ps):
            for p, g in zip(qs, grads):
                p.grad = g.to(p.dtype)
            o.step()
    for o in opts:
        o.eval()
    assert all(p.dtype == torch.bfloat16 for p in ps[0])
    _close([p.double() for p in ps[0]], ps[1], f"bf16 eval x, {kind}", rtol=2e-2, atol=2e-2)
    assert tk


def test_strided_params_on_the_sync_free_fused_path(tk, monkeypatch):
    """A transposed param (not for the kernel's flat table) takes the eager masked update, still exact."""
    sync_free(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(4, 6, generator=gen, dtype=torch.float64).t(), torch.randn(9, generator=gen, dtype=torch.float64)]
    ps = [[torch.nn.Parameter(t.clone().t().contiguous().t() if t.dim() == 2 else t.clone()) for t in init] for _ in range(2)]
    assert not ps[0][0].is_contiguous()
    ours = sf_dist.AdamWScheduleFree(ps[0], fused=True, lr=0.01, warmup_steps=2)
    theirs = schedulefree.AdamWScheduleFree(ps[1], lr=0.01, warmup_steps=2)
    ours.train(), theirs.train()
    for k in range(4):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
        for o, qs in ((ours, ps[0]), (theirs, ps[1])):
            for p, g in zip(qs, grads):
                p.grad = g.clone()
            o.step()
    ours.eval(), theirs.eval()
    _close(ps[0], ps[1], "strided, eval x", rtol=1e-5, atol=1e-6)
    assert tk == [1] * 4  # the contiguous tensor alone went through Triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inner_momentum_in_the_kernel_matches_the_oracle(dtype, tk, monkeypatch):
    """AdamW inner_momentum > 0 through the Triton kernel (its m column), against the explicit oracle:
    y, exp_avg, x after eval, y after eval->train; host scalars with decay at z and warmup, then the
    sync-free path with decay_at="all", where a skipped step leaves m as it was."""
    tol = dict(rtol=1e-5, atol=1e-6)
    for path, hp in (("host scalars", dict(lr=0.01, inner_momentum=0.9, weight_decay=0.05, decay_at="z",
                                           warmup_steps=3, r=0.5)),
                     ("sync-free", dict(lr=0.02, inner_momentum=0.5, weight_decay=0.05, decay_at="all"))):
        if path == "sync-free":
            sync_free(monkeypatch)
        init = _tensors(dtype, 6)
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        ours = sf_dist.AdamWScheduleFree(ps[0], fused=True, nonfinite="skip" if path == "sync-free" else "ignore", **hp)
        oracle = ReferenceScheduleFree(ps[1], kind="adamw", **hp)
        ours.train(), oracle.train()
        _run([ours, oracle], ps, 6)
        what = f"{dtype} {path} {hp}"
        _close(ps[0], ps[1], f"train y, {what}", **tol)
        if path == "sync-free":
            m = [ours.state[p]["exp_avg"].clone() for p in ps[0]]
            for p in ps[0]:
                p.grad = torch.full_like(p, float("nan"))
            ours.step()
            assert ours.skipped_steps == 1 and all(torch.equal(a, ours.state[p]["exp_avg"]) for a, p in zip(m, ps[0]))
        _close([ours.state[p]["exp_avg"] for p in ps[0]], [oracle.state[q]["m"] for q in ps[1]], f"exp_avg, {what}",
               **tol)
        ours.eval(), oracle.eval()
        _close(ps[0], ps[1], f"eval x, {what}", **tol)
        ours.train(), oracle.train()
        _run([ours, oracle], ps, 2, start=6)
        _close(ps[0], ps[1], f"y after eval->train, {what}", **tol)
    assert tk and set(tk) == {4, 5}



def _on_cpu_kernel_switch(monkeypatch):
    """A switch for CPU tensors between the C++ CPU kernel (``[True]``) and the Triton one (``[False]``)."""
    cpp = [False]
    monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: cpp[0])
    return cpp


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # y = 0 * Inf in numpy
def test_bf16_state_rounds_in_the_pass_with_the_cpu_kernels_bits_unbiased(tk, monkeypatch):
    """bf16 z, v, m under fp32 params, stepped so that each is one float32 operation on g
    (rounding_case.EXACT), rounded stochastically in the Triton kernel's pass: bitwise the C++
    kernel's result for the same seed (its counter-based stream, one per tensor of the list), NaN and
    Inf kept, unbiased (256 values x 2048 rounds; round-to-nearest fails it); another seed, other bits."""
    if kernels.cpu_kernel_error() is not None:
        pytest.skip(f"the C++ CPU kernel does not build here: {kernels.cpu_kernel_error()}")
    module = importlib.import_module("sf_dist.kernels.triton")
    monkeypatch.setattr(module, "CHUNK", 65536)  # few wide programs: the interpreter's cost is per block
    monkeypatch.setattr(module, "BLOCK", 65536)
    cpp = _on_cpu_kernel_switch(monkeypatch)
    x, reps = values(256, 2048)
    gs = [SPECIAL.clone(), x.repeat(reps)]

    def step(on_cpp, seed):
        cpp[0] = on_cpp
        z, v, m = ([torch.zeros_like(g, dtype=torch.bfloat16) for g in gs] for _ in range(3))
        kernels.step_([torch.zeros_like(g) for g in gs], gs, z, v, EXACT, impl="fused", exp_avgs=m,
                      generator=torch.Generator().manual_seed(seed))
        return z, v, m

    ours, theirs = step(False, 1), step(True, 1)
    assert tk == [2]
    for a, b in zip(ours, theirs):
        assert all(torch.equal(p.view(torch.int16), q.view(torch.int16)) for p, q in zip(a, b))
    for (special, got), f in zip(ours, (lambda t: -t / 2, lambda t: t * t, lambda t: t / 2)):
        assert_unbiased(got.float().view(reps, -1), f(x))
        assert special[2].isnan() and torch.equal(special.float()[[0, 1, 3, 4]], f(SPECIAL)[[0, 1, 3, 4]])
    assert not torch.equal(ours[0][1], step(False, 2)[0][1])


def _bf16_ulps(a, b):
    """How many bf16 steps apart two bf16 tensors are (their bit patterns as sign-magnitude integers)."""
    ia, ib = (t.view(torch.int16).int() for t in (a, b))
    ia, ib = (torch.where(i < 0, -32768 - i, i) for i in (ia, ib))
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_state_through_the_optimizer_matches_the_cpu_kernel(dtype, tk, monkeypatch):
    """AdamW with state_dtype=torch.bfloat16, with and without inner momentum, on the Triton kernel's
    host-scalar and sync-free paths against the same run on the C++ CPU kernel (one seed per step from
    the optimizer's generator on both): 6 steps, eval, 2 more steps. The random bits agree; the
    float math differs by an ulp where the C++ build contracts into FMAs, which moves a rounding
    (z, v, m) only where that ulp crosses the random threshold: every state value is within one bf16
    step, at most 1% differ; y and x within the reference tolerance. Then a skipped (NaN) step
    on the sync-free path leaves y, state and counters bitwise unchanged. No widened copy is rounded back."""
    if kernels.cpu_kernel_error() is not None:
        pytest.skip(f"the C++ CPU kernel does not build here: {kernels.cpu_kernel_error()}")
    cpp = _on_cpu_kernel_switch(monkeypatch)
    monkeypatch.setattr(kernels, "stochastic_round_", lambda dst, *a: any(t.numel() for t in dst) and pytest.fail(
        "a widened copy was rounded back"))  # (empty tensors, with nothing to step, take that path)
    sync_free(monkeypatch)
    for path, hp in (("host scalars", dict(lr=0.02, weight_decay=0.05, warmup_steps=3, r=0.5)),
                     ("sync-free", dict(lr=0.02, inner_momentum=0.9, weight_decay=0.05, decay_at="z"))):
        init = _tensors(dtype, 7)
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        opts = [sf_dist.AdamWScheduleFree(qs, fused=True, state_dtype=torch.bfloat16, **hp,
                                          nonfinite="skip" if path == "sync-free" and j == 0 else "ignore")
                for j, qs in enumerate(ps)]

        def run(steps, start):
            for k in range(start, start + steps):
                grads = _tensors(dtype, 3000 + k)
                for j, (o, qs) in enumerate(zip(opts, ps)):
                    cpp[0] = j == 1
                    for i, (p, g) in enumerate(zip(qs, grads)):  # a param without grad shifts the streams
                        p.grad = None if (i == 0 and k % 3 == 2) else g.clone()
                    o.step()

        def compare(what):
            _close(ps[0], ps[1], f"{what}, {dtype} {path}", rtol=1e-5, atol=1e-6)
            differ, total = 0, 0
            for p, q in zip(*ps):
                for key, t in opts[0].state[p].items():
                    u = opts[1].state[q][key]
                    assert t.dtype == torch.bfloat16 and (_bf16_ulps(t, u) <= 1).all(), (what, key)
                    differ += int((t != u).sum())
                    total += t.numel()
            assert differ <= 0.01 * total, (what, differ, total)
            return differ, total

        for o in opts:
            o.train()
        run(6, 0)
        compare("train y")
        for o in opts:
            o.eval()
        compare("eval x")
        for o in opts:
            o.train()
        run(2, 6)
        compare("y after eval->train")
        if path == "sync-free":
            before = _snapshot(ps[0], opts[0])
            for p in ps[0]:
                p.grad = torch.full_like(p, float("nan"))
            cpp[0] = False
            opts[0].step()
            after = _snapshot(ps[0], opts[0])
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]
            assert all(torch.equal(t, after[2][k][n]) for k, v in before[2].items() for n, t in v.items())
            assert opts[0].skipped_steps == 1
    assert tk and set(tk) == {4, 5}
