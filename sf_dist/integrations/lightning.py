"""Lightning 2.x: validation at x, checkpoints that hold x, exact resume, with one callback.

Lightning never calls ``optimizer.train()``/``eval()``. The callback does: ``train()`` before every
training batch, ``eval()`` before validation, testing and prediction and at the end of fit. Every
checkpoint (ModelCheckpoint's and ``trainer.save_checkpoint``) holds x with the optimizer state in
eval mode, whatever the mode at the moment of saving; a resume continues the trajectory. Tested with
lightning 2.6.6 (DDP strategy on CPU).

>>> trainer = lightning.Trainer(..., callbacks=[ScheduleFreeCallback()])
"""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch.callbacks import Callback

from ..frameworks import bind, unwrap_optimizer
from ..weights import eval_weights

__all__ = ["ScheduleFreeCallback"]


class ScheduleFreeCallback(Callback):
    """Puts y / x in the weights where Lightning trains / evaluates, for every sf_dist optimizer of the module.

    >>> trainer = lightning.Trainer(max_steps=1000, callbacks=[ScheduleFreeCallback()])
    """

    def __init__(self) -> None:
        self.optimizers: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.optimizers = [bind(trainer.strategy.model, opt) for opt in trainer.optimizers]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for opt in self.optimizers:
            opt.train()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Lightning took the weights and optimizer states before this hook: where they were taken at y,
        take both again at x (a collective where the strategy's state dicts are)."""
        if not self.optimizers or all(not opt.train_mode for opt in self.optimizers):
            return
        with contextlib.ExitStack() as stack:
            for opt in self.optimizers:  # x in the model for each, y bitwise back afterwards
                stack.enter_context(eval_weights(trainer.strategy.model, opt))
            checkpoint["state_dict"] = {k: v.detach().clone() if hasattr(v, "detach") else v
                                        for k, v in trainer.strategy.lightning_module_state_dict().items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(opt) for opt in trainer.optimizers]

    def _eval(self) -> None:
        for opt in self.optimizers:
            opt.eval()
