"""Reproduction: does each intervention keep the plasticity that plain backprop loses?

Runs the five variants of the plasticity-loss recipe through the real entry point (`plasticity fit`), one after
the other — plain backprop (`recipes/plasticity_loss_digits.yaml`) and the same run with Continual Backprop, ReDo,
Shrink & Perturb or L2 Init (`recipes/plasticity_loss_digits_{cbp,redo,shrink_perturb,l2_init}.yaml`) — and reads
their CSV logs: accuracy on each new task right after training on it, effective rank of the second hidden layer
and the share of low-activity ("dormant") units, at the start of the first and last tasks. Expected direction
(Dohare et al. 2024): BP declines over tasks; the others hold.

    python benchmarks/plasticity_loss.py [--tasks 50] [--variants bp cbp redo shrink_perturb l2_init]
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "bp": "plasticity_loss_digits.yaml",
    "cbp": "plasticity_loss_digits_cbp.yaml",
    "redo": "plasticity_loss_digits_redo.yaml",
    "shrink_perturb": "plasticity_loss_digits_shrink_perturb.yaml",
    "l2_init": "plasticity_loss_digits_l2_init.yaml",
}
NEW_TASK = "continual/new_task_acc"
ERANK = "plasticity/hidden.1.act/effective_rank"
DORMANT = "plasticity/all/low_activity_fraction"


def run(variant: str, tasks: int, out: Path) -> tuple[dict[str, list[float]], float]:
    args = [
        sys.executable,
        "-m",
        "plasticity_lightning",
        "fit",
        "--config",
        str(ROOT / "recipes" / VARIANTS[variant]),
        f"--trainer.max_epochs={2 * tasks}",
        f"--data.init_args.schedule.init_args.num_tasks={tasks}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={variant}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
    ]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=out)
    if result.returncode:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    series: dict[str, list[float]] = {NEW_TASK: [], ERANK: [], DORMANT: []}
    with (out / variant / "version_0" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key, values in series.items():
                if row.get(key):
                    values.append(float(row[key]))
    return series, seconds


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    window = max(1, args.tasks // 10)
    print(f"{args.tasks} permuted-digit tasks, MLP 64-256-256-10, SGD 0.1; first/last = mean over {window} tasks")
    header = (
        f"{'variant':<15}{'new-task acc first':>19}{'last':>8}{'erank first':>13}{'last':>8}"
        f"{'dormant first':>15}{'last':>8}{'time':>8}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            series, seconds = run(variant, args.tasks, Path(tmp))
            acc, erank, dormant = series[NEW_TASK], series[ERANK], series[DORMANT]
            print(
                f"{variant:<15}{mean(acc[:window]):>19.3f}{mean(acc[-window:]):>8.3f}"
                f"{mean(erank[:window]):>13.1f}{mean(erank[-window:]):>8.1f}"
                f"{mean(dormant[:window]):>15.3f}{mean(dormant[-window:]):>8.3f}{seconds:>7.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
