"""ZeRO-1/2 Schedule-Free for torchrun data parallel: ``sf_dist.ZeroScheduleFree``."""

from .optimizer import ZeroScheduleFree

__all__ = ["ZeroScheduleFree"]
