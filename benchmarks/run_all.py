"""Run every benchmark (``make bench``); each writes benchmarks/results/<name>.json and prints its figures."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BENCHES = ["bench_store", "bench_phases", "bench_train", "bench_probe", "bench_dynamics", "bench_stream",
           "bench_store_sampling"]

if __name__ == "__main__":
    only = sys.argv[1:]
    for name in BENCHES:
        if only and name not in only:
            continue
        print(f"== {name}")
        importlib.import_module(name).main()
