"""``python -m sf_dist.export CHECKPOINT_DIR OUT [--tag TAG] [--max-shard-size 5GB]``: x, offline.

CHECKPOINT_DIR is an ``sf_dist.checkpoint`` directory (any backend, any world size) or a DeepSpeed
checkpoint (the directory given to ``engine.save_checkpoint``, or a tag directory). OUT gets x under
plain module names: one safetensors file, or with ``--max-shard-size`` a directory in the Hugging
Face layout (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``). Runs on one
CPU machine with no process group; nothing in the files is executed.
"""

from __future__ import annotations

import argparse
from typing import Optional

from .backends.deepspeed.export import eval_state_dict_from_checkpoint, export
from .checkpoint.offline import export_checkpoint, is_sf_checkpoint

__all__ = ["export", "export_checkpoint", "eval_state_dict_from_checkpoint", "main"]


def main(argv: Optional[list[str]] = None) -> None:
    """Command line entry (see the module docstring).

    >>> main(["ckpt/step_1000", "model.safetensors"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="python -m sf_dist.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="an sf_dist.checkpoint directory, or a DeepSpeed checkpoint")
    parser.add_argument("out", help="output .safetensors file, or a directory with --max-shard-size")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the one in CHECKPOINT_DIR/latest)")
    parser.add_argument("--max-shard-size", default=None,
                        help="write the Hugging Face sharded layout into OUT, shards of at most this size (e.g. 5GB)")
    args = parser.parse_args(argv)
    if is_sf_checkpoint(args.checkpoint_dir):
        if args.tag is not None:
            parser.error("--tag is for DeepSpeed checkpoints; an sf_dist.checkpoint directory has none")
        names = export_checkpoint(args.checkpoint_dir, args.out, args.max_shard_size)
    else:
        names = export(args.checkpoint_dir, args.out, args.tag, args.max_shard_size)
    print(f"wrote {len(names)} tensors of x to {args.out}")


if __name__ == "__main__":
    main()
