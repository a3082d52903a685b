"""Throughput of the study engine on Neural Elements' Phase-3 grid.

6 activations x depths 1-5 x width 8 x 4 datasets x 20 trials = 2,400 runs x 500 epochs, full batch, 200 samples,
records every 50 epochs, through `run_study` (stacked groups of 80 runs, worker processes, SQLite store) — the
same path as `plasticity study run recipes/studies/phase3.yaml`. Prints wall time and runs/second, and the mean
final accuracy per activation next to Neural Elements' published Phase-3 means.

    python benchmarks/study_throughput.py [--workers 2] [--trials 20]

Neural Elements' own NumPy code takes about 140 ms per run on one core of this project's machine (2,400 runs ≈
5.6 core-minutes); the target is ≤ 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from plasticity_lightning.studies import ResultStore, StudySpec, run_study

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"leaky_relu": 92.2, "relu": 91.7, "sine": 90.7, "tanh": 89.8, "gelu": 86.4, "sigmoid": 59.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    spec = StudySpec.from_yaml(ROOT / "recipes" / "studies" / "phase3.yaml")
    spec.trials = args.trials
    store = ResultStore(Path(tempfile.mkdtemp(prefix="study_")) / "phase3.sqlite")
    start = time.perf_counter()
    runs = run_study(spec, store, workers=args.workers)
    seconds = time.perf_counter() - start
    print(
        f"phase 3: {runs} runs x {spec.epochs} epochs in {seconds:.1f} s with {args.workers} workers "
        f"= {runs / seconds:.0f} runs/s ({1000 * seconds * args.workers / runs:.1f} core-ms per run; "
        f"Neural Elements ~140)"
    )
    accuracy = defaultdict(list)
    for row in store.rows():
        accuracy[row["config"]["activation"]].append(100 * row["final_accuracy"])
    print(f"\n{'activation':<11} {'mean final acc %':>16} {'published':>9}")
    for name, values in sorted(accuracy.items(), key=lambda kv: -statistics.mean(kv[1])):
        print(f"{name:<11} {statistics.mean(values):>16.1f} {PUBLISHED.get(name, float('nan')):>9.1f}")


if __name__ == "__main__":
    main()
