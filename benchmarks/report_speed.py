"""How long `plasticity report` takes on a long stream: one 150-task run with every monitor (about 100k metric
rows), and a comparison of 5 variants × 3 seeds of it. Targets on this project's 2-core machine: ≤ 5 s and ≤ 15 s.

The runs are written in the exact CSVLogger layout by a generator (a real 150-task fit with every monitor takes
tens of minutes): a row per optimizer step (task id, training loss, Continual Backprop's per-layer totals), per
epoch (training and validation loss and accuracy, per-task accuracy), gradient-flow rows every 50 steps, and the
monitors' rows as each task starts (rank, dormancy, entropy and weight measures of three layers). Each figure is
the median of ``--repeats`` timings of the whole command (``python -m plasticity_lightning report ...``, imports
included) and of the report call alone, in one process run.

    python benchmarks/report_speed.py [--tasks 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

LAYERS = ("hidden.0.act", "hidden.1.act", "hidden.2.act")
RANKS = ("effective_rank", "srank", "stable_rank", "approximate_rank")
DORMANCY = ("dead_fraction", "redo_dormant_fraction", "low_activity_fraction")


def synthetic_run(folder: Path, tasks: int, seed: int, steps_per_epoch: int = 170, epochs_per_task: int = 2) -> int:
    """Write a continual run's metrics.csv; returns its number of rows."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float]] = []
    step = 0
    replaced = np.zeros(len(LAYERS))
    decline = rng.uniform(0.3, 0.6)
    for task in range(tasks):
        progress = task / max(tasks - 1, 1)
        monitor = {"step": step, "task_id": task}
        for k, layer in enumerate(LAYERS):
            base = 110 - 50 * decline * progress * (k + 1) / len(LAYERS) + rng.normal(0, 2)
            monitor.update({f"plasticity/{layer}/{m}": base * (1 + i) for i, m in enumerate(RANKS)})
            monitor.update(
                {f"plasticity/{layer}/{m}": min(1, 0.02 + decline * progress * rng.uniform(0.5, 1)) for m in DORMANCY}
            )
            monitor[f"plasticity/{layer}/activation_entropy"] = 4 - progress + rng.normal(0, 0.05)
            monitor[f"plasticity/{layer.replace('act', 'linear')}/mean_abs_weight"] = 0.1 + 0.05 * progress
            monitor[f"plasticity/{layer.replace('act', 'linear')}/distance_from_init"] = 20 * np.sqrt(progress)
        monitor.update({f"plasticity/all/{m}": monitor[f"plasticity/{LAYERS[-1]}/{m}"] for m in DORMANCY})
        rows.append(monitor)
        for epoch_in_task in range(epochs_per_task):
            epoch = task * epochs_per_task + epoch_in_task
            for _ in range(steps_per_epoch):
                replaced += rng.poisson(0.05, size=len(LAYERS))
                rows.append({"step": step, "epoch": epoch, "task_id": task, "train/loss_step": rng.uniform(0.1, 1)})
                rows.append(
                    {"step": step, **{f"cbp/{layer}/replaced": r for layer, r in zip(LAYERS, replaced, strict=True)}}
                )
                if step % 50 == 0:
                    rows.append(
                        {"step": step, **{f"plasticity/{layer}/grad_norm": rng.uniform(0, 1) for layer in LAYERS}}
                    )
                step += 1
            accuracy = 0.95 - 0.1 * decline * progress + rng.normal(0, 0.01)
            rows.append({"step": step - 1, "epoch": epoch, "val/loss": 1 - accuracy, "val/acc": accuracy,
                         f"val/acc_task_{task}": accuracy, "val/acc_current_task": accuracy})  # fmt: skip
            rows.append({"step": step - 1, "epoch": epoch, "train/loss_epoch": 0.3, "train/acc_epoch": accuracy + 0.02})
        rows.append({"step": step, "continual/new_task_acc": accuracy, "continual/task": task})
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    columns = ["epoch", "step", *sorted(c for c in table.columns if c not in ("epoch", "step"))]
    table[columns].to_csv(folder / "metrics.csv", index=False)
    (folder / "config.yaml").write_text(f"seed_everything: {seed}\n")
    return len(table)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from plasticity_lightning.reports import write_comparison, write_run_report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = synthetic_run(root / "single" / "version_0", args.tasks, seed=0)
        variants = {}
        for v in range(5):
            for seed in range(3):
                synthetic_run(root / f"variant_{v}" / f"version_{seed}", args.tasks, seed=10 * v + seed)
            variants[f"variant_{v}"] = root / f"variant_{v}"
        cli = [sys.executable, "-m", "plasticity_lightning", "report"]
        single_cli, single_call, compare_cli, compare_call = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so load drifts hit every figure alike
            single_cli.append(timed([*cli, str(root / "single" / "version_0")]))
            start = time.perf_counter()
            write_run_report(root / "single" / "version_0")
            single_call.append(time.perf_counter() - start)
            compare_cli.append(timed([*cli, "--compare", *map(str, variants.values()), "--output", str(root / "c")]))
            start = time.perf_counter()
            write_comparison(variants, root / "c2")
            compare_call.append(time.perf_counter() - start)
        size = (root / "c" / "report.html").stat().st_size / 1e6
    load = os.getloadavg()[0]
    print(f"{args.tasks}-task run, {rows:,} metric rows; comparison of 5 variants × 3 seeds (HTML {size:.1f} MB)")
    print(f"load average over the last minute: {load:.1f} on {os.cpu_count()} cores")
    print(f"{'':<34}{'median s':>10}{'min s':>8}{'target s':>10}")
    for name, values, target in (
        ("report RUN (whole command)", single_cli, 5),
        ("report RUN (the call alone)", single_call, 5),
        ("report --compare (whole command)", compare_cli, 15),
        ("report --compare (the call alone)", compare_call, 15),
    ):
        print(f"{name:<34}{statistics.median(values):>10.2f}{min(values):>8.2f}{target:>10}")


if __name__ == "__main__":
    main()
