"""Every python block of docs/frameworks.md, run as written with the command on its first line (2 CPU processes)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")
pytest.importorskip("lightning")

DOC = Path(__file__).resolve().parent.parent / "docs" / "frameworks.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
# What each script leaves behind, by its name.
WRITES = {"train_hf_deepspeed.py": ["out/final/model.safetensors", "out/checkpoint-2", "out/checkpoint-4"],
          "train_hf.py": ["out/final/model.safetensors"], "train_accelerate.py": ["x.safetensors", "ckpt"],
          "train_fsdp.py": [], "train_lightning.py": ["last.ckpt"]}


def _command(block: str) -> tuple[str, list[str]]:
    first = block.splitlines()[0]
    match = re.fullmatch(r"# (torchrun --nproc_per_node 2|python) (\w+\.py)", first)
    assert match, f"docs/frameworks.md: a python block must start with its command, got {first!r}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port] \
        if match.group(1).startswith("torchrun") else [sys.executable]
    return match.group(2), launcher + [match.group(2)]


def test_every_block_has_a_command():
    assert sorted(_command(b)[0] for b in BLOCKS) == sorted(WRITES)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs_as_written(index, tmp_path):
    name, command = _command(BLOCKS[index])
    (tmp_path / name).write_text(BLOCKS[index])
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    for path in WRITES[name]:
        assert (tmp_path / path).exists(), path
