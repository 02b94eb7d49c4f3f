"""HF Trainer, Accelerate and plain deepspeed.initialize with sf_dist: real frameworks, 2 gloo ranks, a tiny GPT-2.

In each run: the eval loss the framework reports equals the loss at x = (y - (1-b1) z) / b1 computed here
from the run's own y and z (read with torch / DeepSpeed utilities, not sf_dist's helpers), the saved
weights are that x, and a run resumed from a checkpoint ends where the uninterrupted one does. fp32
(Trainer's dtype): the comparisons are within one run's arithmetic, so rtol 1e-5 / atol 1e-6 hold.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

import sf_dist  # noqa: E402
from sf_dist import deepspeed as sfds  # noqa: E402
from sf_dist.integrations.transformers import ScheduleFreeCallback  # noqa: E402
from dist import run_distributed  # noqa: E402

WORLD, STEPS, SAVE_EVERY, RESUME_AT, B1 = 2, 6, 2, 4, 0.9
RTOL, ATOL = 1e-5, 1e-6
LR, WARMUP = 0.01, 2
SF_ENTRY = {"type": "AdamWScheduleFree", "params": {"lr": LR, "warmup_steps": WARMUP}}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    # no dropout: a plain DeepSpeed checkpoint does not carry the RNG state a resume would need for the same masks
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _rows(n: int, seed: int) -> list[dict]:
    """Token rows whose first label is ignored: the shift drops it anyway, and then Trainer's token count
    (it counts labels != -100 before the shift) equals the model's, so their losses agree."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


TRAIN, EVAL = _rows(12, 1), _rows(4, 2)


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "steps_per_print": 10**9, "optimizer": SF_ENTRY,
            "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}}


def _loss_at(weights: dict[str, torch.Tensor]) -> float:
    """Causal-LM loss of a fresh single-process GPT-2 holding ``weights`` on the whole eval set."""
    model = _gpt2().eval()
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to transformer.wte.weight
    with torch.no_grad():
        return model(input_ids=torch.stack([r["input_ids"] for r in EVAL]),
                     labels=torch.stack([r["labels"] for r in EVAL])).loss.item()


def _x_of(y: dict[str, torch.Tensor], z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x = (y - (1-b1) z) / b1, in float64 and rounded once."""
    return {k: ((y[k].double() - (1 - B1) * z[k].double()) / B1).float() for k in y}


def _y_and_z(model: nn.Module, optimizer, engine) -> tuple[dict, dict]:
    """Full y and z by parameter name; read from the engine's fp32 masters under DeepSpeed (collective)."""
    if engine is not None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        named = list(engine.module.named_parameters())
        return ({n: safe_get_full_fp32_param(p).detach().clone() for n, p in named},
                {n: safe_get_full_optimizer_state(p, "z").detach().clone() for n, p in named})
    inner = optimizer.optimizer  # Accelerate's wrapper around the torch optimizer
    named = list(model.named_parameters())
    return {n: p.detach().clone() for n, p in named}, {n: inner.state[p]["z"].detach().clone() for n, p in named}


class Recorder(transformers.TrainerCallback):
    """Before ScheduleFreeCallback acts (it is listed after): y and z at every save step and after the last step."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.at = trainer_ref, {}

    def _record(self, key, model, optimizer) -> None:
        trainer = self.trainer_ref[0]
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        self.at[key] = _y_and_z(model, optimizer, engine)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        last = state.global_step == state.max_steps
        if control.should_save or last:
            self._record(state.global_step, model, optimizer)
        if last:
            self.at["end"] = self.at[state.global_step]


def _trainer(out: str, how: str, stage: int | None, resume: str | None = None):
    model = _gpt2()
    kw = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=2, per_device_eval_batch_size=2,
              learning_rate=LR, lr_scheduler_type="constant", save_steps=SAVE_EVERY, report_to=[], use_cpu=True,
              seed=0, disable_tqdm=True, max_grad_norm=0.0, logging_steps=STEPS, save_only_model=False)
    optimizers = (None, None)
    if stage is not None:
        kw["deepspeed"] = _ds_config(stage)
    if how == "instance":
        optimizers = (sf_dist.AdamWScheduleFree(model.parameters(), lr=LR, warmup_steps=WARMUP), None)
    ref: list = []
    recorder = Recorder(ref)
    trainer_cls = CreatesOptimizer if how == "create_optimizer" else transformers.Trainer
    trainer = trainer_cls(model=model, args=transformers.TrainingArguments(**kw), train_dataset=TRAIN,
                          eval_dataset=EVAL, optimizers=optimizers, callbacks=[recorder, ScheduleFreeCallback()])
    ref.append(trainer)
    # evaluate() before train(): on one process only. Under DDP, transformers 5.23 then trains without the
    # DDP wrapper (seen here: the ranks' gradients differ from the first step on), a Trainer matter.
    alone = not dist.is_initialized() or dist.get_world_size() == 1
    before = trainer.evaluate()["eval_loss"] if stage is None and resume is None and alone else None
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder, before


class CreatesOptimizer(transformers.Trainer):
    """The optimizer from create_optimizer, as a user subclass would build it."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = sf_dist.AdamWScheduleFree((model or self.model).parameters(), lr=self.args.learning_rate,
                                                       warmup_steps=WARMUP)
        return self.optimizer


def _trainer_case(rank: int, how: str, stage: int | None, root: str) -> dict:
    if how == "config":
        sfds.register()
    out = os.path.join(root, "run")
    trainer, recorder, before = _trainer(out, how, stage)
    reported = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(root, "final"))
    resumed, resumed_rec, _ = _trainer(os.path.join(root, "resumed"), how, stage,
                                       resume=os.path.join(out, f"checkpoint-{RESUME_AT}"))
    resumed_loss = resumed.evaluate()["eval_loss"]
    if rank != 0:
        return {}
    from safetensors.torch import load_file

    return {"reported": reported, "before": before, "at": recorder.at, "resumed_end": resumed_rec.at["end"],
            "resumed_loss": resumed_loss, "final": load_file(os.path.join(root, "final", "model.safetensors")),
            "ckpt": load_file(os.path.join(out, f"checkpoint-{RESUME_AT}", "model.safetensors")),
            "wrapper": type(trainer.optimizer).__name__}


def _trainer_worker(rank: int, world: int, cases: list[str], root: str) -> dict:
    transformers.logging.set_verbosity_error()
    out = {case: _trainer_case(rank, *TRAINER_CASES[case][:2], os.path.join(root, case)) for case in cases}
    if "ddp" in cases:  # FSDP1 through the callback, with and without it
        out["fsdp1"] = {bound: _fsdp1_through_the_callback(rank, world, root, bound) for bound in (True, False)}
    return out


def _fsdp1_through_the_callback(rank: int, world: int, root: str, bound: bool) -> dict:
    """Under FSDP Trainer hands on_train_begin the FSDP root as ``model`` (transformers 5.23 sets trainer.model
    to the wrapped model there) and Accelerate's AcceleratedOptimizer, then makes bare optimizer.eval()/train()
    calls. Accelerate runs FSDP only on GPUs, so those objects are built here: test_bind's model (weights in the
    root, tied head) and steps, checked against its schedulefree oracle."""
    from accelerate import Accelerator
    from test_bind import EVAL_AT, HP, STEPS as BIND_STEPS, X_TEST, Tied, _full_state, _shard, _train_step

    args = transformers.TrainingArguments(output_dir=os.path.join(root, "fsdp1"), lr_scheduler_type="constant",
                                          report_to=[], use_cpu=True)  # before Accelerator: it resets Accelerate's state
    model = _shard(Tied().double(), "fsdp1", world)
    opt = Accelerator(cpu=True).prepare_optimizer(sf_dist.AdamWScheduleFree(model.parameters(), **HP))
    if bound:
        ScheduleFreeCallback().on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(),
                                              model=model, optimizer=opt)
    out = {}
    opt.train()
    for step in range(BIND_STEPS):
        if step == EVAL_AT:
            with torch.no_grad():
                out["y_out"] = model.eval()(X_TEST)  # the root keeps its gathered weights (at y)
                opt.eval()
                out["x_out"] = model(X_TEST)
                opt.train()
                out["y_again"] = model(X_TEST)
                model.train()
        _train_step(model, opt, step, rank, world)
    out["y"] = _full_state(model)
    return out


TRAINER_CASES = {  # name: (how the optimizer is given, DeepSpeed stage or None, spawn group)
    "plain": ("instance", None, "one process"),
    "ddp": ("instance", None, "ddp"),
    "ddp-create_optimizer": ("create_optimizer", None, "ddp"),
    "deepspeed-zero2-config": ("config", 2, "zero2"),
    "deepspeed-zero3-config": ("config", 3, "zero3"),
}
_SPAWNS: dict[str, dict] = {}


def _trainer_run(case: str, root) -> dict:
    """One spawn per group (DeepSpeed stages apart: Accelerate keeps one DeepSpeed plugin per process); the
    one-process group runs here, as the refusal test's Trainer does (a spawn would import everything again)."""
    group = TRAINER_CASES[case][2]
    if group not in _SPAWNS:
        cases = [c for c, spec in TRAINER_CASES.items() if spec[2] == group]
        if group == "one process":
            _SPAWNS[group] = _trainer_worker(0, 1, cases, str(root))
        else:
            _SPAWNS[group] = run_distributed(_trainer_worker, WORLD, cases, str(root), timeout=500)[0]
    return _SPAWNS[group][case]


def _close(actual: dict, expected: dict) -> None:
    """Every tensor of ``actual`` (a saved file may also list the tied lm_head.weight) against ``expected``."""
    for name in actual:
        want = expected["transformer.wte.weight" if name == "lm_head.weight" else name]
        torch.testing.assert_close(actual[name].float(), want.float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_trainer_evaluates_saves_and_resumes_at_x(case, tmp_path_factory):
    stage = TRAINER_CASES[case][1]
    r = _trainer_run(case, tmp_path_factory.mktemp(TRAINER_CASES[case][2].replace(" ", "_")))
    y, z = r["at"]["end"]
    x = _x_of(y, z)
    loss_x, loss_y = _loss_at(x), _loss_at(y)
    assert abs(loss_x - loss_y) > 1e-4  # the check below can tell x from y
    assert r["reported"] == pytest.approx(loss_x, rel=RTOL, abs=ATOL)
    _close(r["final"], x)  # trainer.save_model() after train()
    _close(r["ckpt"], _x_of(*r["at"][RESUME_AT]))  # a checkpoint holds x, in eval mode with its optimizer state
    assert sorted(r["final"]) and set(r["final"]) - {"lm_head.weight"} == set(x)
    _close(r["resumed_end"][0], y)  # resumed from checkpoint-4: the uninterrupted trajectory
    _close(r["resumed_end"][1], z)
    assert r["resumed_loss"] == pytest.approx(r["reported"], rel=RTOL, abs=ATOL)
    if r["before"] is not None:  # evaluate() before train(): no optimizer yet, the initial weights
        assert r["before"] == pytest.approx(_loss_at(_gpt2().state_dict()), rel=RTOL, abs=ATOL)
    if stage is not None:
        assert r["wrapper"] == "DeepSpeedOptimizerWrapper"


def test_trainer_fsdp1_bare_eval_and_train_reach_the_root_weights(tmp_path_factory):
    """The callback binds the FSDP1 root Trainer gives it; without the callback the root's copy stays stale."""
    from test_bind import _reference

    _trainer_run("ddp", tmp_path_factory.mktemp("ddp"))
    runs, ref = _SPAWNS["ddp"]["fsdp1"], _reference()
    got = runs[True]
    for key, want in (("y_out", ref["y_out"]), ("x_out", ref["x_out"]), ("y_again", ref["y_out"])):
        torch.testing.assert_close(got[key], want, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
    assert set(got["y"]) == set(ref["y"])
    _close(got["y"], ref["y"])  # training after the evaluation stays on the oracle's trajectory
    assert (runs[False]["x_out"] - ref["x_out"]).abs().max() > 1e-3  # unbound: the forward after eval() is not at x


# ---- Accelerate's DeepSpeed plugin and plain deepspeed.initialize, through the config entry ------------------

def _batch(step: int, rank: int) -> dict:
    """Rank ``rank``'s 2 rows of training step ``step`` (the 12 rows cycle)."""
    rows = [TRAIN[(step * 2 * WORLD + 2 * rank + i) % len(TRAIN)] for i in range(2)]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


def _eval_loss(model) -> float:
    """The loss the engine computes on the eval set (module in eval mode: no dropout)."""
    model.eval()
    with torch.no_grad():
        loss = model(**{k: torch.stack([r[k] for r in EVAL]) for k in ("input_ids", "labels")}).loss.item()
    model.train()
    return loss


def _engine_run(rank: int, step_fn, steps: range, opt, engine, save=None) -> dict:
    """Train ``steps``; at RESUME_AT call ``save`` in eval mode. Returns y and z after the last step."""
    opt.train()
    for step in steps:
        step_fn(_batch(step, rank))
        if save is not None and step + 1 == RESUME_AT:
            opt.eval()
            save()
            sf_dist.frameworks.unwrap_optimizer(opt).drop_train_copy()  # as ScheduleFreeCallback does
            opt.train()
    return _y_and_z(None, None, engine)


def _engine_worker(rank: int, world: int, root: str) -> dict:
    import deepspeed
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim
    import sf_dist.frameworks  # noqa: F401

    sfds.register()
    sfds.register()  # idempotent
    out: dict = {}

    # plain deepspeed.initialize with {"type": "AdamWScheduleFree"}
    def build():
        model = _gpt2()
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(2))[:2]

    def ds_step(engine):
        def step(batch):
            engine.backward(engine(**batch).loss)
            engine.step()
        return step

    engine, opt = build()
    ckpt = os.path.join(root, "ds")
    y, z = _engine_run(rank, ds_step(engine), range(STEPS), opt, engine, lambda: engine.save_checkpoint(ckpt, tag="s4"))
    opt.eval()
    reported = _eval_loss(engine)
    opt.train()
    sf_dist.save_eval_weights(engine, opt, os.path.join(root, "ds.safetensors"))  # from train mode
    resumed_engine, resumed_opt = build()
    resumed_engine.load_checkpoint(ckpt, tag="s4")
    resumed = _engine_run(rank, ds_step(resumed_engine), range(RESUME_AT, STEPS), resumed_opt, resumed_engine)
    out["deepspeed"] = {"y": y, "z": z, "reported": reported, "resumed": resumed, "mode": opt.train_mode,
                        "wrapper": type(opt).__name__}

    # sf_dist.deepspeed.initialize still works once registered (no recursion); other optimizers pass through
    model = _gpt2()
    engine, opt, _, _ = sfds.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(1))
    out["sf_initialize"] = type(opt.optimizer).__name__
    model = _gpt2()
    config = {**_ds_config(0), "optimizer": {"type": "SGD", "params": {"lr": LR}}}  # torch.optim.SGD: no JIT build
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    out["pass_through"] = (type(opt).__module__, hasattr(type(opt), "train_mode"))  # ZeRO-0 fp32: torch's own

    # allow_scheduler=True with a callable lr_scheduler (what HF Trainer passes): builds, steps, keeps the schedule
    model = _gpt2()
    engine, opt, _, sched = sfds.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(2), allow_scheduler=True,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5))
    opt.train()
    ds_step(engine)(_batch(0, rank))
    out["scheduled"] = (type(sched).__name__, opt.optimizer.param_groups[0]["lr"], opt.optimizer.param_groups[0]["k"])

    # Accelerate's DeepSpeed plugin with the config entry; every helper takes Accelerate's optimizer
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config(2)))
    model = _gpt2()
    model, opt = accelerator.prepare(model, DummyOptim(model.parameters(), lr=LR))

    def acc_step(batch):
        accelerator.backward(model(**batch).loss)
        opt.step()
        opt.zero_grad()

    ckpt = os.path.join(root, "acc")
    y, z = _engine_run(rank, acc_step, range(STEPS), opt, model, lambda: accelerator.save_state(ckpt))
    opt.eval()
    reported = _eval_loss(model)
    opt.train()
    with sf_dist.eval_weights(model, opt):
        in_context = _eval_loss(model)
    sf_dist.save_eval_weights(model, opt, os.path.join(root, "acc.safetensors"))
    state = sf_dist.eval_state_dict(model, opt)
    accelerator.load_state(ckpt)
    resumed = _engine_run(rank, acc_step, range(RESUME_AT, STEPS), opt, model)
    out["accelerate"] = {"y": y, "z": z, "reported": reported, "resumed": resumed, "in_context": in_context,
                         "state": state, "mode": opt.optimizer.train_mode, "wrapper": type(opt).__name__}
    if rank != 0:
        return {}
    from safetensors.torch import load_file

    out["deepspeed"]["saved"] = load_file(os.path.join(root, "ds.safetensors"))
    out["accelerate"]["saved"] = load_file(os.path.join(root, "acc.safetensors"))
    return out


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    return run_distributed(_engine_worker, WORLD, str(tmp_path_factory.mktemp("engines")), timeout=400)[0]


@pytest.mark.parametrize("case", ["deepspeed", "accelerate"])
def test_config_entry_evaluates_saves_and_resumes_at_x(engine_runs, case):
    r = engine_runs[case]
    x = _x_of(r["y"], r["z"])
    loss_x, loss_y = _loss_at(x), _loss_at(r["y"])
    assert abs(loss_x - loss_y) > 1e-4
    assert r["reported"] == pytest.approx(loss_x, rel=RTOL, abs=ATOL)  # a bare opt.eval() reached the engine
    assert r["mode"] is True and r["wrapper"].startswith(("ScheduleFree", "DeepSpeedOptimizerWrapper"))
    _close(r["saved"], x)
    _close(r["resumed"][0], r["y"])
    _close(r["resumed"][1], r["z"])
    if case == "accelerate":  # the helpers took Accelerate's DeepSpeedOptimizerWrapper
        assert r["in_context"] == pytest.approx(loss_x, rel=RTOL, abs=ATOL)
        _close(r["state"], x)


def test_registered_initialize_keeps_sf_initialize_and_other_optimizers(engine_runs):
    assert engine_runs["sf_initialize"] == "AdamWScheduleFree"
    module, has_mode = engine_runs["pass_through"]
    assert module == "torch.optim.sgd"
    assert not has_mode  # DeepSpeed's own optimizer, not given Schedule-Free train()/eval()


def test_allowed_callable_scheduler_builds_and_schedules(engine_runs):
    kind, lr, k = engine_runs["scheduled"]
    assert kind == "LambdaLR" and lr == pytest.approx(LR * 0.5) and k == 1


# ---- refusals, before any engine is built ---------------------------------------------------------------------

def test_registered_config_refuses_a_scheduler_entry_and_bad_params():
    import deepspeed

    sfds.register()
    model = nn.Linear(2, 2)
    config = {**_ds_config(2), "scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(ValueError, match=r"(?s)ds_config has a 'scheduler' entry \('WarmupLR'\).*needs no lr schedule"):
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    config = {**_ds_config(2), "optimizer": {"type": "adamwschedulefree", "params": {"lr": LR, "warmup": 3}}}
    with pytest.raises(ValueError, match=r"bad params for AdamWScheduleFree.*valid keys: \['lr', 'betas'"):
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)


def test_callable_lr_scheduler_refusal_names_the_argument():
    model = nn.Linear(2, 2)

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    with pytest.raises(ValueError, match=r"(?s)^lr_scheduler= was passed \(.*make_scheduler\).*allow_scheduler=True"):
        sfds.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(2),
                        lr_scheduler=make_scheduler)


def test_decaying_lr_scheduler_type_is_refused_with_the_reason(tmp_path):
    model = _gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          lr_scheduler_type="cosine", report_to=[], use_cpu=True, save_strategy="no")
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=LR)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TRAIN, optimizers=(opt, None),
                                   callbacks=[ScheduleFreeCallback()])
    with pytest.raises(ValueError, match=r"(?s)lr_scheduler_type='cosine' decays.*'constant'.*allow_decaying_lr=True"):
        trainer.train()
    assert opt.param_groups[0]["k"] == 0  # refused before any step
