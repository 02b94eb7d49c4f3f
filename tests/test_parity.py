"""Every kernel path of the three optimizers against schedulefree 1.4.1 and our explicit oracle."""

import itertools

import pytest
import schedulefree
import torch

import sf_dist
from sf_dist import kernels
from sf_dist.reference import ReferenceScheduleFree

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7, 3), (5,), (4, 2, 3), (1,), (0, 3)]
IMPLS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
STEPS = 20

OURS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}
THEIRS = {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree,
          "radam": schedulefree.RAdamScheduleFree}


def _grid(kind):
    """Hyperparameter grid of the issue: wd, warmup (or RAdam's silent phase), r, weight_lr_power."""
    lr = 0.5 if kind == "sgd" else 0.01
    for wd, sched, r, wlp in itertools.product([0.0, 0.05], [0, 5], [0.0, 0.5], [0.0, 2.0]):
        hp = dict(lr=lr, weight_decay=wd, r=r, weight_lr_power=wlp)
        if kind == "radam":
            hp["silent_sgd_phase"] = bool(sched)
        else:
            hp["warmup_steps"] = sched
        yield hp


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _grads(step, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _run(optimizers, tensors, steps, start=0):
    """Step several optimizers on the same gradient sequence; the first tensor skips every 3rd grad."""
    for k in range(start, start + steps):
        grads = _grads(k, tensors[0])
        for opt, ps in zip(optimizers, tensors):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 0 and k % 3 == 2) else g.clone()
            opt.step()


def _assert_close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, tensor {i}: {m}")


def _ref_kwargs(kind, hp):
    return {k: v for k, v in hp.items() if k != "decay_at"}


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
@pytest.mark.parametrize("fused_kernel", ["cpu", "compiled"])
def test_matches_schedulefree_over_grid(kind, fused_kernel, monkeypatch):
    """Train mode, eval mode and train->eval->train, 20+ steps, every kernel path.

    fused=True runs the C++ kernel on the CPU; "compiled" forces the torch.compile'd kernel
    that accelerators use, so both fused kernels meet the oracle here.
    """
    impls = IMPLS
    if fused_kernel == "compiled":
        monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: False)
        impls = [dict(fused=True)]
    for hp, impl in itertools.product(list(_grid(kind)), impls):
        init = _params()
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        ours, theirs = OURS[kind](ps[0], **hp, **impl), THEIRS[kind](ps[1], **_ref_kwargs(kind, hp))
        for o in (ours, theirs):
            o.train()
        _run([ours, theirs], ps, STEPS)
        what = f"{kind} {hp} {impl}"
        _assert_close(ps[0], ps[1], f"train y, {what}")
        ours.eval(), theirs.eval()
        _assert_close(ps[0], ps[1], f"eval x, {what}")
        ours.train(), theirs.train()
        _assert_close(ps[0], ps[1], f"y after eval->train, {what}")
        _run([ours, theirs], ps, 5, start=STEPS)
        _assert_close(ps[0], ps[1], f"y after resuming, {what}")
        for key in ("k", "lr_max", "weight_sum", "scheduled_lr"):
            assert ours.param_groups[0][key] == pytest.approx(theirs.param_groups[0][key], rel=1e-12), key


def _oracle_kwargs(kind, hp):
    hp = dict(hp)
    return dict(kind=kind, **hp)


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
@pytest.mark.parametrize("decay_at", ["y", "z", "all"])
def test_matches_explicit_oracle(kind, decay_at):
    """The memory-efficient form equals the explicit x/y/z oracle for every decay mode."""
    for hp in _grid(kind):
        if hp["weight_decay"] == 0:
            continue
        hp["decay_at"] = decay_at
        for impl in IMPLS:
            init = _params(1)
            ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
            ours, oracle = OURS[kind](ps[0], **hp, **impl), ReferenceScheduleFree(ps[1], **_oracle_kwargs(kind, hp))
            ours.train(), oracle.train()
            _run([ours, oracle], ps, STEPS)
            _assert_close(ps[0], ps[1], f"train y, {kind} {hp} {impl}")
            ours.eval(), oracle.eval()
            _assert_close(ps[0], ps[1], f"eval x, {kind} {hp} {impl}")


def test_oracle_matches_schedulefree_reference_classes():
    """Our oracle against the package's explicit classes, decay at y and at z."""
    for decay_at_z in (False, True):
        init = _params(2)
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(3)]
        hp = dict(lr=0.01, weight_decay=0.1, warmup_steps=4)
        opts = [ReferenceScheduleFree(ps[0], kind="adamw", decay_at="z" if decay_at_z else "y", **hp),
                schedulefree.AdamWScheduleFreeReference(ps[1], decay_at_z=decay_at_z, **hp),
                sf_dist.AdamWScheduleFree(ps[2], decay_at="z" if decay_at_z else "y", **hp)]
        for o in opts:
            o.train()
        _run(opts, ps, STEPS)
        _assert_close(ps[0], ps[1], f"oracle vs package reference, decay_at_z={decay_at_z}")
        _assert_close(ps[2], ps[1], f"ours vs package reference, decay_at_z={decay_at_z}")
        for o in opts:
            o.eval()
        _assert_close(ps[0], ps[1], "eval x")
        _assert_close(ps[2], ps[1], "eval x")


def test_decay_all_keeps_x_exact():
    """decay_at="all" shrinks y, z and x together: x derived from (y, z) equals the oracle's x."""
    init = _params(3)
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours = sf_dist.AdamWScheduleFree(ps[0], lr=0.05, weight_decay=0.5, decay_at="all")
    oracle = ReferenceScheduleFree(ps[1], kind="adamw", lr=0.05, weight_decay=0.5, decay_at="all")
    ours.train(), oracle.train()
    _run([ours, oracle], ps, STEPS)
    b1 = 0.9
    for p, q in zip(ps[0], ps[1]):
        if p.numel() == 0:
            continue
        z = ours.state[p]["z"]
        x = (p - (1 - b1) * z) / b1
        torch.testing.assert_close(x, oracle.state[q]["x"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(z, oracle.state[q]["z"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("fused_kernel", ["cpu", "compiled"])
def test_fused_low_precision_close_to_per_tensor(dtype, tol, fused_kernel, monkeypatch):
    """fp32/bf16 fused vs per-tensor: same math, different rounding; documented in docs/kernels.md."""
    if fused_kernel == "compiled":
        monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: False)
    for kind in OURS:
        init = [t.to(dtype) for t in _params(4)]
        ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
        hp = dict(lr=0.5 if kind == "sgd" else 0.01, weight_decay=0.01)
        a, b = OURS[kind](ps[0], fused=True, **hp), OURS[kind](ps[1], foreach=False, **hp)
        a.train(), b.train()
        _run([a, b], ps, STEPS)
        a.eval(), b.eval()
        for x, y in zip(ps[0], ps[1]):
            assert x.dtype == dtype
            torch.testing.assert_close(x, y, **tol)


# ---- the reference suite's own float32 test, over many seeds and every path ----------------------
REFERENCE_SUITE = {  # schedulefree/test_schedulefree.py: lr 0.3, weight_decay 0.5, a 3x2 float32 weight
    "adamw": (dict(lr=0.3, warmup_steps=5, weight_decay=0.5), 10),
    "radam": (dict(lr=0.3, weight_decay=0.5), 20),
}
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "cpu": dict(fused=True),
         "compiled": dict(fused=True)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", REFERENCE_SUITE)
def test_float32_reference_suite_every_seed(kind, path, monkeypatch):
    """float32 at the reference suite's settings and tolerance (rtol 1e-5, atol 1e-6), 100 seeds:
    y, z after every step and x in eval mode all stay within it of schedulefree 1.4.1."""
    if path == "compiled":
        monkeypatch.setattr(kernels, "_on_cpu_kernel", lambda t: False)
    hp, steps = REFERENCE_SUITE[kind]
    failures = []
    for seed in range(100):
        torch.manual_seed(seed)
        init = torch.randn(3, 2)
        ours_p, ref_p = init.clone().requires_grad_(), init.clone().requires_grad_()
        ours, ref = OURS[kind]([ours_p], **hp, **PATHS[path]), THEIRS[kind]([ref_p], **hp)
        for _ in range(steps):
            ours.train(), ref.train()
            grad = torch.rand_like(init)
            ours_p.grad, ref_p.grad = grad.clone(), grad.clone()
            ours.step(), ref.step()
            for mode in ("eval", "train"):
                getattr(ours, mode)(), getattr(ref, mode)()
                for a, b in ((ours_p, ref_p), (ours.state[ours_p]["z"], ref.state[ref_p]["z"])):
                    if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
                        failures.append((seed, mode, (a - b).abs().max().item()))
    assert not failures, f"{len(failures)} mismatches (seed, mode, max abs diff), first: {failures[:5]}"
