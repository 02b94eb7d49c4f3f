"""``sf_dist.deepspeed``: the public name of the DeepSpeed adapter (sf_dist/backends/deepspeed/)."""

from .backends.deepspeed import *  # noqa: F401,F403
from .backends.deepspeed import __all__  # noqa: F401
