"""The benchmark CLIs' cheap parts: the parameter lists they time, the commands docs/benchmarks.md
gives, and the GPU check's refusal here."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sf_dist.bench import gpu, step

DOC = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()


def test_step_lists_have_the_documented_sizes():
    gpt2 = step.gpt2_shapes()
    assert len(gpt2) == 148 and sum(torch.Size(s).numel() for s in gpt2) == 124_439_808
    square = step.square_shapes()
    assert len(square) == 64 and sum(torch.Size(s).numel() for s in square) == 16_777_216


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run `python -m sf_dist.bench gpu`")
def test_gpu_check_refuses_clearly_without_a_device():
    assert "`python -m sf_dist.bench gpu`" in DOC
    out = subprocess.run([sys.executable, "-m", "sf_dist.bench", "gpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "needs a CUDA device and this machine has none" in out.stderr


def test_documented_step_and_gpu_commands_parse():
    commands = re.findall(r"`python -m sf_dist\.bench (step|gpu)([^`]*)`", DOC)
    assert {name for name, _ in commands} == {"step", "gpu"} and len(commands) >= 4
    for name, args in commands:
        (step if name == "step" else gpu).parser().parse_args(shlex.split(args))  # exits on an unknown flag
