"""Every sf_dist helper takes the optimizer a framework hands out: Accelerate's AcceleratedOptimizer and
Lightning's LightningOptimizer (real classes, one process). DeepSpeed's wrappers: tests/test_integrations_hf.py.

Oracle: x = (y - (1-b1) z) / b1 computed here from the inner optimizer's own y and z, float64.
"""

import copy

import pytest
import torch
from torch import nn

import sf_dist
from sf_dist.frameworks import unwrap_optimizer

accelerate = pytest.importorskip("accelerate")
lightning = pytest.importorskip("lightning")

RTOL, ATOL, B1 = 1e-5, 1e-6, 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()


def _data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _wrapped(kind: str, model: nn.Module):
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.05, warmup_steps=1)
    if kind == "accelerate":
        accelerate.Accelerator(cpu=True)  # AcceleratedOptimizer needs the state it sets up
        return accelerate.optimizer.AcceleratedOptimizer(opt, device_placement=False), opt
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return LightningOptimizer(opt), opt


def _train(model, wrapped, steps=3):
    """Steps through the wrapper; LightningOptimizer steps only inside a Lightning strategy, so its inner one."""
    stepper = wrapped.optimizer if type(wrapped).__name__.startswith("Lightning") else wrapped
    wrapped.train()
    for step in range(steps):
        x, t = _data(step)
        stepper.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        stepper.step()


def _x(model, opt) -> dict:
    """x by hand for params; buffers as they are."""
    params = {id(p): (p, opt.state[p]["z"]) for p in model.parameters()}
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in params:
            y, z = params[id(value)]
            out[name] = (y.detach() - (1 - B1) * z) / B1
        else:
            out[name] = value.detach().clone()
    return out


def _close(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["accelerate", "lightning"])
def test_every_helper_takes_the_framework_optimizer(kind, tmp_path):
    model = _model()
    wrapped, opt = _wrapped(kind, model)
    assert unwrap_optimizer(wrapped) is opt
    _train(model, wrapped)
    x, y = _x(model, opt), {k: v.clone() for k, v in model.state_dict().items()}
    assert max((x[k] - y[k]).abs().max() for k in x) > 1e-3

    _close(sf_dist.eval_state_dict(model, wrapped), x)
    with sf_dist.eval_weights(model, wrapped):
        _close(model.state_dict(), x)
    _close(model.state_dict(), y)
    sf_dist.save_eval_weights(model, wrapped, tmp_path / "x.safetensors")
    from safetensors.torch import load_file

    _close(load_file(tmp_path / "x.safetensors"), x)
    handle = sf_dist.register_eval_state_dict_hook(model, wrapped)
    _close(model.state_dict(), x)
    handle.remove()

    # checkpoint.save / load through the wrapper, then both runs take the same two steps
    sf_dist.checkpoint.save(tmp_path / "ckpt", model, wrapped)
    other = _model()
    other_wrapped, other_opt = _wrapped(kind, other)
    sf_dist.checkpoint.load(tmp_path / "ckpt", other, other_wrapped)
    _close(other.state_dict(), y)
    _train(model, wrapped, 2)
    _train(other, other_wrapped, 2)
    _close(other.state_dict(), model.state_dict())

    # recalibrate_bn at x through the wrapper equals the same call on the bare optimizer of a copy
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = sf_dist.AdamWScheduleFree(twin.parameters(), lr=0.05, warmup_steps=1)
    twin_opt.load_state_dict(opt.state_dict())
    batches = [_data(10)[0], _data(11)[0]]
    sf_dist.recalibrate_bn(model, batches, wrapped)
    sf_dist.recalibrate_bn(twin, batches, twin_opt)
    _close(model.state_dict(), twin.state_dict())
    assert opt.train_mode and model[1].momentum == 0.1
