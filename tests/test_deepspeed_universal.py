"""DeepSpeed world-size change: train at W=2, save, ``python -m sf_dist.ds_to_universal``, resume at W=1 and W=3.

Every case has two param groups with different weight decay (and so different per-group state).
Right after the universal load, the fp32 masters, z, the second moment and every group's scalars and
hyperparameters equal those at the save exactly; after training on they match the uninterrupted W=2
run (tolerance below) and the float64 reference. One spawn per world size runs every case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")

from dist import run_distributed  # noqa: E402
from test_deepspeed import PARAMS, REFERENCE, STAGE3, Net, _groups  # noqa: E402

import sf_dist  # noqa: E402
from sf_dist import deepspeed as sfds  # noqa: E402

GLOBAL_BATCH, SAVE_AT, STEPS = 12, 3, 6  # 12 rows split evenly at W = 1, 2, 3
CASES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero3-bf16": (3, True)}
# At W=1 and W=3 the gradients are summed over other splits of the batch, so the fp32 sums round
# differently; measured here, fp32 x and y stayed within 6e-8 absolute (3.8e-6 relative) of the W=2
# run, inside the project's rtol 1e-5 / atol 1e-6. In bf16 the forward and backward run in bf16
# (8-bit mantissa: 3.9e-3 per rounding) on other micro-batches: measured 6.6e-4 absolute, so bf16
# is held to bf16 rounding at W=1/3. At W=2 every case resumes bitwise (the same sums).
RESUME_TOL = {False: (1e-5, 1e-6), True: (2e-2, 2e-3)}  # bf16 -> (rtol, atol)


def _config(stage: int, bf16: bool, world: int, universal: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "steps_per_print": 10**9,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage, **(STAGE3 if stage == 3 else {})},
           "optimizer": {"type": "AdamWScheduleFree", "params": PARAMS["AdamWScheduleFree"]}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def _train(engine, rank: int, world: int, steps: range) -> None:
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in steps:
        x, y = _batch(step)
        engine.backward(F.mse_loss(engine(x[rows].to(engine.module.fc1.weight.dtype)).float(), y[rows]))
        engine.step()


def _state(engine, opt) -> dict:
    """Full fp32 masters, z and second moment (rank 0), and every param group without its params."""
    from deepspeed.utils import safe_get_full_optimizer_state

    rec = {"masters": sfds.engine_state_dict(engine), "groups": [
        {k: v for k, v in g.items() if k != "params"} for g in opt.optimizer.param_groups]}
    for key in ("z", "exp_avg_sq"):
        rec[key] = {n: safe_get_full_optimizer_state(p, key).reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                    for n, p in engine.module.named_parameters()}
    return rec


def _end(engine, opt, path: str) -> dict:
    """y, and x both from eval_state_dict (eval(), masters swapped) and from the streamed
    save_eval_weights (x derived per tensor), in train mode; y again after both."""
    y = sfds.engine_state_dict(engine)
    x = sf_dist.eval_state_dict(engine, opt)
    sf_dist.save_eval_weights(engine, opt, path)
    return {"y": y, "x": x, "y_after": sfds.engine_state_dict(engine), "mode_after": opt.train_mode}


def _engine(stage: int, bf16: bool, world: int, universal: bool):
    model = Net()
    engine, opt, _, _ = sfds.initialize(model=model, config=_config(stage, bf16, world, universal),
                                        model_parameters=_groups(model))
    return engine, opt


def _save_worker(rank: int, world: int, root: str) -> dict:
    """W=2: train, save at SAVE_AT (train mode), go on to STEPS uninterrupted; rank 0 converts
    every checkpoint with the command line (and tries DeepSpeed's); then resume at W=2 too."""
    import torch.distributed as dist

    out = {}
    for case, (stage, bf16) in CASES.items():
        engine, opt = _engine(stage, bf16, world, universal=False)
        opt.train()
        _train(engine, rank, world, range(SAVE_AT))
        rec = out[case] = {"saved": _state(engine, opt)}
        engine.save_checkpoint(os.path.join(root, case), tag="step3")
        _train(engine, rank, world, range(SAVE_AT, STEPS))
        rec["end"] = _end(engine, opt, os.path.join(root, f"{case}-x.safetensors"))
    if rank == 0:
        out["cli"] = _convert_all(root)
    dist.barrier()
    out["resumed"] = _resume_worker(rank, world, root)
    return out


def _convert_all(root: str) -> dict:
    """sf_dist's converter on every case (in this process: the command line as written has its own
    test below), while DeepSpeed's converter runs on one in a subprocess."""
    from sf_dist.ds_to_universal import main

    theirs = _cli("deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(root, "zero2", "step3"),
                  "--output_folder", os.path.join(root, "deepspeed_converter_out"), "--inject_missing_state")
    out = {}
    for case in CASES:
        try:
            main(["--input_folder", os.path.join(root, case, "step3"),
                  "--output_folder", os.path.join(root, case, "step3_universal")])
            out[case] = (0, "", "")
        except BaseException:  # noqa: BLE001 - the fixture reports it with the case's name
            out[case] = (1, "", traceback.format_exc())
    out["deepspeed"] = (theirs.wait(timeout=240), *theirs.communicate())
    return out


def _resume_worker(rank: int, world: int, root: str) -> dict:
    """W=1 or W=3: DeepSpeed's own load_universal, then train on to STEPS."""
    out = {}
    for case, (stage, bf16) in CASES.items():
        engine, opt = _engine(stage, bf16, world, universal=True)
        engine.load_checkpoint(os.path.join(root, case))  # reads latest_universal
        rec = out[case] = {"loaded": _state(engine, opt), "mode": opt.train_mode}
        opt.train()
        _train(engine, rank, world, range(SAVE_AT, STEPS))
        rec["end"] = _end(engine, opt, os.path.join(root, f"{case}-x-resumed{world}.safetensors"))
    return out


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_universal")
    saved = run_distributed(_save_worker, 2, str(root), timeout=400)
    cli = saved[0]["cli"]
    for case in CASES:
        code, stdout, stderr = cli[case]
        assert code == 0, f"{case}: {stdout[-2000:]}{stderr[-3000:]}"
    resumed = {world: run_distributed(_resume_worker, world, str(root), timeout=300) for world in (1, 3)}
    resumed[2] = [rank["resumed"] for rank in saved]
    return {"saved": saved, "resumed": resumed, "deepspeed_converter": cli["deepspeed"], "root": root}


def _equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def _close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _reference() -> dict:
    """schedulefree 1.4.1 in float64 on the full batch, the same two groups."""
    model = Net().double()
    params = {k: tuple(v) if k == "betas" else v for k, v in PARAMS["AdamWScheduleFree"].items()}
    opt = REFERENCE["AdamWScheduleFree"](_groups(model), **params)
    opt.train()
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        F.mse_loss(model(x.double()), y.double()).backward()
        opt.step()
    opt.eval()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_universal_load_restores_the_saved_state_exactly(runs, case, world):
    saved, loaded = runs["saved"][0][case]["saved"], runs["resumed"][world][0][case]["loaded"]
    assert runs["resumed"][world][0][case]["mode"] is True  # saved in train mode
    assert loaded["groups"] == saved["groups"]  # k, weight_sum, lr_max, train_mode, lr, weight_decay... per group
    assert [g["weight_decay"] for g in loaded["groups"]] == [0.01, 0.0]
    assert [g["k"] for g in loaded["groups"]] == [SAVE_AT, SAVE_AT]
    for rank in runs["resumed"][world]:
        assert rank[case]["loaded"]["groups"] == saved["groups"]
    _equal(loaded["masters"], saved["masters"])
    _equal(loaded["z"], saved["z"])
    _equal(loaded["exp_avg_sq"], saved["exp_avg_sq"])


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_the_uninterrupted_one(runs, case, world):
    uninterrupted, resumed = runs["saved"][0][case]["end"], runs["resumed"][world][0][case]["end"]
    rtol, atol = (0.0, 0.0) if world == 2 else RESUME_TOL[CASES[case][1]]  # same W: the same sums, bitwise
    gaps = [((resumed[w][n].double() - uninterrupted[w][n].double()).abs().max().item(),
             ((resumed[w][n].double() - uninterrupted[w][n].double()).abs()
              / uninterrupted[w][n].double().abs().clamp_min(1e-3)).max().item())
            for w in ("y", "x") for n in uninterrupted[w]]
    print(f"{case} W=2 -> W={world}: max abs gap {max(g[0] for g in gaps):.2e}, max rel gap {max(g[1] for g in gaps):.2e}")
    _close(resumed["y"], uninterrupted["y"], rtol, atol)
    _close(resumed["x"], uninterrupted["x"], rtol, atol)
    if not CASES[case][1]:  # fp32: also the float64 reference (DeepSpeed's fp32 masters: rtol 1e-4 as elsewhere)
        _close(resumed["x"], _reference(), 1e-4, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_save_eval_weights_equals_eval_state_dict(runs, case):
    from safetensors.torch import load_file

    end = runs["saved"][0][case]["end"]
    _equal(load_file(str(runs["root"] / f"{case}-x.safetensors")), end["x"])  # bitwise, buffers included
    _equal(end["y_after"], end["y"])  # nothing swapped: y untouched
    assert end["mode_after"] is True
    assert not torch.equal(end["x"]["fc1.weight"], end["y"]["fc1.weight"])


def test_deepspeeds_own_converter_still_fails_on_schedule_free_state(runs):
    code, stdout, stderr = runs["deepspeed_converter"]
    assert code != 0 and "KeyError: 'exp_avg'" in stderr, stdout[-2000:] + stderr[-2000:]


def test_converter_refuses_what_it_cannot_convert(runs, tmp_path):
    from sf_dist.ds_to_universal import convert

    root = runs["root"]
    with pytest.raises(FileNotFoundError, match="tag directory"):
        convert(str(root / "zero2"), str(tmp_path / "out"))  # the parent, not the tag directory
    with pytest.raises(FileExistsError, match="not empty"):
        convert(str(root / "zero2" / "step3"), str(root / "zero2" / "step3_universal"))
    with pytest.raises(ValueError, match="is the input folder"):
        convert(str(root / "zero2" / "step3"), str(root / "zero2" / "step3"))


def _doc_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of docs/deepspeed.md's section on changing the number of ranks."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "deepspeed.md").read_text()
    section = text.split("## Changing the number of ranks", 1)[1].split("\n## ", 1)[0]
    return [part.split("```", 1)[0] for part in section.split(f"```{language}\n")[1:]]


def test_the_guides_commands_convert_a_checkpoint_as_written(runs, tmp_path):
    root = runs["root"]
    shutil.copytree(root / "zero2", tmp_path / "ckpt", ignore=shutil.ignore_patterns("*_universal"))
    (command,) = _doc_blocks("bash")
    run = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest_universal").read_text() == "step3_universal"
    for key in ("fp32", "z", "exp_avg_sq"):  # the same files as the test's own conversion
        ours = torch.load(tmp_path / "ckpt" / "step3_universal" / "zero" / "fc2.bias" / f"{key}.pt", weights_only=True)
        theirs = torch.load(root / "zero2" / "step3_universal" / "zero" / "fc2.bias" / f"{key}.pt", weights_only=True)
        assert torch.equal(ours["param"], theirs["param"])
    (snippet,) = _doc_blocks("json")
    assert json.loads("{" + snippet + "}") == {"checkpoint": _config(2, False, 3, universal=True)["checkpoint"]}
