"""A bare opt.eval() / opt.train() under FSDP2 and FSDP1 once sf_dist.bind(model, opt) was called.

Frameworks (HF Trainer, Accelerate, Lightning) call exactly that pair around evaluation. The model keeps
weights in the root unit and ties the head to the input layer, so FSDP holds gathered root weights after a
no-grad forward. Oracle: schedulefree 1.4.1, one process, float64, the full batch.
"""

import pytest
import schedulefree
import torch
from torch import nn

from dist import run_distributed

import sf_dist

RTOL, ATOL = 1e-5, 1e-6
WORLD, STEPS, EVAL_AT, BATCH = 2, 6, 3, 24
HP = dict(lr=0.02, weight_decay=0.01, warmup_steps=2)


class Mid(nn.Module):
    """The only child unit: everything else stays in the root."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(h))


class Tied(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.head = nn.Linear(8, 8), Mid(), nn.Linear(8, 8)
        self.head.weight = self.inp.weight  # tied, in the root unit
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.bn(torch.tanh(self.inp(x)))))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(BATCH, 8, generator=g, dtype=torch.float64), torch.randn(BATCH, 8, generator=g, dtype=torch.float64)


X_TEST = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 8)


def _train_step(model, opt, step: int, rank: int, world: int, whole: bool = False) -> None:
    x, t = _data(step)
    rows = slice(None) if whole else slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    opt.zero_grad()
    nn.functional.mse_loss(model(x[rows]), t[rows]).backward()
    opt.step()


def _reference(bn: bool = False) -> dict:
    model = Tied(bn).double()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), **HP)
    out = {}
    opt.train()
    for step in range(STEPS):
        if step == EVAL_AT:
            with torch.no_grad():
                out["y_out"] = model.eval()(X_TEST)
                opt.eval()
                out["x_out"] = model(X_TEST)
                opt.train()
                model.train()
        _train_step(model, opt, step, 0, 1, whole=True)
    out["y"] = {k: v.clone() for k, v in model.state_dict().items()}
    if bn:  # recalibrate at x on the last batch, as sf_dist.recalibrate_bn does
        opt.eval()
        model.bn.reset_running_stats()
        model.bn.momentum = None
        with torch.no_grad():
            model.train()(_data(STEPS - 1)[0])
        out["running"] = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    return out


def _shard(model: nn.Module, kind: str, world: int) -> nn.Module:
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.mid, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Mid}))


def _full_state(model: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}  # buffers come back live


def _run(rank: int, world: int, kind: str, bound: bool, bn: bool = False, whole: bool = False) -> dict:
    model = _shard(Tied(bn).double(), kind, world)
    opt = sf_dist.AdamWScheduleFree(model.parameters(), **HP)
    if bound:
        assert sf_dist.bind(model, opt) is opt and sf_dist.bind(model, opt) is opt  # idempotent
    out = {}
    opt.train()
    for step in range(STEPS):
        if step == EVAL_AT:
            with torch.no_grad():
                out["y_out"] = model.eval()(X_TEST)  # leaves the root's gathered weights (at y) in place
                opt.eval()                             # bare calls, as frameworks make them
                out["x_out"] = model(X_TEST)
                opt.train()
                out["y_again"] = model(X_TEST)        # the next forward: at y again?
                model.train()
        _train_step(model, opt, step, rank, world, whole)
    out["y"] = _full_state(model)
    if bn:
        with torch.no_grad():
            model(X_TEST)  # gathered at y before the call
        sf_dist.recalibrate_bn(model, [_data(STEPS - 1)[0]], opt)
        out["running"] = (model.bn.running_mean.clone(), model.bn.running_var.clone())
        out["mode_after"] = opt.train_mode
    return out


def _worker(rank: int, world: int) -> dict:
    results = {}
    for kind in ("fsdp2", "fsdp1"):
        results[kind] = _run(rank, world, kind, bound=True)
        results[kind + "-unbound"] = _run(rank, world, kind, bound=False)
        # BatchNorm in the root, every rank on the whole batch (then its statistics equal one process's)
        results[kind + "-bn"] = _run(rank, world, kind, bound=True, bn=True, whole=True)
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=240)[0]


def _close(got, want, what):
    if isinstance(want, dict):
        assert set(got) == set(want), what
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what}: {k}: {m}")
    else:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_bare_eval_and_train_reach_root_and_tied_weights(runs, kind):
    ref, got = _reference(), runs[kind]
    _close(got["y_out"], ref["y_out"], "forward at y")
    _close(got["x_out"], ref["x_out"], "forward after a bare eval(): at x")
    _close(got["y_again"], ref["y_out"], "forward after a bare train(): at y")
    _close(got["y"], ref["y"], "training after the evaluation stays on the reference trajectory")
    assert (ref["x_out"] - ref["y_out"]).abs().max() > 1e-3  # x and y are told apart


def test_without_bind_fsdp2_keeps_the_stale_root_copy(runs):
    """Why bind exists: unbound, FSDP2's root keeps its gathered weights through the swap."""
    got, ref = runs["fsdp2-unbound"], _reference()
    assert (got["x_out"] - ref["x_out"]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_recalibrate_bn_at_x_under_fsdp(runs, kind):
    ref, got = _reference(bn=True), runs[kind + "-bn"]
    _close(got["y"], ref["y"], "trajectory with BatchNorm")
    _close(got["running"][0], ref["running"][0], "running_mean at x")
    _close(got["running"][1], ref["running"][1], "running_var at x")
    assert got["mode_after"] is True
