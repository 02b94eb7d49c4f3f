"""The sync-free step of accelerators (nonfinite="skip" off the CPU) without Triton: the meta
device proves no host read, the eager masked path meets schedulefree 1.4.1, and the schedule's
tensor form equals its host form."""

import copy

import pytest
import schedulefree
import torch

import sf_dist
from sf_dist.optim import ScheduleFreeOptimizer
from sf_dist.schedule import advance_average, radam_rectification, warmup_factor

OURS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}
THEIRS = {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree,
          "radam": schedulefree.RAdamScheduleFree}


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_default_settings_step_eval_train_on_meta_tensors(kind):
    """Meta tensors raise on .item(), bool() and .tolist(): stepping them proves no host read."""
    ps = [torch.nn.Parameter(torch.empty(4, 3, device="meta")), torch.nn.Parameter(torch.empty(0, device="meta")),
          torch.nn.Parameter(torch.empty(5, device="meta"))]
    opt = OURS[kind](ps)
    assert opt.nonfinite == "skip"
    opt.train()
    counters = None
    for _ in range(3):
        for p in ps:
            p.grad = torch.empty_like(p)
        opt.step()
        opt.eval()
        opt.train()
        group = opt.param_groups[0]
        now = [group[key] for key in ("k", "weight_sum", "lr_max", "scheduled_lr")]
        assert counters is None or all(a is b for a, b in zip(counters, now)), "counters updated in place"
        counters = now
    assert all(group[key].device.type == "meta" for key in ("k", "weight_sum", "lr_max", "scheduled_lr"))
    assert opt.state[ps[0]]["z"].device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        opt.skipped_steps  # the one read that synchronises: it says so on meta tensors


def _sync_free(monkeypatch):
    monkeypatch.setattr(ScheduleFreeOptimizer, "_sync_free_device",
                        lambda self, active: torch.device("cpu") if self.nonfinite == "skip" else None)


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_eager_masked_path_matches_schedulefree_and_skips_bitwise(kind, monkeypatch):
    """The path of accelerators without Triton (foreach=True or False there) in float64."""
    _sync_free(monkeypatch)
    hp = dict(lr=0.5 if kind == "sgd" else 0.01, weight_decay=0.05, r=0.5, weight_lr_power=2.0)
    if kind != "radam":
        hp["warmup_steps"] = 4
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(6, 2), (3,), (0,)]]
    ps = [[t.clone().requires_grad_() for t in init] for _ in range(2)]
    ours, theirs = OURS[kind](ps[0], foreach=True, **hp), THEIRS[kind](ps[1], **hp)
    ours.train(), theirs.train()
    for k in range(12):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
        if k == 6:  # a NaN on one tensor: ours skips bitwise, the reference is not stepped
            before = [p.detach().clone() for p in ps[0]], ours.state_dict()
            for p, g in zip(ps[0], grads):
                p.grad = g.clone()
            ps[0][1].grad[0] = float("nan")
            ours.step()
            after = ours.state_dict()
            assert all(torch.equal(a, p) for a, p in zip(before[0], ps[0]))
            assert before[1]["param_groups"] == after["param_groups"]
            assert all(torch.equal(t, after["state"][i][n]) for i, st in before[1]["state"].items() for n, t in st.items())
            assert ours.skipped_steps == 1
            continue
        for opt, qs in ((ours, ps[0]), (theirs, ps[1])):
            for p, g in zip(qs, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(*ps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    saved = copy.deepcopy(ours.state_dict())  # host numbers, as on the CPU path
    assert type(saved["param_groups"][0]["k"]) is int and type(saved["param_groups"][0]["weight_sum"]) is float
    resumed_ps = [p.detach().clone().requires_grad_() for p in ps[0]]
    resumed = OURS[kind](resumed_ps, foreach=True, **hp)
    resumed.load_state_dict(saved)
    for k in range(3):  # the loaded copy continues like the original and like the reference
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
        for opt, qs in ((ours, ps[0]), (theirs, ps[1]), (resumed, resumed_ps)):
            for p, g in zip(qs, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ps[0], resumed_ps))
    ours.eval(), theirs.eval()
    for a, b in zip(*ps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state_dict()["param_groups"][0]["k"] == theirs.state_dict()["param_groups"][0]["k"] == 14


def test_schedule_tensor_form_equals_host_form():
    """warmup, RAdam's rectification and the average's weight, k = 0..60, host floats vs float64 tensors."""
    host = dict(k=0, lr_max=-1.0, weight_sum=0.0, r=0.5, weight_lr_power=2.0)
    dev = {key: torch.tensor(float(v), dtype=torch.float64) if key in ("k", "lr_max", "weight_sum") else v
           for key, v in host.items()}
    for k in range(61):
        for warmup in (0, 1, 7):
            assert float(warmup_factor(dev["k"], warmup)) == pytest.approx(warmup_factor(k, warmup), rel=1e-15)
        for beta2, silent in ((0.999, True), (0.9, False), (0.5, True)):
            rect, adam = radam_rectification(k, beta2, silent)
            rect_t, adam_t = radam_rectification(dev["k"], beta2, silent)
            assert bool(adam_t) == adam and float(rect_t) == pytest.approx(rect, rel=1e-13), (k, beta2)
        lr = 0.01 * warmup_factor(k, 7)
        ckp1 = advance_average(host, lr)
        ckp1_t = advance_average(dev, 0.01 * warmup_factor(dev["k"], 7))
        assert float(ckp1_t) == pytest.approx(ckp1, rel=1e-14)
        assert float(dev["weight_sum"]) == pytest.approx(host["weight_sum"], rel=1e-14)
        host["k"] += 1
        dev["k"] = dev["k"] + 1
