"""`python -m bench`: run every `bench/bench_*.py` module's `main()`, one after the other."""

import importlib
import pkgutil
import sys

import bench


def run_all() -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    for name in names:
        print(f"==> bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(run_all())
