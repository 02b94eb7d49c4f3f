"""docs/checkpoint.md as written: the resume demo under torchrun at 2 then 3 ranks, in one process,
and the offline export of its checkpoint, which must equal the live export bitwise."""

import os
import pathlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks() -> tuple[str, str]:
    """The python block after 'Save as `resume_demo.py`' and the bash block that follows it."""
    after = (ROOT / "docs" / "checkpoint.md").read_text().split("Save as `resume_demo.py`:", 1)[1]
    script = after.split("```python\n", 1)[1].split("```", 1)[0]
    commands = after.split("```bash\n", 1)[1].split("```", 1)[0]
    return script, commands


def test_resume_demo_and_offline_export_run_as_written(tmp_path):
    script, commands = _blocks()
    (tmp_path / "resume_demo.py").write_text(script)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0: resumed at step 20, k = 20" in done.stdout and "rank 2: resumed at step 20" in done.stdout
    assert "rank 0: resumed at step 30, k = 30" in done.stdout and "saved at step 40" in done.stdout
    live, offline = load_file(tmp_path / "demo_x.safetensors"), load_file(tmp_path / "demo_x_offline.safetensors")
    assert set(live) == set(offline) and all(torch.equal(offline[k], v) for k, v in live.items())
    shards = sorted((tmp_path / "demo_hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "demo_hf" / "model.safetensors.index.json").exists()
    merged = {k: v for f in shards for k, v in load_file(f).items()}
    assert set(merged) == set(live) and all(torch.equal(merged[k], v) for k, v in live.items())
