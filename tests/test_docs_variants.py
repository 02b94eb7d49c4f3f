"""Every python block of docs/variants.md runs as written (the ZeroScheduleFree one on 2 gloo ranks)."""

from pathlib import Path

from dist import run_distributed

DOC = Path(__file__).resolve().parents[1] / "docs" / "variants.md"


def _blocks() -> list[str]:
    return [part.split("```", 1)[0] for part in DOC.read_text().split("```python\n")[1:]]


def _run_block(rank, world, code):
    exec(compile(code, f"docs/variants.md (rank {rank})", "exec"), {"__name__": "__main__"})
    return True


def test_every_block_runs():
    blocks = _blocks()
    assert len(blocks) == 4
    for code in blocks:
        if "ZeroScheduleFree" in code:
            assert run_distributed(_run_block, 2, code) == [True, True]
        else:
            exec(compile(code, "docs/variants.md", "exec"), {"__name__": "__main__"})
