"""Cost of the from-scratch baseline: a continual fit's wall time with ``FromScratchBaseline`` over time without it.

The baseline trains a fresh copy of the network on the same batches (one more forward and backward pass per step) and
measures it at each validation. This script fits the quickstart-sized MLP on a permuted-digits stream without the
callback, with it on every task and with it on every other task, alternating the three in one process so machine
noise hits them alike, and prints each ratio's range over the repeats. Expect about 2 for every task (a second
network trained beside the first) and about 1.5 for every other task.

    python benchmarks/from_scratch_overhead.py [--tasks 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs
from plasticity_lightning.callbacks.continual import FromScratchBaseline


def run(every_n_tasks: int | None, tasks: int) -> float:
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=tasks, epochs_per_task=1))
    model = MLP(hidden_sizes=[256, 256], optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    callbacks = [] if every_n_tasks is None else [FromScratchBaseline(every_n_tasks=every_n_tasks, verbose=False)]
    trainer = quiet_trainer(max_epochs=tasks, callbacks=callbacks, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    run(None, 1)  # warm-up: imports and the digits set
    ratios: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        plain = run(None, args.tasks)
        for k in ratios:
            ratios[k].append(run(k, args.tasks) / plain)
        print(f"without {plain:.2f} s; ratios " + ", ".join(f"every {k}: {r[-1]:.2f}" for k, r in ratios.items()))
    for k, values in ratios.items():
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"every_n_tasks={k}: wall time with / without {spread} ({args.repeats} repeats)")


if __name__ == "__main__":
    main()
