"""The gradient check done in post-accumulate-grad hooks (guard.CheckedGrads): a result is used at
step() only while it still describes the gradient; every other gradient is scanned as before."""

import copy

import pytest
import torch

import sf_dist
from sf_dist import guard


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


X = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _backward(model, scale=1.0):
    """One real backward; ``scale`` inf or nan poisons every gradient through autograd."""
    (model(X).square().sum() * scale).backward()


@pytest.fixture
def scanned(monkeypatch):
    """How many gradients each step() read in its own scan (a spy around guard's scan)."""
    counts = []
    scan = guard._scan
    monkeypatch.setattr(guard, "_scan", lambda grads: (counts.append(len(grads)), scan(grads))[1])
    return counts


def _snapshot(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1]["param_groups"] == b[1]["param_groups"] and \
        all(torch.equal(t, b[1]["state"][k][n]) for k, s in a[1]["state"].items() for n, t in s.items())


def test_hooked_gradients_are_not_scanned_again_and_the_steps_equal_unchecked_ones(scanned):
    model, bare = _model(), _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    ref = sf_dist.AdamWScheduleFree(bare.parameters(), lr=0.01, nonfinite="ignore")
    opt.train(), ref.train()
    for _ in range(4):
        for m, o in ((model, opt), (bare, ref)):
            o.zero_grad()
            _backward(m)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), bare.parameters()))
    # the first step hooks the params and scans all 4 gradients; later ones were each checked by
    # its hook during backward (4 scans of one tensor) and step() read none of them again
    assert scanned == [4] + ([1] * 4 + [0]) * 3 and opt.skipped_steps == 0


@pytest.mark.parametrize("poison", ["backward", "in place", "new tensor", "accumulated", "through .grad view"])
def test_a_nonfinite_gradient_is_never_missed(poison, scanned):
    model = _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    _backward(model)
    opt.step()  # hooks are in place from here
    opt.zero_grad()
    _backward(model, float("nan") if poison == "backward" else 1.0)
    w = model[2].weight
    if poison == "in place":
        w.grad[1, 2] = float("inf")
    elif poison == "new tensor":
        w.grad = torch.full_like(w, float("nan"))
    elif poison == "accumulated":
        (model(X).sum() * float("inf")).backward()
    elif poison == "through .grad view":
        w.grad.view(-1)[3] = float("-inf")
    before = _snapshot(model, opt)
    opt.step()
    assert opt.skipped_steps == 1 and _same(before, _snapshot(model, opt))


def test_accumulation_zero_grad_and_finite_rewrites_never_skip_a_finite_step():
    model, bare = _model(), _model()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    ref = sf_dist.AdamWScheduleFree(bare.parameters(), lr=0.01, nonfinite="ignore")
    opt.train(), ref.train()
    for m, o in ((model, opt), (bare, ref)):
        _backward(m)
        o.step()
    _backward(model, float("nan"))  # a NaN batch, then the user zeroes in place and rewrites the grads
    model.zero_grad(set_to_none=False)
    for m in (model, bare):
        for p in m.parameters():
            p.grad = torch.ones_like(p) if m is bare else p.grad.copy_(torch.ones_like(p))
    opt.step(), ref.step()
    _backward(model, float("inf"))  # an Inf batch, dropped with set_to_none, then two accumulated batches
    opt.zero_grad()
    bare.zero_grad()
    for m in (model, bare):
        _backward(m)
        _backward(m, 0.5)
    opt.step(), ref.step()
    assert opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), bare.parameters()))


def test_params_added_later_and_a_loaded_optimizer_are_checked():
    model, extra = _model(), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    _backward(model)
    opt.step()
    opt.add_param_group({"params": [extra]})
    opt.train()  # the new group starts in eval mode
    for _ in range(2):  # the first of these steps hooks `extra`, the second relies on the hook
        opt.zero_grad()
        (model(X).sum() + (extra * float("nan")).sum()).backward()
        opt.step()
    assert opt.skipped_steps == 2
    loaded = sf_dist.AdamWScheduleFree([{"params": list(model.parameters())}, {"params": [extra]}], lr=0.01)
    loaded.load_state_dict(opt.state_dict())
    loaded.train()
    for _ in range(2):
        loaded.zero_grad()
        (model(X).sum() + (extra * float("inf")).sum()).backward()
        loaded.step()
    assert loaded.skipped_steps == 2 and loaded.param_groups[0]["k"] == 1


def test_error_names_the_parameter_a_hook_found():
    model = _model()
    opt = sf_dist.SGDScheduleFree(model.parameters(), lr=0.1, nonfinite="error")
    opt.train()
    _backward(model)
    opt.step()
    opt.zero_grad()
    (model(X).sum() + model[2].bias.sum() * float("nan")).backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[3\]"):
        opt.step()


def test_first_nonfinite_with_known_results_scans_only_the_unknown_ones_before_the_first_bad():
    finite, bad = torch.ones(4), torch.tensor([1.0, float("nan")])
    assert guard.first_nonfinite([finite, bad, finite], [True, None, True]) == 1
    assert guard.first_nonfinite([bad, finite, finite], [None, False, None]) == 0
    assert guard.first_nonfinite([finite, finite, bad], [None, False, None]) == 1  # trusts a recorded result
    assert guard.first_nonfinite([finite, finite], [True, None]) is None
    assert guard.first_nonfinite([bad, finite], [True, True]) is None  # what the hooks said: trusted
