"""recalibrate_bn: after it, BN running stats equal a hand-computed pass of the data at x."""

import copy

import pytest
import schedulefree
import torch
from torch import nn

import sf_dist

B1 = 0.9


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                         nn.Linear(6, 1)).double()


def _trained(opt_cls):
    model = _model()
    opt = opt_cls(model.parameters(), lr=0.05, betas=(B1, 0.999), warmup_steps=3)
    opt.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        xb = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 2 + 1
        loss = (model(xb) - xb.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _x_weights(model, opt):
    """x = (y - (1-b1) z) / b1 from the train-mode params and their z, independent of opt.eval()."""
    return {n: (p - (1 - B1) * opt.state[p]["z"]) / B1 for n, p in model.named_parameters()}


def _stats_at_x(w, batches):
    """Running stats a momentum=None pass gives: mean of batch means and of unbiased batch variances."""
    sums = {1: [0, 0], 4: [0, 0]}
    for xb in batches:
        h = xb @ w["0.weight"].T + w["0.bias"]
        sums[1][0] = sums[1][0] + h.mean(0)
        sums[1][1] = sums[1][1] + h.var(0, unbiased=True)
        a = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * w["1.weight"] + w["1.bias"]
        h2 = a.clamp_min(0) @ w["3.weight"].T + w["3.bias"]
        sums[4][0] = sums[4][0] + h2.mean(0)
        sums[4][1] = sums[4][1] + h2.var(0, unbiased=True)
    return {i: (m / len(batches), v / len(batches)) for i, (m, v) in sums.items()}


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(16, 4, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(5)]


@pytest.mark.parametrize("opt_cls", [sf_dist.AdamWScheduleFree, schedulefree.AdamWScheduleFree])
def test_running_stats_equal_a_pass_at_x(opt_cls):
    model, opt = _trained(opt_cls)
    y_before = copy.deepcopy(model.state_dict())
    expected = _stats_at_x(_x_weights(model, opt), _batches())
    model.eval()

    sf_dist.recalibrate_bn(model, [(xb, None) for xb in _batches()], opt)

    for i, (mean, var) in expected.items():
        bn = model[i]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert bn.num_batches_tracked.item() == 5
        assert bn.momentum == 0.1
        assert not (y_before[f"{i}.running_mean"] - mean).abs().max() < 1e-3  # the stats did change
    for name, p in model.named_parameters():  # back in train mode: the params hold y again
        torch.testing.assert_close(p, y_before[name], rtol=0, atol=1e-12)
    assert opt.param_groups[0]["train_mode"] and not model.training


def test_one_full_batch_gives_the_data_mean_at_x_and_keeps_eval_mode():
    model, opt = _trained(sf_dist.AdamWScheduleFree)
    w = _x_weights(model, opt)
    data = torch.cat(_batches())
    opt.eval()
    sf_dist.recalibrate_bn(model, [data], opt)
    h = data @ w["0.weight"].T + w["0.bias"]
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, h.var(0), rtol=1e-10, atol=1e-12)
    assert not opt.train_mode and model.training
    for name, p in model.named_parameters():  # still x
        torch.testing.assert_close(p, w[name], rtol=1e-10, atol=1e-12)


def test_dict_batches_no_bn_and_empty_input():
    model, opt = _trained(sf_dist.AdamWScheduleFree)
    expected = _stats_at_x(_x_weights(model, opt), _batches())
    sf_dist.recalibrate_bn(model, [{"input": xb} for xb in _batches()], opt)
    torch.testing.assert_close(model[4].running_var, expected[4][1], rtol=1e-10, atol=1e-12)

    plain = nn.Linear(3, 1)
    plain_opt = sf_dist.SGDScheduleFree(plain.parameters())
    sf_dist.recalibrate_bn(plain, iter(()), plain_opt)  # nothing to recalibrate: no error, no change
    with pytest.raises(ValueError, match="no batches"):
        sf_dist.recalibrate_bn(model, [], opt)
