"""Dispatch ``python -m sf_dist.bench NAME [args]`` to the module ``sf_dist.bench.NAME``."""

import importlib
import pkgutil
import sys

import sf_dist.bench as bench


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m sf_dist.bench {{{'|'.join(names)}}} [args]")
    name = sys.argv.pop(1)
    sys.argv[0] = f"sf_dist.bench.{name}"
    importlib.import_module(f"sf_dist.bench.{name}").main()


if __name__ == "__main__":
    main()
