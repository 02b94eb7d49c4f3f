"""One adapter per sharding engine: fsdp (FSDP1 + FSDP2), zero (ZeroScheduleFree), deepspeed.

Each answers the same few questions for weights.py and checkpoint.py: is this model one of
mine, is it sharded, refresh its gathered weights after a y<->x swap, and gather one tensor of
x to rank 0. The optimizers and kernels import nothing from here.
"""
