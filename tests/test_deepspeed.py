"""DeepSpeed: Schedule-Free from ds_config at ZeRO-0..3, eval weights that reach the model, checkpoints, export.

Oracle: schedulefree 1.4.1 in float64 on the full batch, one process. DeepSpeed keeps fp32
masters, hence rtol 1e-4 / atol 1e-6. Each spawn (W=2, gloo) groups many engines.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

pytest.importorskip("deepspeed")
schedulefree = pytest.importorskip("schedulefree")

import sf_dist  # noqa: E402
from sf_dist import deepspeed as sfds  # noqa: E402
from sf_dist.backends.deepspeed import weights as ds_weights  # noqa: E402
from sf_dist.export import eval_state_dict_from_checkpoint, main as export_main  # noqa: E402
from dist import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORLD, MICRO, STEPS, SAVE_AT = 2, 4, 8, 4
RTOL, ATOL = 1e-4, 1e-6
PARAMS = {
    "AdamWScheduleFree": {"lr": 0.05, "betas": [0.9, 0.999], "warmup_steps": 3, "weight_decay": 0.01},
    "SGDScheduleFree": {"lr": 0.2, "momentum": 0.9, "warmup_steps": 2, "weight_decay": 0.01},
    "RAdamScheduleFree": {"lr": 0.05, "betas": [0.9, 0.999], "weight_decay": 0.01},
}
REFERENCE = {"AdamWScheduleFree": schedulefree.AdamWScheduleFree, "SGDScheduleFree": schedulefree.SGDScheduleFree,
             "RAdamScheduleFree": schedulefree.RAdamScheduleFree}
# ZeRO-3: weights partitioned, biases persistent (gathered all the time), and two param groups
# split into three sub-groups, so the base optimizer is stepped several times per engine step.
STAGE3 = {"stage3_param_persistence_threshold": 10, "sub_group_size": 20}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale.to(x.dtype)


def _groups(model: nn.Module) -> list[dict]:
    """Two param groups: decay on the weights, none on the biases."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * MICRO, 6, generator=g), torch.randn(WORLD * MICRO, 3, generator=g)


X_TEST = torch.linspace(-1, 1, 18).reshape(3, 6)


def _config(stage: int, opt: str = "AdamWScheduleFree", bf16: bool = False, **extra) -> dict:
    zero = {"stage": stage, **(STAGE3 if stage == 3 else {})}
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 10**9, "zero_optimization": zero,
           "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the reference does not clip
           "optimizer": {"type": opt, "params": PARAMS.get(opt, {})}, **extra}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


# ---- the reference, single process, float64, full batch ---------------------------------------

def _reference(opt_name: str, steps: int, frozen: tuple[str, ...] = (), start: dict | None = None) -> dict[str, object]:
    model = Net().double()
    if start is not None:
        model.load_state_dict({k: v.double() for k, v in start.items()})
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    params = {k: tuple(v) if k == "betas" else v for k, v in PARAMS[opt_name].items()}
    opt = REFERENCE[opt_name](_groups(model), **params)
    opt.train()
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        F.mse_loss(model(x.double()), y.double()).backward()
        opt.step()
    y_weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    with torch.no_grad():
        out = model(X_TEST.double())
    counters = [(g["k"], g["weight_sum"], g["lr_max"]) for g in opt.param_groups]
    return {"y": y_weights, "x": {k: v.clone() for k, v in model.state_dict().items()}, "out": out,
            "counters": counters}


def _close(actual: dict, expected: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- workers (run on every rank) -----------------------------------------------------------

def _base(opt):
    return opt if isinstance(opt, sf_dist.ScheduleFreeOptimizer) else opt.optimizer


def _counters(opt) -> list[tuple]:
    return [(g["k"], g["weight_sum"], g["lr_max"]) for g in _base(opt).param_groups]


def _train(engine, rank: int, steps: range) -> list[float]:
    losses = []
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    for step in steps:
        x, y = _batch(step)
        loss = F.mse_loss(engine(x[rows].to(engine.module.fc1.weight.dtype)).float(), y[rows])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _engine(config: dict, **kwargs):
    model = Net()
    engine, opt, _, _ = sfds.initialize(model=model, config=config, model_parameters=_groups(model), **kwargs)
    return engine, opt


def _fp32_worker(rank: int, world: int, ckpt_root: str) -> dict:
    """Every fp32 case in one spawn (each spawn costs seconds); the tests below read its results."""
    results = {stage: _stage_run(rank, stage, ckpt_root) for stage in (0, 1, 2, 3)}
    for case in (_other_optimizers, _offload, _accumulation, _instance_with_frozen, _eval_step, _pass_through,
                 _gather_faults):
        results.update(case(rank, ckpt_root))
    return results


def _stage_run(rank: int, stage: int, ckpt_root: str) -> dict:
    """8 steps with an eval-mode save at 4 and a train-mode save at 8; resume from 4; warm start from x."""
    ckpt = os.path.join(ckpt_root, f"stage{stage}")
    rec = {}
    engine, opt = _engine(_config(stage))
    rec["wrapper"] = type(opt).__name__
    opt.train()
    _train(engine, rank, range(SAVE_AT))
    opt.eval()
    rec["x4"] = sfds.engine_state_dict(engine)
    rec["counters4"] = _counters(opt)
    engine.save_checkpoint(ckpt, tag="eval4")
    # ZeRO-3's weights-only load ignores the tag and reads 'latest' (DeepSpeed 0.19.8): a directory of its own
    engine.save_checkpoint(ckpt + "-x4", tag="eval4")
    opt.train()
    _train(engine, rank, range(SAVE_AT, STEPS))
    rec["y"] = sfds.engine_state_dict(engine)
    engine.save_checkpoint(ckpt, tag="train8")
    # The shared eval API, called in train mode on the engine: x out, y back in the model.
    rec["api_x"] = sf_dist.eval_state_dict(engine, opt)
    sf_dist.save_eval_weights(engine, opt, os.path.join(ckpt_root, f"x{stage}.safetensors"))
    with torch.no_grad(), sf_dist.eval_weights(engine, opt):
        rec["api_out"] = engine(X_TEST)
    rec["api_mode_after"] = opt.train_mode
    rec["api_y_after"] = sfds.engine_state_dict(engine)
    opt.eval()
    rec["x"] = sfds.engine_state_dict(engine)
    rec["mode_after_eval"] = opt.train_mode
    with torch.no_grad():
        rec["out"] = engine(X_TEST)
    rec["counters"] = _counters(opt)
    opt.train()
    rec["y_round_trip"] = sfds.engine_state_dict(engine)
    # A load while in eval mode must not let train() put back the y saved by eval()
    opt.eval()
    engine.load_checkpoint(ckpt, tag="eval4")
    opt.train()
    _train(engine, rank, range(SAVE_AT, STEPS))
    rec["reloaded_in_eval_y"] = sfds.engine_state_dict(engine)
    # The streamed export after a load into a live engine reads z from the loaded state
    rec["reloaded_api_x"] = sf_dist.eval_state_dict(engine, opt)
    sf_dist.save_eval_weights(engine, opt, os.path.join(ckpt_root, f"x{stage}-reloaded.safetensors"))

    engine, opt = _engine(_config(stage))
    engine.load_checkpoint(ckpt, tag="eval4")
    rec["resumed_mode"] = opt.train_mode
    rec["resumed_counters"] = _counters(opt)
    rec["resumed_x4"] = sfds.engine_state_dict(engine)
    with torch.no_grad():
        rec["resumed_out4"] = engine(X_TEST)
    opt.train()
    _train(engine, rank, range(SAVE_AT, STEPS))
    rec["resumed_y"] = sfds.engine_state_dict(engine)

    # Weights-only warm start from x: a fresh optimizer whose z starts at the loaded weights.
    engine, opt = _engine(_config(stage))
    engine.load_checkpoint(ckpt + "-x4", tag="eval4", load_optimizer_states=False, load_lr_scheduler_states=False)
    opt.train()
    _train(engine, rank, range(2))
    rec["warm_y"], rec["warm_counters"] = sfds.engine_state_dict(engine), _counters(opt)
    return rec


def _other_optimizers(rank: int, ckpt_root: str) -> dict:
    """SGD and RAdam, their type names spelled in other cases."""
    results = {}
    for stage, name, spelled in ((2, "SGDScheduleFree", "sgdschedulefree"), (3, "RAdamScheduleFree", "RADAMSCHEDULEFREE")):
        cfg = _config(stage)
        cfg["optimizer"] = {"type": spelled, "params": PARAMS[name]}
        engine, opt = _engine(cfg)
        opt.train()
        _train(engine, rank, range(STEPS))
        rec = results[name] = {"y": sfds.engine_state_dict(engine), "base": type(_base(opt)).__name__}
        opt.eval()
        rec["x"] = sfds.engine_state_dict(engine)
    return results


def _offload(rank: int, ckpt_root: str) -> dict:
    """fp32 masters and z offloaded to CPU memory (ZeRO-Offload)."""
    results = {}
    for stage in (2, 3):
        cfg = _config(stage)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        engine, opt = _engine(cfg)
        opt.train()
        _train(engine, rank, range(STEPS))
        rec = results[f"offload{stage}"] = {"y": sfds.engine_state_dict(engine)}
        opt.eval()
        rec["x"] = sfds.engine_state_dict(engine)
        with torch.no_grad():
            rec["out"] = engine(X_TEST)
    return results


def _accumulation(rank: int, ckpt_root: str) -> dict:
    """Gradient accumulation over 2 micro-batches, at ZeRO-2 and at ZeRO-3 with param offload."""
    results = {}
    for case, stage, zero in (("accumulate2", 2, {}), ("accumulate3-param-offload", 3, {"offload_param": {"device": "cpu"}})):
        cfg = _config(stage, train_micro_batch_size_per_gpu=MICRO // 2, gradient_accumulation_steps=2)
        cfg["zero_optimization"].update(zero)
        engine, opt = _engine(cfg)
        opt.train()
        for step in range(STEPS):  # two micro-batches of 2 rows per rank: still the full batch of 8
            x, y = _batch(step)
            for micro in range(2):
                rows = slice(rank * MICRO + micro * 2, rank * MICRO + micro * 2 + 2)
                engine.backward(F.mse_loss(engine(x[rows]), y[rows]))
                engine.step()
        rec = results[case] = {"y": sfds.engine_state_dict(engine), "counters": _counters(opt)}
        opt.eval()
        rec["x"] = sfds.engine_state_dict(engine)
        with torch.no_grad():
            rec["out"] = engine(X_TEST)
    return results


def _instance_with_frozen(rank: int, ckpt_root: str) -> dict:
    """optimizer= an instance we built, and a frozen param."""
    results = {}
    for stage in (2, 3):
        model = Net()
        model.fc2.bias.requires_grad_(False)
        params = {k: tuple(v) if k == "betas" else v for k, v in PARAMS["AdamWScheduleFree"].items()}
        cfg = {k: v for k, v in _config(stage).items() if k != "optimizer"}
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in _groups(model)]
        engine, opt, _, _ = sfds.initialize(model=model, config=cfg,
                                            optimizer=sf_dist.AdamWScheduleFree(groups, **params))
        opt.train()
        _train(engine, rank, range(STEPS))
        rec = results[f"frozen{stage}"] = {"y": sfds.engine_state_dict(engine)}
        engine.save_checkpoint(os.path.join(ckpt_root, f"frozen{stage}"))
        opt.eval()
        rec["x"] = sfds.engine_state_dict(engine)
    return results


def _eval_step(rank: int, ckpt_root: str) -> dict:
    """A step in eval mode is refused and changes nothing."""
    engine, opt = _engine(_config(2))
    opt.train()
    _train(engine, rank, range(1))
    opt.eval()
    x, y = _batch(1)
    engine.backward(F.mse_loss(engine(x[rank * MICRO:(rank + 1) * MICRO]), y[rank * MICRO:(rank + 1) * MICRO]))
    try:
        engine.step()
    except RuntimeError as err:
        return {"eval_step": {"error": str(err), "groups": len(opt.param_groups), "counters": _counters(opt)}}
    return {"eval_step": {"error": None}}


def _pass_through(rank: int, ckpt_root: str) -> dict:
    """A built-in optimizer goes to DeepSpeed untouched; a scheduler is allowed when asked for."""
    results = {}
    builtin = _config(1)
    builtin["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    engine, opt = _engine(builtin)
    results["builtin"] = {"base": type(opt.optimizer).__name__, "has_train_mode": hasattr(opt, "train_mode")}
    sched = _config(1, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}})
    engine, opt = _engine(sched, allow_scheduler=True)
    results["scheduler"] = type(engine.lr_scheduler).__name__
    return results


def _gather_faults(rank: int, ckpt_root: str) -> dict:
    """An OOM on one rank while it prepares its part of x for save_eval_weights' gather (ZeRO-1/2's
    fragment, ZeRO-3's partition) raises on both ranks, the next collective still pairs, and the
    engine is left in train mode at y."""
    import time

    results = {}
    for stage in (1, 3):
        engine, opt = _engine(_config(stage))
        opt.train()
        _train(engine, rank, range(2))
        y = sfds.engine_state_dict(engine)
        name = "_partition_x" if stage == 3 else "_fragment_x"
        original = getattr(ds_weights._XOf, name)
        for failing in (0, 1):
            calls = []

            def failing_once(*args, **kwargs):
                calls.append(1)
                if rank == failing and len(calls) == 2:  # the second tensor, after a first went through
                    raise MemoryError(f"injected OOM in {name} on rank {failing}")
                return original(*args, **kwargs)

            setattr(ds_weights._XOf, name, failing_once)
            start = time.monotonic()
            try:
                sf_dist.save_eval_weights(engine, opt, os.path.join(ckpt_root, f"fault{stage}.safetensors"))
                outcome = ("no error", "")
            except BaseException as e:  # noqa: BLE001 - the test reads which type came out where
                outcome = (type(e).__name__, str(e))
            finally:
                setattr(ds_weights._XOf, name, original)
            seconds = time.monotonic() - start
            paired = torch.tensor([float(rank + 1)])
            dist.all_reduce(paired)
            after = sfds.engine_state_dict(engine)
            y_kept = all(torch.equal(v, y[k]) for k, v in after.items()) and after.keys() == y.keys()
            results[("fault", stage, failing)] = (*outcome, seconds, paired.item(), opt.train_mode, y_kept)
    return results


def _full_z(engine, p: torch.Tensor) -> torch.Tensor:
    """z of one model param, gathered to full size (collective at ZeRO-1/2/3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    masters = ds_weights._stage0_masters(engine.optimizer)
    if id(p) in masters:
        return _base(engine.optimizer).state[masters[id(p)]]["z"]
    return safe_get_full_optimizer_state(p, "z").reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def _model_weights(engine) -> dict[str, torch.Tensor]:
    """The low-precision weights the forward pass uses, gathered at ZeRO-3."""
    from deepspeed import zero

    params = dict(engine.module.named_parameters())
    with zero.GatheredParameters(list(params.values()), enabled=hasattr(params["fc1.weight"], "ds_id")):
        return {n: p.data.clone() for n, p in params.items()}


def _fp16(stage: int, scale_power: int = 8) -> dict:
    return _config(stage, fp16={"enabled": True, "initial_scale_power": scale_power})


LOW_PRECISION = {  # case: (config, expected DeepSpeed wrapper under our mixin)
    "bf16-0": (_config(0, bf16=True), "FP16_UnfusedOptimizer"),
    "bf16-1": (_config(1, bf16=True), "DeepSpeedZeroOptimizer"),
    "bf16-2": (_config(2, bf16=True), "DeepSpeedZeroOptimizer"),
    "bf16-3": (_config(3, bf16=True), "DeepSpeedZeroOptimizer_Stage3"),
    "bf16-1-fp32-accumulation": (_config(1, bf16=True, data_types={"grad_accum_dtype": "fp32"}), "BF16_Optimizer"),
    "fp16-0": (_fp16(0), "FP16_UnfusedOptimizer"),
    "fp16-3": (_fp16(3), "DeepSpeedZeroOptimizer_Stage3"),
    # a loss scale of 2**20 overflows fp16 gradients: DeepSpeed skips steps until it has shrunk
    "fp16-2-overflow": (_fp16(2, scale_power=20), "DeepSpeedZeroOptimizer"),
    "fp16-3-overflow": (_fp16(3, scale_power=20), "DeepSpeedZeroOptimizer_Stage3"),
}


def fp16_unsupported() -> str | None:
    """Why DeepSpeed cannot run fp16 on this machine (None if it can): its CPU accelerator allows fp16
    only where oneDNN has fp16 kernels, true on some Intel Xeons, false on e.g. AMD EPYC."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        return None
    return (f"DeepSpeed's {get_accelerator()._name} accelerator reports no fp16 on this CPU "
            "(torch.ops.mkldnn._is_mkldnn_fp16_supported() is False)")


def _low_precision_worker(rank: int, world: int, ckpt_root: str) -> dict:
    """bf16/fp16 at ZeRO-0..3 (and DeepSpeed's BF16 optimizer): eval() puts x in the masters and the model.

    Each case reports on its own: one that this machine cannot run, or that fails, leaves the others."""
    results = {}
    for case in LOW_PRECISION:
        if case.startswith("fp16") and fp16_unsupported():
            results[case] = {"skip": fp16_unsupported()}
            continue
        try:
            results[case] = _low_precision_case(rank, case, ckpt_root)
        except Exception:
            results[case] = {"error": traceback.format_exc()}
    return results


def _low_precision_case(rank: int, case: str, ckpt_root: str) -> dict:
    cfg = LOW_PRECISION[case][0]
    engine, opt = _engine(cfg)
    opt.train()
    rec = {"wrapper": type(opt).__name__, "losses": _train(engine, rank, range(STEPS))}
    rec["skipped"], rec["counters"] = engine.skipped_steps, _counters(opt)
    y = sfds.engine_state_dict(engine)
    z = {n: _full_z(engine, p) for n, p in engine.module.named_parameters()}
    if not case.endswith("-0"):  # ZeRO-1..3 checkpoints, saved in train mode, for the offline export
        engine.save_checkpoint(os.path.join(ckpt_root, case))
    rec["api_x"] = sf_dist.eval_state_dict(engine, opt)  # fp32 x from the masters, y back after
    opt.eval()
    rec["x"] = sfds.engine_state_dict(engine)
    rec["model_at_eval"] = _model_weights(engine)
    dtype = rec["model_dtype"] = engine.module.fc1.weight.dtype
    with torch.no_grad():
        rec["out_finite"] = bool(torch.isfinite(engine(X_TEST.to(dtype)).float()).all())
    opt.train()
    rec["y_round_trip"] = sfds.engine_state_dict(engine)
    rec["model_at_train"] = _model_weights(engine)
    if rank == 0:
        rec["y"], rec["z"] = y, {n: t.cpu().float() for n, t in z.items()}
    return rec


# ---- tests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ckpt")
    return run_distributed(_fp32_worker, WORLD, str(root), timeout=240), root


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_train_and_eval_weights_match_reference(fp32_runs, stage):
    ranks, _ = fp32_runs
    rec, ref = ranks[0][stage], _reference("AdamWScheduleFree", STEPS)
    assert ranks[1][stage]["x"] == {}  # full weights land on rank 0 only
    _close(rec["y"], ref["y"])
    _close(rec["x"], ref["x"])
    assert rec["mode_after_eval"] is False
    for (k, ws, lr_max), (rk, rws, rlr_max) in zip(rec["counters"], ref["counters"]):
        assert k == rk == STEPS and ws == pytest.approx(rws, rel=1e-12) and lr_max == pytest.approx(rlr_max)
    exact = stage > 0  # the engine's optimizer puts y back bitwise; at ZeRO-0 fp32 it is ours, which re-derives y
    _close(rec["y_round_trip"], rec["y"], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shared_eval_api_accepts_the_engine(fp32_runs, stage):
    ranks, root = fp32_runs
    from safetensors.torch import load_file

    rec, ref = ranks[0][stage], _reference("AdamWScheduleFree", STEPS)
    _close(rec["api_x"], ref["x"])
    _close(load_file(str(root / f"x{stage}.safetensors")), ref["x"])
    for rank in ranks:
        torch.testing.assert_close(rank[stage]["api_out"].double(), ref["out"], rtol=RTOL, atol=ATOL)
        assert rank[stage]["api_mode_after"] is True
    _close(rec["api_y_after"], rec["y"], rtol=0, atol=0)  # y put back bitwise
    _close(load_file(str(root / f"x{stage}-reloaded.safetensors")), rec["reloaded_api_x"], rtol=0, atol=0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_forward_after_eval_runs_at_x(fp32_runs, stage):
    ranks, _ = fp32_runs
    ref = _reference("AdamWScheduleFree", STEPS)
    for rank in ranks:  # every rank's model computes with x
        torch.testing.assert_close(rank[stage]["out"].double(), ref["out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_resumes_on_the_same_trajectory(fp32_runs, stage):
    ranks, _ = fp32_runs
    rec, ref4 = ranks[0][stage], _reference("AdamWScheduleFree", SAVE_AT)
    _close(rec["x4"], ref4["x"])
    assert rec["resumed_mode"] is False  # saved in eval mode, loaded in eval mode
    assert rec["resumed_counters"] == rec["counters4"]
    assert [c[0] for c in rec["counters4"]] == [SAVE_AT, SAVE_AT]
    _close(rec["resumed_x4"], rec["x4"], rtol=0, atol=0)
    for rank in ranks:
        torch.testing.assert_close(rank[stage]["resumed_out4"].double(), ref4["out"], rtol=RTOL, atol=ATOL)
    # Both loads of the eval-mode save re-derive y = lerp(x, z, 1-b1): bitwise the same as each other,
    # and one fp32 rounding (then 4 steps) from the uninterrupted y that eval()/train() restored exactly.
    _close(rec["resumed_y"], rec["reloaded_in_eval_y"], rtol=0, atol=0)
    _close(rec["resumed_y"], rec["y"], rtol=1e-6, atol=1e-8)  # not the stale y that eval() kept


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_weights_only_load_starts_a_fresh_schedule_at_the_loaded_weights(fp32_runs, stage):
    ranks, _ = fp32_runs
    rec = ranks[0][stage]
    ref = _reference("AdamWScheduleFree", 2, start=_reference("AdamWScheduleFree", SAVE_AT)["x"])
    assert [c[0] for c in rec["warm_counters"]] == [2, 2]
    _close(rec["warm_y"], ref["y"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offline_export_equals_live_eval_weights(fp32_runs, stage, tmp_path):
    ranks, root = fp32_runs
    rec = ranks[0][stage]
    assert not dist.is_initialized()  # no process group here
    _close(eval_state_dict_from_checkpoint(str(root / f"stage{stage}"), tag="eval4"), rec["x4"], rtol=0, atol=0)
    out = tmp_path / "x.safetensors"
    export_main([str(root / f"stage{stage}"), str(out)])  # 'latest' is train8, saved in train mode
    from safetensors.torch import load_file

    _close(load_file(str(out)), rec["api_x"], rtol=0, atol=0)  # sf_dist.eval_state_dict of the live engine


def test_export_refuses_what_it_cannot_rebuild(fp32_runs, tmp_path):
    import shutil

    _, root = fp32_runs
    with pytest.raises(FileNotFoundError, match="save_eval_weights"):
        export_main([str(root / "stage0"), str(tmp_path / "x.safetensors")])
    partial = tmp_path / "partial"
    shutil.copytree(root / "stage2" / "train8", partial)
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match="1 \\*_optim_states.pt files but was saved by 2 ranks"):
        export_main([str(partial), str(tmp_path / "x.safetensors")])


def test_sgd_and_radam_from_config_any_case(fp32_runs):
    ranks, _ = fp32_runs
    for name in ("SGDScheduleFree", "RAdamScheduleFree"):
        rec, ref = ranks[0][name], _reference(name, STEPS)
        assert rec["base"] == name
        _close(rec["y"], ref["y"])
        _close(rec["x"], ref["x"])


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_optimizer_offload_matches_reference(fp32_runs, stage):
    ranks, _ = fp32_runs
    ref = _reference("AdamWScheduleFree", STEPS)
    _close(ranks[0][f"offload{stage}"]["y"], ref["y"])
    _close(ranks[0][f"offload{stage}"]["x"], ref["x"])
    for rank in ranks:
        torch.testing.assert_close(rank[f"offload{stage}"]["out"].double(), ref["out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["accumulate2", "accumulate3-param-offload"])
def test_gradient_accumulation_steps_once_per_boundary(fp32_runs, case):
    ranks, _ = fp32_runs
    ref = _reference("AdamWScheduleFree", STEPS)
    rec = ranks[0][case]
    assert [c[0] for c in rec["counters"]] == [STEPS, STEPS]
    _close(rec["y"], ref["y"])
    _close(rec["x"], ref["x"])
    for rank in ranks:
        torch.testing.assert_close(rank[case]["out"].double(), ref["out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_client_optimizer_instance_with_a_frozen_param(fp32_runs, stage):
    ranks, root = fp32_runs
    ref = _reference("AdamWScheduleFree", STEPS, frozen=("fc2.bias",))
    rec = ranks[0][f"frozen{stage}"]
    _close(rec["y"], ref["y"])
    _close(rec["x"], ref["x"])
    torch.testing.assert_close(rec["x"]["fc2.bias"], Net().fc2.bias.detach(), rtol=0, atol=0)
    _close(eval_state_dict_from_checkpoint(str(root / f"frozen{stage}")), rec["x"], rtol=1e-6, atol=1e-7)


def test_step_in_eval_mode_is_refused_and_changes_nothing(fp32_runs):
    rec = fp32_runs[0][0]["eval_step"]
    assert "optimizer.train()" in rec["error"]
    assert rec["groups"] == 2 and [c[0] for c in rec["counters"]] == [1, 1]


def test_builtin_optimizer_and_allowed_scheduler_pass_through(fp32_runs):
    ranks, _ = fp32_runs
    assert ranks[0]["builtin"] == {"base": "AdamW", "has_train_mode": False}
    assert ranks[0]["scheduler"] == "WarmupLR"


def test_a_failure_on_one_rank_during_the_export_gather_reaches_both_in_step(fp32_runs):
    ranks, _ = fp32_runs
    keys = [k for k in ranks[0] if isinstance(k, tuple) and k[0] == "fault"]
    assert len(keys) == 4, keys
    for key in keys:
        failing = key[2]
        for rank in (0, 1):
            kind, message, seconds, paired, train_mode, y_kept = ranks[rank][key]
            assert "injected OOM in" in message and f"on rank {failing}" in message, (key, rank, message)
            assert kind == ("MemoryError" if rank == failing else "RuntimeError"), (key, rank, kind)
            if rank != failing:
                assert message.startswith(f"rank {failing} could not gather x of"), (key, message)
            assert seconds < 20 and paired == 3.0, (key, rank, seconds, paired)
            assert train_mode is True and y_kept, (key, rank)


@pytest.fixture(scope="module")
def low_precision_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_lowp_ckpt")
    return run_distributed(_low_precision_worker, WORLD, str(root), timeout=240), root


def _low_precision_record(runs, case: str) -> dict:
    """Rank 0's record of one case; skipped with the reason where this machine cannot run it."""
    for rank, rec in enumerate(runs[0]):
        if "skip" in rec[case]:
            pytest.skip(rec[case]["skip"])
        assert "error" not in rec[case], f"rank {rank}, {case}:\n{rec[case]['error']}"
    return runs[0][0][case]


@pytest.mark.parametrize("case", list(LOW_PRECISION))
def test_low_precision_eval_puts_rounded_x_in_the_model(low_precision_runs, case):
    rec = _low_precision_record(low_precision_runs, case)
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float16
    assert rec["model_dtype"] == dtype and rec["out_finite"]
    assert rec["wrapper"] == "ScheduleFree" + LOW_PRECISION[case][1]
    assert all(torch.isfinite(torch.tensor(rec["losses"])))
    b1 = PARAMS["AdamWScheduleFree"]["betas"][0]
    params = list(rec["model_at_eval"])
    x_expected = {n: rec["y"][n].lerp(rec["z"][n], 1 - 1 / b1) for n in params}
    _close({n: rec["x"][n] for n in params}, x_expected, rtol=1e-5, atol=1e-6)
    for n in params:  # the model's low-precision weights are the fp32 x rounded, then y rounded again
        assert torch.equal(rec["model_at_eval"][n], rec["x"][n].to(dtype)), n
        assert torch.equal(rec["model_at_train"][n], rec["y_round_trip"][n].to(dtype)), n
        assert not torch.equal(rec["x"][n], rec["y"][n]), n
    _close(rec["y_round_trip"], rec["y"], rtol=0, atol=0)
    assert all(t.dtype == torch.float32 for n, t in rec["api_x"].items() if n in params)
    _close(rec["api_x"], rec["x"], rtol=0, atol=0)


@pytest.mark.parametrize("case", list(LOW_PRECISION))
def test_skipped_overflow_steps_do_not_advance_the_schedule(low_precision_runs, case):
    rec = _low_precision_record(low_precision_runs, case)
    assert rec["skipped"] >= 1 if case.endswith("overflow") else rec["skipped"] == 0
    assert [c[0] for c in rec["counters"]] == [STEPS - rec["skipped"]] * 2


@pytest.mark.parametrize("case", [c for c in LOW_PRECISION if not c.endswith("-0")])
def test_offline_export_of_low_precision_checkpoints(low_precision_runs, case):
    ranks, root = low_precision_runs
    _low_precision_record(low_precision_runs, case)
    _close(eval_state_dict_from_checkpoint(str(root / case)), ranks[0][case]["x"], rtol=1e-6, atol=1e-7)


# ---- config errors (raised before DeepSpeed starts: no process group needed) ----------------

def test_unknown_optimizer_name_lists_the_valid_ones():
    cfg = _config(1, opt="AdamScheduleFree")
    with pytest.raises(ValueError, match="'AdamScheduleFree'.*AdamWScheduleFree, SGDScheduleFree, RAdamScheduleFree"):
        sfds.initialize(model=Net(), config=cfg)


def test_scheduler_is_refused_with_the_reason(tmp_path):
    import json

    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_config(2, scheduler={"type": "WarmupLR", "params": {}})))
    with pytest.raises(ValueError, match=r"(?s)'WarmupLR'.*needs no lr schedule.*warmup_steps.*allow_scheduler=True"):
        sfds.initialize(model=Net(), config=str(path))
    with pytest.raises(ValueError, match="LambdaLR.*allow_scheduler=True"):
        model = Net()
        opt = sf_dist.AdamWScheduleFree(model.parameters())
        sfds.initialize(model=model, optimizer=opt, config={"train_micro_batch_size_per_gpu": 1},
                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_bad_config_entries_name_the_fix():
    model = Net()
    with pytest.raises(ValueError, match="valid keys.*warmup_steps"):
        sfds.initialize(model=model, config=_config(1, opt="AdamWScheduleFree") | {
            "optimizer": {"type": "AdamWScheduleFree", "params": {"lr": 1e-3, "warmup": 10}}})
    with pytest.raises(ValueError, match="one place only"):
        sfds.initialize(model=model, config=_config(1), optimizer=sf_dist.AdamWScheduleFree(model.parameters()))
    with pytest.raises(ValueError, match="elastic_checkpoint.*set it to false"):
        cfg = _config(2)
        cfg["zero_optimization"]["elastic_checkpoint"] = True
        sfds.initialize(model=model, config=cfg)


# ---- the guide's script, through the launcher and the sample config --------------------------

def _guide_script() -> str:
    """The training script of docs/deepspeed.md (the python block after 'A complete training script')."""
    text = (ROOT / "docs" / "deepspeed.md").read_text()
    after = text.split("A complete training script", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


# `python -m sf_dist.export ARGS` in a process where importing DeepSpeed fails.
EXPORT_WITHOUT_DEEPSPEED = """
import runpy, sys
class NoDeepSpeed:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepspeed":
            raise ImportError("DeepSpeed is not installed here")
sys.meta_path.insert(0, NoDeepSpeed())
sys.argv[0] = "sf_dist.export"
runpy.run_module("sf_dist.export", run_name="__main__", alter_sys=True)
"""


def test_guide_script_runs_under_the_launcher_and_exports_the_same_x(tmp_path):
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    (tmp_path / "train_ds.py").write_text(_guide_script())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "2", "MASTER_PORT": str(port)}
    run = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), "train_ds.py", "--steps", "20",
                          "--deepspeed_config", str(ROOT / "launch" / "ds_config.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    export = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_DEEPSPEED, "ckpt", "offline.safetensors"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-3000:]
    live, offline = load_file(str(tmp_path / "model_x.safetensors")), load_file(str(tmp_path / "offline.safetensors"))
    assert sorted(live) == sorted(offline) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name in live:
        assert live[name].dtype == torch.float32 and torch.equal(live[name], offline[name]), name
