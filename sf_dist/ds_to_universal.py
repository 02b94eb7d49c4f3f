"""``python -m sf_dist.ds_to_universal --input_folder TAG_DIR --output_folder OUT_DIR``: DeepSpeed world-size change.

The converter lives in sf_dist/backends/deepspeed/universal.py; this is its public command name.
"""

from .backends.deepspeed.universal import convert, main

__all__ = ["convert", "main"]

if __name__ == "__main__":
    main()
