"""The eval-weights API on a plain module in one process, against schedulefree 1.4.1."""

import pytest
import schedulefree
import torch
from safetensors.torch import load_file
from torch import nn

from sf_dist import AdamWScheduleFree, SGDScheduleFree, checkpoint
from sf_dist.weights import eval_state_dict, eval_weights, register_eval_state_dict_hook, save_eval_weights

RTOL, ATOL = 1e-5, 1e-6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.Tanh(), nn.Linear(17, 3)).double()


def train(model, opt, steps=6):
    torch.manual_seed(1)
    opt.train()
    model.train()
    for _ in range(steps):
        x, t = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()


def pair(kind):
    """(sf_dist model+opt, reference model+opt), both trained the same way, both in train mode."""
    ours, ref = make_model(), make_model()
    if kind == "adamw":
        opt = AdamWScheduleFree(ours.parameters(), lr=0.02, weight_decay=0.01, warmup_steps=2)
        ref_opt = schedulefree.AdamWScheduleFree(ref.parameters(), lr=0.02, weight_decay=0.01, warmup_steps=2)
    else:
        opt = SGDScheduleFree(ours.parameters(), lr=0.3, weight_decay=0.01)
        ref_opt = schedulefree.SGDScheduleFree(ref.parameters(), lr=0.3, weight_decay=0.01)
    train(ours, opt)
    train(ref, ref_opt)
    ref_opt.eval()
    return ours, opt, {k: v.clone() for k, v in ref.state_dict().items()}


def y_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_close_sd(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


def assert_bitwise(model, y):
    for k, v in model.state_dict().items():
        assert torch.equal(v, y[k]), k


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_exports_give_x_and_leave_y_bitwise(kind, tmp_path):
    model, opt, x_ref = pair(kind)
    y = y_of(model)
    versions = [p._version for p in model.parameters()]

    full = eval_state_dict(model, opt)
    assert_close_sd(full, x_ref)
    assert all(v.device.type == "cpu" for v in full.values())
    assert_bitwise(model, y)
    assert_close_sd(eval_state_dict(model, opt, full=False, cpu_offload=False), x_ref)
    assert_bitwise(model, y)

    save_eval_weights(model, opt, tmp_path / "x.safetensors")
    assert [p._version for p in model.parameters()] == versions  # x derived, params never written
    fresh = make_model()
    fresh.load_state_dict(load_file(tmp_path / "x.safetensors"), strict=True)
    assert_close_sd(fresh.state_dict(), x_ref)
    assert_bitwise(model, y)

    with eval_weights(model, opt) as m:
        assert m is model and not opt.train_mode
        assert_close_sd(y_of(model), x_ref)
    assert opt.train_mode
    assert_bitwise(model, y)

    handle = register_eval_state_dict_hook(model, opt)
    assert_close_sd(model.state_dict(), x_ref)
    for name, p in model.named_parameters():  # the live params still hold y
        assert torch.equal(p, y[name]), name
    handle.remove()
    assert_bitwise(model, y)
    assert opt.train_mode


def test_eval_mode_exports_the_params_and_stays_in_eval(tmp_path):
    model, opt, x_ref = pair("adamw")
    opt.eval()
    x = y_of(model)
    assert_close_sd(eval_state_dict(model, opt), x_ref)
    with eval_weights(model, opt):
        pass
    assert not opt.train_mode
    assert_bitwise(model, x)


def test_hook_state_dict_is_a_copy_that_does_not_follow_training():
    model, opt, x_ref = pair("adamw")
    handle = register_eval_state_dict_hook(model, opt)
    with pytest.raises(RuntimeError, match="already"):
        register_eval_state_dict_hook(model, opt)
    sd = model.state_dict()
    train(model, opt, steps=1)
    for name, _ in model.named_parameters():  # x copies; buffers alias as in plain torch
        torch.testing.assert_close(sd[name], x_ref[name], rtol=RTOL, atol=ATOL)
    handle.remove()


def test_stream_writer_handles_dtypes_and_empty_tensors(tmp_path):
    model = nn.Module()
    model.a = nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))
    model.b = nn.Parameter(torch.empty(0, 5))
    model.register_buffer("c", torch.arange(7))
    model.register_buffer("d", torch.tensor([True, False]))
    opt = AdamWScheduleFree(model.parameters())
    save_eval_weights(model, opt, tmp_path / "w.safetensors")
    got = load_file(tmp_path / "w.safetensors")
    for k, v in model.state_dict().items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# ---- replicated modules across ranks: DDP and ZeroScheduleFree -----------------------------------
def replicated_worker(rank, world_size, outdir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from sf_dist import ZeroScheduleFree
    results = {}
    for name in ("ddp", "zero"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).double()
        if name == "ddp":
            model = DDP(model)
            opt = AdamWScheduleFree(model.parameters(), lr=0.02, warmup_steps=2)
        else:
            opt = ZeroScheduleFree(model.parameters(), stage=2, lr=0.02, warmup_steps=2)
        torch.manual_seed(1 + rank)
        opt.train()
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 6, dtype=torch.float64)),
                                   torch.randn(8, 3, dtype=torch.float64)).backward()
            opt.step()
        y = [p.detach().clone() for p in model.parameters()]
        with eval_weights(model, opt):
            x = {k.removeprefix("module."): v.clone() for k, v in model.state_dict().items()}
        full = eval_state_dict(model, opt)
        path = f"{outdir}/{name}.safetensors"
        save_eval_weights(model, opt, path)
        handle = register_eval_state_dict_hook(model, opt)
        hooked = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
        handle.remove()
        assert opt.train_mode and all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
        for k in x:
            assert torch.equal(hooked[k], x[k]), k
        if rank == 0:
            assert set(full) == set(x)  # plain names: no "module." prefix
            for k in x:
                assert torch.equal(full[k], x[k]) and torch.equal(load_file(path)[k], x[k]), k
        else:
            assert full == {}
        results[name] = x
    # a bad path on rank 0 raises on every rank instead of leaving the others in a collective
    with pytest.raises((FileNotFoundError, RuntimeError), match="missing|rank 0 could not open"):
        save_eval_weights(model, opt, f"{outdir}/missing/x.safetensors")
    with pytest.raises((OSError, RuntimeError), match="Not a directory|rank 0 could not create"):
        checkpoint.save(f"{outdir}/{name}.safetensors/ckpt", model, opt)
    return results


def test_ddp_and_zero_exports_are_x_with_plain_names(tmp_path):
    from dist import run_distributed
    r0, r1 = run_distributed(replicated_worker, 2, str(tmp_path))
    for name in ("ddp", "zero"):
        for k in r0[name]:
            assert torch.equal(r0[name][k], r1[name][k])  # replicas agree
