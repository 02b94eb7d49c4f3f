"""``python -m sf_dist.export CHECKPOINT_DIR OUT.safetensors [--tag TAG]``: x from a DeepSpeed checkpoint.

The exporter lives in sf_dist/backends/deepspeed/export.py; this is its public command name.
"""

from .backends.deepspeed.export import eval_state_dict_from_checkpoint, export, main

__all__ = ["export", "eval_state_dict_from_checkpoint", "main"]

if __name__ == "__main__":
    main()
