"""A character-level corpus every machine has offline: the Python standard library's own sources.

Files are sorted and split by file (every 10th file goes to validation), so the split is the
same on every rank and every run. Text is UTF-8 bytes: a 256-token vocabulary, no tokenizer.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def stdlib_files(root: str | None = None) -> list[Path]:
    """Sorted stdlib ``*.py`` files, without third-party packages or the stdlib's own test suites."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = [f for f in base.rglob("*.py") if not _SKIP_DIRS.intersection(f.relative_to(base).parts)]
    if not files:
        raise FileNotFoundError(f"no *.py files under {base}: pass the stdlib folder with root=...")
    return sorted(files, key=lambda f: f.relative_to(base).as_posix())


def load_corpus(root: str | None = None, val_every: int = 10, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 token tensors; file i goes to validation when ``i % val_every == 0``.

    ``max_bytes`` caps each split (first bytes, deterministic) to keep tiny runs fast.
    """
    train, val = bytearray(), bytearray()
    for i, f in enumerate(stdlib_files(root)):
        (val if i % val_every == 0 else train).extend(f.read_bytes())
    if max_bytes is not None:
        train, val = train[:max_bytes], val[: max(max_bytes // val_every, 1)]
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8)


def sample_batch(tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``, as int64."""
    starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)
    window = tokens[idx].long()
    return window[:, :-1], window[:, 1:]


def train_batch(tokens: torch.Tensor, global_batch: int, block_size: int, seed: int, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch for ``step``: the union over ranks is independent of ``world``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x, y = sample_batch(tokens, global_batch, block_size, gen)
    per = global_batch // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def val_batches(tokens: torch.Tensor, n_batches: int, batch_size: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the same windows at every evaluation, on every run."""
    gen = torch.Generator().manual_seed(1234)
    return [sample_batch(tokens, batch_size, block_size, gen) for _ in range(n_batches)]
