"""The benchmark CLIs' cheap parts: the parameter lists they time and the GPU check's refusal here."""

import subprocess
import sys

import pytest
import torch

from sf_dist.bench import step


def test_step_lists_have_the_documented_sizes():
    gpt2 = step.gpt2_shapes()
    assert len(gpt2) == 148 and sum(torch.Size(s).numel() for s in gpt2) == 124_439_808
    square = step.square_shapes()
    assert len(square) == 64 and sum(torch.Size(s).numel() for s in square) == 16_777_216


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run `python -m sf_dist.bench gpu`")
def test_gpu_check_refuses_clearly_without_a_device():
    out = subprocess.run([sys.executable, "-m", "sf_dist.bench", "gpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "needs a CUDA device and this machine has none" in out.stderr
