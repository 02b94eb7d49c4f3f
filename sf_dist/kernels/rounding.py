"""Stochastic rounding into bfloat16 state: unbiased, so tiny updates to z and the moments survive
on average instead of being rounded away. Elementwise; knows nothing of ranks.

An fp32 value's top 16 bits are its bf16 value rounded towards zero; adding a uniform random
16-bit integer to the low bits first carries into the top half with probability equal to the
dropped fraction, so E[round(x)] = x (away from zero by magnitude, sign-magnitude format).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["stochastic_round_", "STATE_DTYPES"]

STATE_DTYPES = (torch.bfloat16,)


def stochastic_round_(dst: Sequence[Tensor], src: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> None:
    """Write each ``src`` (float32/float64) into the bfloat16 ``dst`` of the same shape, rounded
    stochastically; NaN and Inf stay what they are.

    >>> z16 = torch.empty(3, dtype=torch.bfloat16); stochastic_round_([z16], [torch.tensor([1.0, 1e-3, -2.5])])
    """
    for d, s in zip(dst, src):
        if d.numel() == 0:
            continue
        bits = s.detach().float().contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)  # -65536 == 0xFFFF0000
        finite = torch.isfinite(s)
        d.copy_(torch.where(finite, rounded, s.float()).to(torch.bfloat16))
