"""Run every `benchmarks/bench_*.py` module's `main()` in turn (what `make bench` does)."""

import importlib
import pkgutil

import benchmarks


def main() -> None:
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            print(f"== {info.name}", flush=True)
            importlib.import_module(f"benchmarks.{info.name}").main()


if __name__ == "__main__":
    main()
