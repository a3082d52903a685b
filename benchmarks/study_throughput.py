"""Throughput of the study engine on Neural Elements' Phase-3 grid, side by side with Neural Elements' own trainer.

Ours: 6 activations x depths 1-5 x width 8 x 4 datasets x 20 trials = 2,400 runs x 500 epochs, full batch, 200
samples, records every 50 epochs, through `run_study` (stacked groups of 80 runs, worker processes, SQLite store):
the same path as `plasticity study run recipes/studies/phase3.yaml`, store writes included.

Theirs: Neural Elements' NumPy `Trainer` (github.com/mgmacleod/incubator, `projects/neural-elements`, kept outside
this repository) on a stratified sample of the same grid: every activation x depth x dataset cell, `--ne-trials`
runs each, the Phase-3 training config (500 epochs, lr 0.1, record every 50), element construction and training
timed, their per-run JSON store left out (which favours them).

The two alternate in one process, `--repeats` times (ours first on even repeats, theirs first on odd ones), and
each is charged the CPU time (user + system, worker processes included) it used: core-ms per run, robust to other
load on a shared machine. Wall time is printed too. Run at normal priority with OMP_NUM_THREADS=1:

    git clone https://github.com/mgmacleod/incubator /somewhere/incubator
    OMP_NUM_THREADS=1 python benchmarks/study_throughput.py \\
        --neural-elements /somewhere/incubator/projects/neural-elements [--repeats 3] [--workers 2]

Without `--neural-elements` only ours is timed (and the script says that the ratio was not measured).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from plasticity_lightning.studies import ResultStore, StudySpec, run_study

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"leaky_relu": 92.2, "relu": 91.7, "sine": 90.7, "tanh": 89.8, "gelu": 86.4, "sigmoid": 59.9}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (waited-for) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_ours(spec: StudySpec, workers: int, folder: Path, repeat: int) -> tuple[int, float, float, ResultStore]:
    store = ResultStore(folder / f"phase3_{repeat}.sqlite")
    cpu, wall = cpu_seconds(), time.perf_counter()
    runs = run_study(spec, store, workers=workers)  # the pool's workers are joined: their CPU time is counted
    return runs, cpu_seconds() - cpu, time.perf_counter() - wall, store


def load_neural_elements(path: Path):
    """Neural Elements' element, trainer and datasets from their checkout (never vendored here)."""
    if not (path / "src" / "core" / "training.py").is_file():
        raise SystemExit(
            f"--neural-elements {str(path)!r} is not a Neural Elements checkout (no src/core/training.py there); "
            "expected <incubator clone>/projects/neural-elements"
        )
    sys.path.insert(0, str(path))
    from src.core.elements import NeuralElement
    from src.core.training import Trainer, TrainingConfig
    from src.datasets.toy import get_dataset

    return NeuralElement, Trainer, TrainingConfig, get_dataset


def time_theirs(spec: StudySpec, trials: int, neural_elements) -> tuple[int, float, float]:
    NeuralElement, Trainer, TrainingConfig, get_dataset = neural_elements
    config = {"epochs": spec.epochs, "learning_rate": spec.lr, "record_every": spec.record_every}
    data = {name: get_dataset(name) for name in spec.datasets}  # one draw per dataset, as their bulk jobs do
    cpu, wall, runs = cpu_seconds(), time.perf_counter(), 0
    for activation, hidden, dataset in itertools.product(spec.activations, spec.hidden_sizes, spec.datasets):
        for trial in range(trials):
            np.random.seed(trial)  # their trainer shuffles with the global generator
            element = NeuralElement(hidden_layers=list(hidden), activation=activation)
            Trainer(element, TrainingConfig(**config)).train(*data[dataset])
            runs += 1
    return runs, cpu_seconds() - cpu, time.perf_counter() - wall


def span(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=20, help="trials per cell of our grid (Phase 3: 20)")
    parser.add_argument("--neural-elements", type=Path, help="path to incubator/projects/neural-elements")
    parser.add_argument("--ne-trials", type=int, default=1, help="runs of theirs per grid cell (stratified)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = StudySpec.from_yaml(ROOT / "recipes" / "studies" / "phase3.yaml")
    spec.trials = args.trials
    neural_elements = load_neural_elements(args.neural_elements) if args.neural_elements else None
    if neural_elements is None:
        print(
            "Neural Elements: not measured (pass --neural-elements <incubator clone>/projects/neural-elements); "
            "timing ours only, no ratio"
        )
    folder = Path(tempfile.mkdtemp(prefix="study_"))
    print(f"stores of our runs: {folder}")
    ours_ms, ours_wall_ms, theirs_ms, theirs_wall_ms, ratios = [], [], [], [], []
    store = None
    for repeat in range(args.repeats):
        order = ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")
        for side in order:
            if side == "ours":
                runs, cpu, wall, store = time_ours(spec, args.workers, folder, repeat)
                ours_ms.append(1000 * cpu / runs)
                ours_wall_ms.append(1000 * wall * args.workers / runs)
                print(
                    f"[{repeat}] ours:   {runs} runs x {spec.epochs} epochs in {wall:.1f} s wall on {args.workers} "
                    f"workers ({runs / wall:.0f} runs/s): {ours_ms[-1]:.1f} CPU-ms per run "
                    f"({ours_wall_ms[-1]:.1f} wall x workers)"
                )
            elif neural_elements is not None:
                runs, cpu, wall = time_theirs(spec, args.ne_trials, neural_elements)
                theirs_ms.append(1000 * cpu / runs)
                theirs_wall_ms.append(1000 * wall / runs)
                print(
                    f"[{repeat}] theirs: {runs} runs (stratified: {args.ne_trials} per cell) in {wall:.1f} s wall: "
                    f"{theirs_ms[-1]:.1f} CPU-ms per run ({theirs_wall_ms[-1]:.1f} wall)"
                )
        if neural_elements is not None:
            ratios.append(theirs_ms[-1] / ours_ms[-1])
    print(f"\nours:   {span(ours_ms)} CPU-ms per run ({span(ours_wall_ms)} wall x workers), {args.repeats} repeats")
    if neural_elements is not None:
        print(f"theirs: {span(theirs_ms)} CPU-ms per run ({span(theirs_wall_ms)} wall)")
        print(f"Neural Elements / ours, CPU-ms per run: {span(ratios)}x (each repeat: theirs / ours of that repeat)")
    accuracy = defaultdict(list)
    for row in store.rows():
        accuracy[row["config"]["activation"]].append(100 * row["final_accuracy"])
    print(f"\n{'activation':<11} {'mean final acc %':>16} {'published':>9}")
    for name, values in sorted(accuracy.items(), key=lambda kv: -statistics.mean(kv[1])):
        print(f"{name:<11} {statistics.mean(values):>16.1f} {PUBLISHED.get(name, float('nan')):>9.1f}")


if __name__ == "__main__":
    main()
