"""Faults in real torchrun jobs: a rank SIGKILLed mid-training or mid-save, restarted by the
elastic agent, resumes from the last complete checkpoint and ends bitwise where an
uninterrupted run ends."""

import os
import subprocess
import sys

import pytest
import torch

import sf_dist

JOB = os.path.join(os.path.dirname(__file__), "elastic_job.py")


def _torchrun(backend, out, kill=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SF_DIST_TEST_KILL", None)
    if kill:
        env["SF_DIST_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", JOB, "--backend", backend, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return torch.load(os.path.join(out, "x.pt"))


def _assert_bitwise(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", ["fsdp2", "zero"])
def test_killed_rank_resumes_exactly(backend, tmp_path):
    clean = _torchrun(backend, tmp_path / "clean")
    assert clean["resumed_from"] == 0
    killed = _torchrun(backend, tmp_path / "killed", kill="step:7:1")
    assert killed["resumed_from"] == 6  # checkpoints every 3 steps
    _assert_bitwise(clean["x"], killed["x"])
    if backend == "fsdp2":
        mid_save = _torchrun(backend, tmp_path / "mid_save", kill="save:6:1")
        assert mid_save["resumed_from"] == 3  # the half-written step_00006 was never taken
        _assert_bitwise(clean["x"], mid_save["x"])


def test_latest_skips_incomplete_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = sf_dist.AdamWScheduleFree(model.parameters())
    opt.train()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert sf_dist.checkpoint.latest(tmp_path) is None
    for step in (1, 2, 3):
        sf_dist.checkpoint.save(tmp_path / f"step_{step}", model, opt, extra={"step": step})
    (tmp_path / "step_4.tmp").mkdir()  # a save killed before it was published
    shard = next(f for f in os.listdir(tmp_path / "step_3") if f.endswith(".distcp"))
    with open(tmp_path / "step_3" / shard, "r+b") as f:  # a truncated copy
        f.truncate(10)
    os.remove(tmp_path / "step_2" / ".metadata")
    assert sf_dist.checkpoint.latest(tmp_path) == str(tmp_path / "step_1")
    assert sf_dist.checkpoint.load(sf_dist.checkpoint.latest(tmp_path), model, opt) == {"step": 1}


def _trained(cls, **hp):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters(), **hp)
    opt.train()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_other_optimizer_class_is_refused_by_name(tmp_path):
    model, opt = _trained(sf_dist.AdamWScheduleFree)
    sf_dist.checkpoint.save(tmp_path / "ckpt", model, opt)
    other_model, other = _trained(sf_dist.RAdamScheduleFree)  # same state keys as AdamW
    before = [p.detach().clone() for p in other_model.parameters()]
    with pytest.raises(RuntimeError, match="saved by AdamWScheduleFree, this optimizer is RAdamScheduleFree"):
        sf_dist.checkpoint.load(tmp_path / "ckpt", other_model, other)
    assert all(torch.equal(a, b) for a, b in zip(before, other_model.parameters()))


def test_changed_hyperparameters_are_kept_and_logged(tmp_path, caplog):
    model, opt = _trained(sf_dist.AdamWScheduleFree, lr=0.01, weight_decay=0.0)
    sf_dist.checkpoint.save(tmp_path / "ckpt", model, opt)
    model2, opt2 = _trained(sf_dist.AdamWScheduleFree, lr=0.005, weight_decay=0.1)
    with caplog.at_level("WARNING", logger="sf_dist.checkpoint"):
        sf_dist.checkpoint.load(tmp_path / "ckpt", model2, opt2)
    group = opt2.param_groups[0]
    assert group["lr"] == 0.005 and group["weight_decay"] == 0.1
    assert group["k"] == 1 and group["weight_sum"] == opt.param_groups[0]["weight_sum"]
    assert "param_groups[0]['lr'] was 0.01, continuing with 0.005" in caplog.text
    assert "param_groups[0]['weight_decay'] was 0.0, continuing with 0.1" in caplog.text
