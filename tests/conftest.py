import os
import sys

# Spawned ranks import test modules by name: make tests/ importable for them and for us.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".torch_extensions"))
