"""Lightning 2.x with sf_dist's ScheduleFreeCallback: the real Trainer, DDP strategy, 2 gloo ranks on CPU.

Checks: the trajectory equals schedulefree 1.4.1 on one process (float64, full batch per step); the
validation loss Lightning reports equals the loss at x = (y - (1-b1) z) / b1 computed here from the run's
y and z; ModelCheckpoint's and trainer.save_checkpoint's files hold that x with eval-mode optimizer state;
fits resumed from ModelCheckpoint's files at the end of the first epoch and in the middle of the second end
bitwise where the uninterrupted one does. The training loader is docs/frameworks.md's ResumableLoader, as
written there (Lightning restarts a plain DataLoader at the epoch's first batch: see that page).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")
schedulefree = pytest.importorskip("schedulefree")

import sf_dist  # noqa: E402
from sf_dist.integrations.lightning import ScheduleFreeCallback  # noqa: E402
from dist import run_distributed  # noqa: E402

WORLD, STEPS, PER_RANK, B1 = 2, 6, 4, 0.9  # 3 steps an epoch
RTOL, ATOL = 1e-5, 1e-6
HP = dict(lr=0.02, weight_decay=0.01, warmup_steps=2)
_g = torch.Generator().manual_seed(7)
TRAIN = (torch.randn(24, 6, generator=_g, dtype=torch.float64), torch.randn(24, 3, generator=_g, dtype=torch.float64))
VAL = (torch.randn(8, 6, generator=_g, dtype=torch.float64), torch.randn(8, 3, generator=_g, dtype=torch.float64))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()


class Regression(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return sf_dist.AdamWScheduleFree(self.parameters(), **HP)


class Recorder(lightning.Callback):
    """y and z (full, by name) after every training step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict, dict]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        named = list(pl_module.named_parameters())
        self.at[trainer.global_step] = ({n: p.detach().clone() for n, p in named},
                                        {n: opt.state[p]["z"].detach().clone() for n, p in named})


def _docs_class(name: str) -> type:
    """A class of docs/frameworks.md as written there, so the recipe users copy is the one tested."""
    from torch.utils.data import DataLoader

    text = (Path(__file__).resolve().parent.parent / "docs" / "frameworks.md").read_text()
    source = re.search(rf"^class {name}\b.*?(?=^\S)", text, flags=re.S | re.M).group(0)
    namespace = {"DataLoader": DataLoader, "__name__": __name__}
    exec(source, namespace)
    return namespace[name]


ResumableLoader = _docs_class("ResumableLoader")


def _loaders():
    from torch.utils.data import DataLoader, TensorDataset

    return (ResumableLoader(TensorDataset(*TRAIN), batch_size=PER_RANK, shuffle=False),
            DataLoader(TensorDataset(*VAL), batch_size=PER_RANK, shuffle=False))


def _fit(root: str, name: str, resume: str | None = None):
    module, recorder = Regression(), Recorder()
    every = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(root, name), every_n_train_steps=1,
                                                        save_top_k=-1, filename="{step}")
    trainer = lightning.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", precision="64-true",
                                max_steps=STEPS, callbacks=[ScheduleFreeCallback(), recorder, every],
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(module, train, val, ckpt_path=resume)
    return trainer, module, recorder


def _worker(rank: int, world: int, root: str) -> dict:
    trainer, module, recorder = _fit(root, "run")
    trainer.save_checkpoint(os.path.join(root, "manual.ckpt"))  # after fit: eval mode
    opt = trainer.optimizers[0]
    opt.train()
    trainer.save_checkpoint(os.path.join(root, "manual_train.ckpt"))  # in train mode: still x in the file
    after_save = ({n: p.detach().clone() for n, p in module.named_parameters()}, opt.train_mode)
    reported = trainer.validate(module, _loaders()[1], verbose=False)[0]["val_loss"]
    _, _, resumed = _fit(root, "resumed", resume=os.path.join(root, "run", "step=3.ckpt"))  # end of epoch 1
    _, _, resumed_mid = _fit(root, "resumed_mid", resume=os.path.join(root, "run", "step=4.ckpt"))  # mid-epoch
    if rank != 0:
        return {}

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=True)

    return {"at": recorder.at, "reported": reported, "resumed_end": resumed.at[STEPS], "after_save": after_save,
            "resumed_mid_end": resumed_mid.at[STEPS],
            "ckpt3": load(os.path.join(root, "run", "step=3.ckpt")), "manual": load(os.path.join(root, "manual.ckpt")),
            "manual_train": load(os.path.join(root, "manual_train.ckpt"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("lightning")), timeout=300)[0]


def _reference() -> dict[str, torch.Tensor]:
    """schedulefree 1.4.1, one process, on the union of both ranks' batches of each step. Lightning gives the
    training loader a DistributedSampler(shuffle=True, seed=0): epoch e is randperm(24) seeded 0 + e, rank r
    takes every other index from r, so step b of the epoch sees positions 8b .. 8b+7 of that permutation."""
    net = _net()
    opt = schedulefree.AdamWScheduleFree(net.parameters(), **HP)
    opt.train()
    for step in range(STEPS):
        epoch, b = divmod(step, 3)
        rows = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))[8 * b:8 * b + 8]
        opt.zero_grad()
        nn.functional.mse_loss(net(TRAIN[0][rows]), TRAIN[1][rows]).backward()
        opt.step()
    return {f"net.{k}": v.clone() for k, v in net.state_dict().items()}


def _x_of(y: dict, z: dict) -> dict:
    return {k: (y[k] - (1 - B1) * z[k]) / B1 for k in y}


def _val_loss(weights: dict) -> float:
    net = _net()
    net.load_state_dict({k[len("net."):]: v for k, v in weights.items()})
    with torch.no_grad():
        return nn.functional.mse_loss(net(VAL[0]), VAL[1]).item()


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what}: {k}: {m}")


def test_trajectory_equals_the_reference(runs):
    _close(runs["at"][STEPS][0], _reference(), "y after the fit")


def test_reported_validation_loss_is_at_x(runs):
    y, z = runs["at"][STEPS]
    x = _x_of(y, z)
    assert abs(_val_loss(x) - _val_loss(y)) > 1e-4
    assert runs["reported"] == pytest.approx(_val_loss(x), rel=RTOL, abs=ATOL)


def test_checkpoints_hold_x_with_eval_mode_state(runs):
    for key, step in (("ckpt3", 3), ("manual", STEPS), ("manual_train", STEPS)):
        ckpt = runs[key]
        _close(ckpt["state_dict"], _x_of(*runs["at"][step]), key)
        assert all(g["train_mode"] is False for g in ckpt["optimizer_states"][0]["param_groups"]), key
    weights, mode = runs["after_save"]  # a save in train mode leaves x in the model until the next batch
    assert mode is False
    _close(weights, _x_of(*runs["at"][STEPS]), "the model after a save in train mode")


@pytest.mark.parametrize("key", ["resumed_end", "resumed_mid_end"])
def test_resume_continues_the_trajectory_bitwise(runs, key):
    """From the end of epoch 1 (step 3) and from the middle of epoch 2 (step 4, the loader's place restored)."""
    for got, want, what in zip(runs[key], runs["at"][STEPS], "yz"):
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"{key}: {what} of {name}"
