"""Lightning 2.x: validation at x, checkpoints that hold x, exact resume, with one callback.

Lightning never calls ``optimizer.train()``/``eval()``. The callback does: ``train()`` before every
training batch, ``eval()`` before validation, testing and prediction and at the end of fit. Every
checkpoint (ModelCheckpoint's and ``trainer.save_checkpoint``) holds x with the optimizer state in
eval mode, whatever the mode at the moment of saving (the model then holds x until the next training
batch); a resume continues the trajectory bitwise (mid-epoch too,
given a resumable training loader: docs/frameworks.md). Tested with lightning 2.6.6 (DDP strategy on CPU;
Lightning runs its FSDP and DeepSpeed strategies only on GPUs).

>>> trainer = lightning.Trainer(..., callbacks=[ScheduleFreeCallback()])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..backends.deepspeed import is_deepspeed
from ..frameworks import bind, train_mode

__all__ = ["ScheduleFreeCallback"]


class ScheduleFreeCallback(Callback):
    """Puts y / x in the weights where Lightning trains / evaluates, for every sf_dist optimizer of the module.

    >>> trainer = lightning.Trainer(max_steps=1000, callbacks=[ScheduleFreeCallback()])
    """

    def __init__(self) -> None:
        self.optimizers: list[Any] = []
        self.saved_by_engine = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.optimizers = [bind(trainer.strategy.model, opt) for opt in trainer.optimizers]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for opt in self.optimizers:
            if self.saved_by_engine:  # y from x and z, as a run resumed from that checkpoint derives it
                opt.drop_train_copy()
            opt.train()
        self.saved_by_engine = False

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """x in the weights, eval mode in the optimizer state, until the next training batch, whose train()
        derives y from x and z as a run resumed from this checkpoint does: the two stay bitwise on one
        trajectory. Lightning took both entries before this hook: where at y, they are taken again (a
        collective where the strategy's state dicts are). A DeepSpeed engine writes its live weights and
        optimizer state instead of these entries."""
        if not self.optimizers:
            return
        was_training = any(train_mode(opt) for opt in self.optimizers)
        self._eval()
        if is_deepspeed(trainer.strategy.model):
            self.saved_by_engine = True  # the engine optimizer's eval() kept y: forget it before training
        elif was_training:
            checkpoint["state_dict"] = {k: v.detach().clone() if hasattr(v, "detach") else v
                                        for k, v in trainer.strategy.lightning_module_state_dict().items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(opt) for opt in trainer.optimizers]

    def _eval(self) -> None:
        for opt in self.optimizers:
            opt.eval()
