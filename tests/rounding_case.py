"""Checks of stochastic rounding into bf16 shared by the state_dtype and Triton tests: the values,
the step that writes them exactly before rounding, and the unbiasedness test."""

import torch

from sf_dist.schedule import StepScalars

SPECIAL = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])

# Scalars under which one step writes z = -g/2, v = g*g and m = g/2 (each one float32 operation on
# g) before rounding them into bf16, so every kernel rounds the same float32 values.
EXACT = StepScalars(lr=1.0, ckp1=0.0, y_coef=0.0, weight_decay=0.0, decay_at="y", beta2=0.0, eps=1e-8,
                    normalize=False, inner_momentum=0.5)


def values(n: int = 1000, reps: int = 4096) -> tuple[torch.Tensor, int]:
    """``n`` float32 values of both signs and many magnitudes, and ``reps`` rounds of each."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=gen) * torch.logspace(-6, 6, n), reps


def neighbours(x):
    """The bf16 values just below and above |x| (by magnitude), as float32, with x's sign."""
    down = x.to(torch.bfloat16).float()
    down = torch.where(down.abs() > x.abs(), torch.nextafter(down.to(torch.bfloat16), torch.zeros_like(
        down.to(torch.bfloat16))).float(), down)
    bits = down.view(torch.int32) + (1 << 16)
    return down, bits.view(torch.float32)


def assert_unbiased(got, x):
    """``got`` (reps x n, float32) holds stochastic roundings of the float32 values ``x`` (n): each
    result is one of the two bf16 neighbours, exact values stay exact, and each mean is within 5
    standard errors of the value (z-scores average like |N(0,1)|), while round-to-nearest is off by far more."""
    lo, hi = neighbours(x)
    assert ((got == lo) | (got == hi)).all()
    ulp = (hi - lo).abs().double()
    frac = (x.double().abs() - lo.double().abs()) / ulp  # P(rounding up in magnitude) if unbiased
    inexact = frac > 0
    assert torch.equal(got[:, ~inexact], x.expand_as(got)[:, ~inexact])
    se = ulp * (frac * (1 - frac) / got.shape[0]).sqrt()  # standard error of the mean of the rounded values
    z = ((got.double().mean(0) - x.double()) / se)[inexact]
    assert z.abs().max() < 5.0, z.abs().max()
    assert z.abs().mean() < 0.9, z.abs().mean()  # |N(0,1)| averages 0.80
    nearest = ((x.to(torch.bfloat16).double() - x.double()) / se)[inexact]
    assert nearest.abs().mean() > 20, nearest.abs().mean()  # what unbiasedness buys
