"""sf_dist: Schedule-Free optimizers that stay correct on sharded models."""

from .optim import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeOptimizer, SGDScheduleFree

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree", "ScheduleFreeOptimizer"]
__version__ = "0.1.0"
