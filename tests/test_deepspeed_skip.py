"""DeepSpeed: a NaN in one group's gradient on one rank skips the whole engine step, every group.

ZeRO-1/2 calls the client optimizer once per param group; with bf16 ``check_grad_overflow: false``
or ``compute_grad_norm: false`` DeepSpeed checks nothing first. The two groups (weights with decay,
biases without) must still step or skip together: k equal, weights bitwise unchanged, one skip
counted in ``engine.skipped_steps``. One spawn (W=2) runs every case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")

from dist import run_distributed  # noqa: E402
from test_deepspeed import MICRO, Net, _batch, _config, _groups  # noqa: E402

from sf_dist import deepspeed as sfds  # noqa: E402

BF16_NO_CHECK = {"enabled": True, "check_grad_overflow": False}
CASES = {  # case: (stage, bf16 section or None, extra zero_optimization keys)
    "bf16-1-check_grad_overflow-false": (1, BF16_NO_CHECK, {}),
    "bf16-2-check_grad_overflow-false": (2, BF16_NO_CHECK, {}),
    "bf16-2-offload-check_grad_overflow-false": (2, BF16_NO_CHECK, {"offload_optimizer": {"device": "cpu"}}),
    "fp32-1-compute_grad_norm-false": (1, None, {"compute_grad_norm": False}),
    "fp32-2-compute_grad_norm-false": (2, None, {"compute_grad_norm": False}),
    "bf16-2-both-false": (2, BF16_NO_CHECK, {"compute_grad_norm": False}),
    "bf16-3-check_grad_overflow-false": (3, BF16_NO_CHECK, {}),
    "fp32-3": (3, None, {}),
    "fp32-2": (2, None, {}),  # DeepSpeed's non-finite grad norm catches it: no extra check forced
}


def _case_config(stage: int, bf16: dict | None, zero: dict, nonfinite: str = "skip") -> dict:
    cfg = _config(stage)
    cfg["optimizer"]["params"] = {**cfg["optimizer"]["params"], "nonfinite": nonfinite}
    cfg["zero_optimization"].update(zero)
    if bf16 is not None:
        cfg["bf16"] = bf16
    return cfg


def _run_case(rank: int, cfg: dict) -> dict:
    """Step, NaN step (rank 1's fc2.bias gradient only), step; record what the NaN step changed."""
    model = Net()
    poison = [False]
    model.fc2.bias.register_hook(lambda g: torch.full_like(g, float("nan")) if poison[0] and rank == 1 else g)
    engine, opt, _, _ = sfds.initialize(model=model, config=cfg, model_parameters=_groups(model))
    opt.train()
    dtype = engine.module.fc1.weight.dtype
    rows = slice(rank * MICRO, (rank + 1) * MICRO)

    def step(i: int) -> None:
        x, y = _batch(i)
        engine.backward(F.mse_loss(engine(x[rows].to(dtype)).float(), y[rows]))
        engine.step()

    step(0)
    before = sfds.engine_state_dict(engine)
    poison[0] = True
    error = None
    try:
        step(1)
    except RuntimeError as err:
        error = str(err)
    poison[0] = False
    after = sfds.engine_state_dict(engine)
    k_after_nan = [g["k"] for g in opt.optimizer.param_groups]
    step(2)
    return {"unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "k_after_nan": k_after_nan, "k_end": [g["k"] for g in opt.optimizer.param_groups],
            "weight_sums": [g["weight_sum"] for g in opt.optimizer.param_groups],
            "engine_skipped": engine.skipped_steps, "optimizer_skipped": opt.optimizer.skipped_steps,
            "check_grad_overflow": getattr(opt, "check_grad_overflow", None), "error": error}


def _worker(rank: int, world: int) -> dict:
    results = {case: _run_case(rank, _case_config(*spec)) for case, spec in CASES.items()}
    results["error-mode"] = _run_case(rank, _case_config(2, BF16_NO_CHECK, {}, nonfinite="error"))
    results["error-mode-fp32"] = _run_case(rank, _case_config(1, None, {}, nonfinite="error"))
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 2, timeout=240)


@pytest.mark.parametrize("case", list(CASES))
def test_nan_in_one_group_on_one_rank_skips_every_group(runs, case):
    for rank in runs:
        rec = rank[case]
        assert rec["error"] is None
        assert rec["k_after_nan"] == [1, 1] and rec["k_end"] == [2, 2], rec
        assert rec["engine_skipped"] == 1 and rec["optimizer_skipped"] == 0, rec
    assert runs[0][case]["unchanged"]  # engine_state_dict gives full weights on rank 0
    assert runs[0][case]["weight_sums"] == runs[1][case]["weight_sums"]
    if CASES[case][0] < 3:  # DeepSpeed's configured value (False in all these cases) is back after the step
        assert runs[0][case]["check_grad_overflow"] is False


@pytest.mark.parametrize("case", ["error-mode", "error-mode-fp32"])
def test_nonfinite_error_raises_on_every_rank_after_the_skip(runs, case):
    for rank in runs:
        rec = rank[case]
        assert "non-finite gradient at step 1" in rec["error"] and "nonfinite='error'" in rec["error"]
        assert rec["k_after_nan"] == [1, 1] and rec["k_end"] == [2, 2]
    assert runs[0][case]["unchanged"]
