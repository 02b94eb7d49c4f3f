"""HF Trainer: evaluation at x, checkpoints and ``save_model()`` consistent, with one callback.

Trainer calls ``optimizer.train()`` before every training step and ``optimizer.eval()`` before
evaluating, but never before saving. The callback makes those calls reach the model's weights on
every backend (it unwraps Accelerate's and DeepSpeed's optimizer wrappers and binds FSDP models),
puts x in the model before each checkpoint (weights and optimizer state then agree, and a resume
continues the trajectory exactly) and at the end of training, so ``trainer.save_model()`` writes x.
Tested with transformers 5.23.0 and accelerate 1.15.0.

>>> trainer = Trainer(model=model, args=args, optimizers=(opt, None), callbacks=[ScheduleFreeCallback()])
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..frameworks import bind, unwrap_optimizer

__all__ = ["ScheduleFreeCallback", "CONSTANT_SCHEDULES"]

# lr_scheduler_type values that leave lr constant after an optional warmup.
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


class ScheduleFreeCallback(TrainerCallback):
    """A TrainerCallback for sf_dist optimizers: from ``optimizers=(opt, None)``, ``create_optimizer`` or a
    ds_config entry (after ``sf_dist.deepspeed.register()``); single process, DDP, DeepSpeed ZeRO or FSDP.

    A decaying ``lr_scheduler_type`` is refused at the start of training (Schedule-Free's average
    replaces the schedule; a decay would also shrink the averaging weights) unless
    ``allow_decaying_lr=True``.

    >>> trainer = Trainer(..., args=TrainingArguments(..., lr_scheduler_type="constant"),
    ...                   callbacks=[ScheduleFreeCallback()])
    """

    def __init__(self, allow_decaying_lr: bool = False) -> None:
        self.allow_decaying_lr = allow_decaying_lr
        self.optimizer: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Refuse a decaying schedule; bind the optimizer to the model Trainer passes (under FSDP the wrapped
        root: Trainer sets ``trainer.model`` to it before this event), so its bare eval()/train() reach it."""
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        if schedule not in CONSTANT_SCHEDULES and not self.allow_decaying_lr:
            raise ValueError(
                f"lr_scheduler_type={schedule!r} decays the learning rate under a Schedule-Free optimizer: its "
                "average x already does what the decay approximates, and a lower lr also shrinks the averaging "
                "weights. Use lr_scheduler_type='constant' (warmup: the optimizer's warmup_steps) or "
                "'constant_with_warmup', or pass ScheduleFreeCallback(allow_decaying_lr=True)")
        self.optimizer = bind(model, optimizer) if model is not None else unwrap_optimizer(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._eval_before_saving(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._eval_before_saving(control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After a checkpoint in eval mode: the next train() re-derives y from x and z, as a resume from
        this checkpoint will, so the uninterrupted and the resumed run stay bitwise on one trajectory."""
        drop = getattr(self.optimizer, "drop_train_copy", None)
        if drop is not None:
            drop()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """x in the model once training is over: ``trainer.save_model()`` and later evaluations use it."""
        if self.optimizer is not None:
            self.optimizer.eval()

    def _eval_before_saving(self, control: Any) -> None:
        """Trainer evaluates and saves right after this event: x in the weights and eval mode in the
        optimizer state, so a checkpoint is consistent; the next training step calls train()."""
        if self.optimizer is not None and (control.should_save or control.should_evaluate):
            self.optimizer.eval()
