"""sf_dist: Schedule-Free optimizers that stay correct on sharded models.

>>> import sf_dist
>>> opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=2.5e-3, warmup_steps=100)
>>> opt.train()                                   # y in the model: train
>>> with sf_dist.eval_weights(model, opt): ...    # x in the model: evaluate
>>> sf_dist.save_eval_weights(model, opt, "x.safetensors")
"""

from typing import Any

from . import checkpoint
from .bn import recalibrate_bn
from .frameworks import bind
from .optim import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeOptimizer, SGDScheduleFree
from .weights import eval_state_dict, eval_weights, register_eval_state_dict_hook, save_eval_weights
from .backends.zero import ZeroScheduleFree
from .plus import AdamCScheduleFreePlus
from .wrapper import ScheduleFreeWrapper, register_elementwise

__all__ = [
    "AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree", "ScheduleFreeOptimizer", "ZeroScheduleFree",
    "ScheduleFreeWrapper", "register_elementwise", "AdamCScheduleFreePlus",
    "eval_weights", "eval_state_dict", "save_eval_weights", "register_eval_state_dict_hook",
    "recalibrate_bn", "bind", "checkpoint", "deepspeed", "integrations",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``sf_dist.deepspeed`` and ``sf_dist.integrations`` are imported on first use: optional extras."""
    if name in ("deepspeed", "integrations"):
        import importlib

        return importlib.import_module(".deepspeed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
